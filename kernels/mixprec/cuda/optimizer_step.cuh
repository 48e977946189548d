// SPDX-License-Identifier: Apache-2.0
// Pass 2 of a mixed-precision step on the GPU, with the step's count: one
// launch per optimizer applies the same update formulas as the CPU path
// (each optimizer's kernel part, optim/optimizers/<name>.hpp: one templated
// kernel for all of them) to every parameter of every group, reading found-inf,
// the loss scale and the clip input from device memory, and its last block
// counts the step. One launch: a step is queued whole or not at all (an
// optimizer with a pre-pass, optim/family.hpp, queues one or two launches
// before it that only write their own workspace). The scaler's update is a
// second, single-thread launch (amp/scale_update.hpp).
// Nothing here synchronises the host, so a whole step can be captured in a
// CUDA graph.
#pragma once

#include <cooperative_groups.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/amp/scale_update.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/exact_float.cuh"
#include "mixprec/cuda/grad_check.cuh"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/cuda/lean_step.cuh"
#include "mixprec/cuda/multi_tensor.cuh"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/optimizers/adam.hpp"
#include "mixprec/optim/optimizers/lamb.hpp"
#include "mixprec/optim/optimizers/lion.hpp"
#include "mixprec/optim/optimizers/rmsprop.hpp"
#include "mixprec/optim/optimizers/sgd.hpp"
#include "mixprec/optim/precursors.hpp"
#include "mixprec/optim/schedule.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

/// What pass 2 writes for one parameter: its model weight, fp32 master,
/// fp32 state (up to three tensors; unused ones null) and step count, all in
/// device memory. Index i matches tensor i of the gradients' TensorList.
struct ParamEntry {
  void* weight;
  DType weight_dtype;
  float* master;
  float* state[3];
  std::int64_t* step;
  int group;  // index into the launch's GroupHypers
  optim::DeviceLeanState lean;  // lean layouts (cuda/lean_step.cuh); inactive for fp32 state
  int v_state;                  // the precursors' second moment (-1: none), eps^2, beta2
  float eps2;
  double beta2;
};

/// The hyperparameters of every group of one launch, passed by value as a
/// kernel argument (a captured graph keeps them).
template <class Hyper>
struct GroupHypers {
  Hyper h[optim::kMaxDeviceGroups];
  int count = 0;
};

/// Hyperparameters of one optimizer group (optim/device_backend.hpp).
using optim::AdamHyper;
using optim::RmspropHyper;
using optim::SgdHyper;

/// Device inputs and counters of pass 2: all read from device memory at run
/// time (optim::DeviceStepInputs).
using StepInputs = optim::DeviceStepInputs;

namespace detail {

inline constexpr int step_threads = 256;

// Four consecutive elements of T, loaded or stored as one 8- or 16-byte access.
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// The precursor terms of one thread over a chunk (Optimizer::set_precursors,
// optim/precursors.hpp: the host's function), added to the parameter's sums
// once per chunk: a block sum, then one atomic per sum (their last bits
// depend on the order the blocks finish). A thread's running sums live in
// shared memory, its row of a block-wide table, not in registers: they are
// used on the monitor's logged steps only, and as five doubles held through
// every element loop they cost the step kernels registers on every step
// (the fp32 AdamW kernel: 118 with them, 110 without; ptxas, sm_90). The
// aligned path sums a quad's four terms in float first (add_to), then adds
// them to the row (add_quad): one double add a sum per quad, not per element.
static_assert(step_threads == lean_tile, "lean_range takes a tile as one element a thread of the block");

struct PrecursorAcc {
  double* out = nullptr;  // the parameter's kPrecursorSums; null: off
  int v_state = -1;       // the second moment's state, if the update uses it
  float v_scale = 1.0f, eps2 = 0.0f;

  // This thread's sums (every thread its own row).
  __device__ static double (&sums())[optim::kPrecursorSums] {
    __shared__ double rows[step_threads][optim::kPrecursorSums];
    return rows[threadIdx.x];
  }
  __device__ void start() {
    if (out == nullptr) return;
    for (std::size_t j = 0; j < optim::kPrecursorSums; ++j) sums()[j] = 0.0;
  }
  template <class W>
  __device__ void add(float before, float after, float g, float v) {
    optim::add_precursor_terms<W>(sums(), before, after, g, v_state >= 0, v, v_scale, eps2);
  }
  // One element's terms added to a quad's float sums `q` (added to this
  // thread's double sums by add_quad): one double add a sum per quad.
  template <class W>
  __device__ void add_to(float (&q)[optim::kPrecursorSums], float before, float after, float g, float v) const {
    float t[optim::kPrecursorSums];
    optim::precursor_terms<W>(t, before, after, g, v_state >= 0, v, v_scale, eps2);
    for (std::size_t j = 0; j < optim::kPrecursorSums; ++j) q[j] += t[j];
  }
  __device__ void add_quad(const float (&q)[optim::kPrecursorSums]) {
    for (std::size_t j = 0; j < optim::kPrecursorSums; ++j) sums()[j] += static_cast<double>(q[j]);
  }
  // Every thread of the block calls it (out is the same for all).
  __device__ void flush() {
    if (out == nullptr) return;
    __shared__ double warp_sums[step_threads / 32][optim::kPrecursorSums];
    const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
    for (std::size_t j = 0; j < optim::kPrecursorSums; ++j) {
      double x = sums()[j];
      for (int h = 16; h > 0; h /= 2) x += __shfl_down_sync(0xffffffffu, x, h);
      if (lane == 0) warp_sums[warp][j] = x;
    }
    __syncthreads();
    if (threadIdx.x < optim::kPrecursorSums) {
      double t = 0;
      for (int w = 0; w < step_threads / 32; ++w) t += warp_sums[w][threadIdx.x];
      atomicAdd(out + threadIdx.x, t);
    }
    __syncthreads();  // read before the next chunk writes them
  }
};

// The accumulator of one chunk of parameter p: its second moment as the
// host's Family::set_precursor_spec finds it.
template <class Kernel, class C>
__device__ inline PrecursorAcc precursor_acc(const ParamEntry& p, const C& c, double* out) {
  PrecursorAcc pa;
  pa.out = out;
  pa.start();
  if (out == nullptr || p.v_state < 0 || !Kernel::uses(c, p.v_state)) return pa;
  pa.v_state = p.v_state;
  pa.eps2 = p.eps2;
  pa.v_scale = optim::v_hat_scale(p.beta2, static_cast<double>(*p.step + 1));
  return pa;
}

// One element through the optimizer's formula (Kernel::update), in
// exact_float (no contraction: the CPU path's bits). s[k] is the element's
// state value k; Kernel::uses says which ones the options read and write,
// so only those are loaded and stored. NS: the launch's bound on the state
// tensors used (no group uses state k >= NS).
template <class Kernel, int NS, class G, class W, class C>
__device__ inline void update_one(const G* grad, W* weight, const ParamEntry& p, std::int64_t i, float inv_scale,
                                  float clip, const C& c, PrecursorAcc& pa) {
  exact_float g = mixprec::to_float(grad[i]);
  if (inv_scale != 1.0f) g = g * inv_scale;
  if (clip != 1.0f) g = g * clip;
  exact_float m = p.master[i], s[3] = {0.0f, 0.0f, 0.0f};
  for (int k = 0; k < NS; ++k) {
    if (Kernel::uses(c, k)) s[k] = p.state[k][i];
  }
  const float before = m.v;
  Kernel::update(m, s[0], s[1], s[2], g, c);
  if (pa.out != nullptr) pa.template add<W>(before, m.v, g.v, pa.v_state >= 0 ? s[pa.v_state].v : 0.0f);
  p.master[i] = m.v;
  for (int k = 0; k < NS; ++k) {
    if (Kernel::uses(c, k)) p.state[k][i] = s[k].v;
  }
  weight[i] = mixprec::from_float<W>(m.v);
}

template <class T>
__device__ inline bool quad_aligned(const T* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (4 * sizeof(T)) == 0;
}

// Elements [begin, end) of one parameter. Where the gradient, weight,
// master and used state are all aligned for 4-element accesses (chunks start
// at multiples of 2^16 elements, so this holds for whole tensors allocated
// by cudaMalloc), each thread moves 4 elements per access; otherwise, and
// for the tail, one at a time. Same arithmetic either way. Lean: the
// kernel was launched for a list with lean parameters (the lean paths'
// registers are not the fp32-only kernel's). NS: as update_one's.
template <class Kernel, bool Lean, int NS, class G, class W, class C>
__device__ inline void update_range(const G* grad, W* weight, const ParamEntry& p, std::int64_t begin,
                                    std::int64_t end, float inv_scale, float clip, const C& c, double* precursors) {
  PrecursorAcc pa = precursor_acc<Kernel>(p, c, precursors);
  if constexpr (Lean) {
    if (p.lean.active) {
      const std::int64_t step = *p.step + 1;
      // The 8-element path for 16-bit weights with gradients of their type
      // (the lean layouts' use; each instantiation costs compile time).
      bool vec = false;
      if constexpr (std::is_same_v<G, W> && sizeof(W) == 2) {
        vec = lean_vec_ok(grad, weight, p.master, p.state, p.lean, begin);
        if (vec) {
          lean_range_vec_any<Kernel>(grad, weight, p.master, p.state, p.lean, step, begin, end, inv_scale, clip, c, pa);
        }
      }
      if (!vec) lean_range<Kernel>(grad, weight, p.master, p.state, p.lean, step, begin, end, inv_scale, clip, c, pa);
      pa.flush();
      return;
    }
  }
  static_assert(NS >= 0 && NS <= 3, "at most 3 state tensors");
  bool aligned = quad_aligned(grad + begin) && quad_aligned(weight + begin) && quad_aligned(p.master + begin);
  for (int k = 0; k < NS; ++k) aligned = aligned && (!Kernel::uses(c, k) || quad_aligned(p.state[k] + begin));
  std::int64_t i = begin;
  if (aligned) {
    const std::int64_t quads = (end - begin) / 4;
    for (std::int64_t q = threadIdx.x; q < quads; q += blockDim.x) {
      const std::int64_t e = begin + 4 * q;
      const Quad<G> gq = *reinterpret_cast<const Quad<G>*>(grad + e);
      Quad<float> mq = *reinterpret_cast<const Quad<float>*>(p.master + e);
      Quad<float> sq[3];
      for (int k = 0; k < NS; ++k) {
        if (Kernel::uses(c, k)) sq[k] = *reinterpret_cast<const Quad<float>*>(p.state[k] + e);
      }
      Quad<W> wq;
      float terms[optim::kPrecursorSums] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // the quad's precursor terms
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        exact_float g = mixprec::to_float(gq.v[j]);
        if (inv_scale != 1.0f) g = g * inv_scale;
        if (clip != 1.0f) g = g * clip;
        exact_float m = mq.v[j];
        exact_float s0 = NS > 0 && Kernel::uses(c, 0) ? sq[0].v[j] : 0.0f,
                    s1 = NS > 1 && Kernel::uses(c, 1) ? sq[1].v[j] : 0.0f,
                    s2 = NS > 2 && Kernel::uses(c, 2) ? sq[2].v[j] : 0.0f;
        Kernel::update(m, s0, s1, s2, g, c);
        if (pa.out != nullptr) {
          const float v = pa.v_state == 0 ? s0.v : pa.v_state == 1 ? s1.v : s2.v;
          pa.template add_to<W>(terms, mq.v[j], m.v, g.v, v);
        }
        mq.v[j] = m.v;
        sq[0].v[j] = s0.v;
        sq[1].v[j] = s1.v;
        sq[2].v[j] = s2.v;
        wq.v[j] = mixprec::from_float<W>(m.v);
      }
      if (pa.out != nullptr) pa.add_quad(terms);
      *reinterpret_cast<Quad<float>*>(p.master + e) = mq;
      for (int k = 0; k < NS; ++k) {
        if (Kernel::uses(c, k)) *reinterpret_cast<Quad<float>*>(p.state[k] + e) = sq[k];
      }
      *reinterpret_cast<Quad<W>*>(weight + e) = wq;
    }
    i = begin + 4 * quads;
  }
  for (std::int64_t k = i + threadIdx.x; k < end; k += blockDim.x) {
    update_one<Kernel, NS>(grad, weight, p, k, inv_scale, clip, c, pa);
  }
  pa.flush();
}

template <class Kernel, bool Lean, class G, class C>
__device__ inline void dispatch_weight(const G* grad, const ParamEntry& p, std::int64_t begin,
                                       std::int64_t end, float inv_scale, float clip, const C& c,
                                       double* precursors) {
  switch (p.weight_dtype) {
    case DType::float16:
      update_range<Kernel, Lean, optim::kernel_states_v<Kernel>>(grad, static_cast<half*>(p.weight), p, begin, end,
                                                                 inv_scale, clip, c, precursors);
      break;
    case DType::bfloat16:
      update_range<Kernel, Lean, optim::kernel_states_v<Kernel>>(grad, static_cast<bfloat16*>(p.weight), p, begin, end,
                                                                 inv_scale, clip, c, precursors);
      break;
    case DType::float32:
      update_range<Kernel, Lean, optim::kernel_states_v<Kernel>>(grad, static_cast<float*>(p.weight), p, begin, end,
                                                                 inv_scale, clip, c, precursors);
      break;
  }
}

// A scheduled lr the update can use: finite, and finite as a float.
__device__ inline bool usable_lr(double lr) { return lr >= 0.0 && lr <= static_cast<double>(FLT_MAX); }

}  // namespace detail

/// Sums per tensor a pre-pass may make (optim/family.hpp: kSums <= 3).
inline constexpr int kMaxPrepassSums = 3;

/// The pre-pass's workspace of one ParamList, in device memory: per-chunk
/// partial sums, per-tensor sums (read by the step kernel), the gradient
/// round's total over every tensor, and the last-block counter.
struct PrepassView {
  float* chunk_sums = nullptr;    // [chunk * kMaxPrepassSums + j]
  double* tensor_sums = nullptr;  // [tensor * kMaxPrepassSums + j]
  double* grad_total = nullptr;
  unsigned int* blocks_done = nullptr;
  std::int64_t chunks = 0;  // chunks it has room for
};

namespace detail {

static_assert(step_threads == optim::kPrepassLanes, "a pre-pass block's threads are the sums' 256 lanes");
static_assert(chunk_elements == optim::kPrepassChunk, "the pre-pass's chunks are the lists' chunks");

// The gradient the update sees: the unscale (with the data-parallel
// divisor), then GradScaler::clip_grad_norm's coefficient: the norm of the
// unscaled gradients, torch's min(1, (1 / (norm + 1e-6)) * max_norm) in float.
__device__ inline void step_transform(const StepInputs& in, float& inv_scale, float& clip) {
  inv_scale = static_cast<float>(1.0 / (static_cast<double>(*in.scale) * in.grad_divisor));
  clip = 1.0f;
  if (in.total_sum_squares) {
    const float norm = static_cast<float>(::sqrt(*in.total_sum_squares) * inv_scale);
    const float coef = (1.0f / (norm + 1e-6f)) * static_cast<float>(in.max_norm);
    clip = coef < 1.0f ? coef : 1.0f;
  }
}

// The pre-pass's terms of elements [begin, end) of one chunk, in the
// documented order (optim/family.hpp): this thread takes elements begin +
// threadIdx.x + 256 k in increasing k, added in exact_float (no FMA). The
// gradient round's term is g * g; the other round's are Kernel::terms.
template <class Kernel, bool GradRound, int K, class G, class C>
__device__ inline void prepass_range(const G* grad, const ParamEntry& p, std::int64_t begin, std::int64_t end,
                                     float inv_scale, float clip, const C& c, exact_float (&acc)[K]) {
  for (std::int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    exact_float g = mixprec::to_float(grad[e]);
    if (inv_scale != 1.0f) g = g * inv_scale;
    if (clip != 1.0f) g = g * clip;
    if constexpr (GradRound) {
      acc[0] = acc[0] + g * g;
    } else {
      const exact_float m = p.master[e];
      exact_float s[3] = {m, m, m};  // unused state: a value the terms do not read
      for (int k = 0; k < 3; ++k) {
        if (Kernel::uses(c, k)) s[k] = p.state[k][e];
      }
      exact_float t[K];
      Kernel::terms(m, s[0], s[1], s[2], g, c, t);
      for (int j = 0; j < K; ++j) acc[j] = acc[j] + t[j];
    }
  }
}

// x[l] += x[l + h] for h = 16, 8, 4, 2, 1: lane 0 ends with the warp's sum.
__device__ inline float prepass_warp_sum(float x) {
  for (int h = 16; h > 0; h /= 2) x = __fadd_rn(x, __shfl_down_sync(0xffffffffu, x, h));
  return x;
}

// One round of the pre-pass over every chunk (GradRound: the squares of
// the gradients, a total over every tensor; else Kernel::terms per tensor
// where its group asks). Skips, writing nothing, where the step kernel will
// skip. The chunk's float sums, then the last block adds them per tensor in
// chunk order (double) and, in the gradient round, the tensors in order: the
// results do not depend on which block ran what.
template <class Kernel, bool GradRound>
__global__ void __launch_bounds__(step_threads)
    prepass_kernel(const TensorEntry* grads, const Chunk* chunks, std::int64_t num_chunks, const ParamEntry* params,
                   int num_params, GroupHypers<typename Kernel::Hyper> groups, optim::LRSchedule schedule,
                   StepInputs in, PrepassView ws) {
  constexpr int K = GradRound ? 1 : optim::prepass_sums_v<Kernel>;
  const bool found_inf = *in.found_inf != 0;
  const double factor = schedule.factor(*in.applied_steps);
  bool lr_ok = true;
  for (int g = 0; g < groups.count; ++g) lr_ok = lr_ok && usable_lr(groups.h[g].lr * factor);
  if (found_inf || !lr_ok) return;  // every block: the counter stays at 0
  float inv_scale, clip;
  step_transform(in, inv_scale, clip);
  __shared__ float warp_sums[K][step_threads / 32];
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  for (std::int64_t ci = blockIdx.x; ci < num_chunks; ci += gridDim.x) {
    const Chunk ch = chunks[ci];
    const TensorEntry g = grads[ch.tensor];
    const ParamEntry p = params[ch.tensor];
    const typename Kernel::Hyper& h = groups.h[p.group];
    exact_float acc[K];
    for (int j = 0; j < K; ++j) acc[j] = 0.0f;
    const unsigned flags = Kernel::prepass(h);
    if (GradRound || (flags & optim::kPrepassSums) != 0u) {
      auto co = Kernel::coeffs(h, h.lr * factor, static_cast<double>(*p.step + 1));
      if (!GradRound && (flags & optim::kPrepassGradNorm) != 0u) Kernel::grad_norm(co, h, *ws.grad_total);
      switch (g.dtype) {
        case DType::float16:
          prepass_range<Kernel, GradRound>(static_cast<const half*>(g.data), p, ch.begin, ch.end, inv_scale, clip,
                                           co, acc);
          break;
        case DType::bfloat16:
          prepass_range<Kernel, GradRound>(static_cast<const bfloat16*>(g.data), p, ch.begin, ch.end, inv_scale,
                                           clip, co, acc);
          break;
        case DType::float32:
          prepass_range<Kernel, GradRound>(static_cast<const float*>(g.data), p, ch.begin, ch.end, inv_scale, clip,
                                           co, acc);
          break;
      }
    }
    for (int j = 0; j < K; ++j) {
      const float w = prepass_warp_sum(acc[j].v);
      if (lane == 0) warp_sums[j][warp] = w;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int j = 0; j < K; ++j) {
        float t = 0.0f;
        for (int w = 0; w < step_threads / 32; ++w) t = __fadd_rn(t, warp_sums[j][w]);
        ws.chunk_sums[ci * kMaxPrepassSums + j] = t;
      }
    }
    __syncthreads();  // warp_sums are read before the next chunk writes them
  }
  __shared__ bool is_last;
  __threadfence();
  if (threadIdx.x == 0) is_last = atomicAdd(ws.blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < num_params; i += blockDim.x) {
    const TensorEntry t = grads[i];
    const std::int64_t n = (t.numel + chunk_elements - 1) / chunk_elements;
    for (int j = 0; j < K; ++j) {
      double s = 0.0;
      for (std::int64_t c = t.first_chunk; c < t.first_chunk + n; ++c) {
        s = __dadd_rn(s, static_cast<double>(__ldcg(ws.chunk_sums + c * kMaxPrepassSums + j)));
      }
      ws.tensor_sums[i * kMaxPrepassSums + j] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (GradRound) {
      double total = 0.0;
      for (int i = 0; i < num_params; ++i) total = __dadd_rn(total, ws.tensor_sums[i * kMaxPrepassSums]);
      *ws.grad_total = total;
    }
    *ws.blocks_done = 0;  // ready for the next launch (or graph replay)
  }
}

// The step's coefficients finished from the pre-pass (optim/family.hpp,
// Family::finish_coeffs on the host: the same calls in the same order).
template <class Kernel, class C, class H>
__device__ inline void finish_coeffs(C& co, const H& h, double lr, double step, const PrepassView& pre, int tensor,
                                     std::int64_t numel) {
  if constexpr (optim::prepass_sums_v<Kernel> > 0) {
    const unsigned flags = Kernel::prepass(h);
    if ((flags & optim::kPrepassGradNorm) != 0u) Kernel::grad_norm(co, h, *pre.grad_total);
    if ((flags & optim::kPrepassSums) != 0u) {
      Kernel::finish(co, h, lr, step, pre.tensor_sums + static_cast<std::int64_t>(tensor) * kMaxPrepassSums, numel);
    }
  } else {
    (void)co, (void)h, (void)lr, (void)step, (void)pre, (void)tensor, (void)numel;
  }
}

// The step's work is shared out by elements: block b of G takes the
// elements [b, b + 1) * total / G of the list's chunks laid end to end, its
// ends moved down to a multiple of step_grain elements of their tensor
// (whole 256-element tiles of the lean layouts, 16-byte aligned), and G is
// the blocks the GPU holds at once. Every block moves the same bytes to
// within a grain, whatever the model's sizes: no block waits on a second
// chunk while the others idle (with one block a chunk the MLP's 1.86M
// parameters ran on 35 of 132 SMs; with slices of chunks as work items, a
// list with a few more items than blocks ran them in two rounds). Every
// element's update is the same whatever the split.
inline constexpr std::int64_t step_grain = 1024;
static_assert(step_grain % lean_tile == 0 && chunk_elements % step_grain == 0,
              "a block's range is whole lean tiles, and chunks are whole grains");

// Where split point e (an element of the list laid end to end) falls: its
// chunk c, and the point moved down to a grain of c's tensor.
struct SplitPoint {
  std::int64_t chunk, at;
};
__device__ inline SplitPoint split_point(const Chunk* chunks, const std::int64_t* offsets, std::int64_t num_chunks,
                                         std::int64_t e) {
  if (e >= offsets[num_chunks]) return {num_chunks, offsets[num_chunks]};
  std::int64_t lo = 0, hi = num_chunks - 1;  // the last chunk with offsets[c] <= e
  while (lo < hi) {
    const std::int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= e) lo = mid; else hi = mid - 1;
  }
  return {lo, offsets[lo] + (e - offsets[lo]) / step_grain * step_grain};
}

// What the step kernel runs on one range of one parameter: AnyRange for
// any list (every gradient and weight dtype, lean layouts when Lean, the
// monitor's precursor sums), UniformRange for the common list: G gradients
// and W weights throughout, fp32 state in at most NS tensors (the sums in its
// Sums variant only).
// Without the other paths' registers the uniform kernel fits three blocks
// an SM where the other fits two (fp16 AdamW, sm_90: 76 registers against
// 110), so more loads are in flight on each SM; its elements get the same
// arithmetic (update_range) and so the same bits. With the work shared out
// by elements it is the faster one at every size measured (H200, AdamW
// graphed: 2^22 parameters 48 against 53 us, 2^30 8.33 against 8.76 ms).
template <bool Lean>
struct AnyRange {
  static constexpr int kMinBlocks = Lean ? 2 : 1;
  template <class Kernel, class C>
  __device__ static void run(const TensorEntry& g, const ParamEntry& p, std::int64_t begin, std::int64_t end,
                             float inv_scale, float clip, const C& co, double* precursors) {
    switch (g.dtype) {
      case DType::float16:
        dispatch_weight<Kernel, Lean>(static_cast<const half*>(g.data), p, begin, end, inv_scale, clip, co,
                                      precursors);
        break;
      case DType::bfloat16:
        dispatch_weight<Kernel, Lean>(static_cast<const bfloat16*>(g.data), p, begin, end, inv_scale, clip, co,
                                      precursors);
        break;
      case DType::float32:
        dispatch_weight<Kernel, Lean>(static_cast<const float*>(g.data), p, begin, end, inv_scale, clip, co,
                                      precursors);
        break;
    }
  }
};
// Sums: for the monitor's logged steps, which ask for the precursor sums:
// the same kernel with them; they ran in the general kernel before (106
// registers), whose other paths this one does not hold. Three blocks an SM
// like the plain kernel: capped at 80 registers it spills a little (fp16
// AdamW, sm_90: 38 bytes stored, 64 loaded; Lion and SGD none, LAMB 54 /
// 96), where uncapped it took 96 registers and two blocks an SM. In the MLP
// example (H100, CUDA graphs, 6 alternated runs a side) the logged step
// cost 2 us less this way: 32.6 -> 30.5 us over an unmonitored step.
template <class G, class W, int NS, bool Sums = false>
struct UniformRange {
  static constexpr int kMinBlocks = 3;
  static constexpr bool kSums = Sums;
  template <class Kernel, class C>
  __device__ static void run(const TensorEntry& g, const ParamEntry& p, std::int64_t begin, std::int64_t end,
                             float inv_scale, float clip, const C& co, double* precursors) {
    update_range<Kernel, false, NS>(static_cast<const G*>(g.data), static_cast<W*>(p.weight), p, begin, end,
                                    inv_scale, clip, co, Sums ? precursors : nullptr);
  }
};

// UniformLeanRange: the common lean list, every parameter in one lean
// layout (master Ms, moments Mo; bf16_sr takes Mo = bf16), bf16 gradients
// and weights, no precursor sums, no third state. Its kernel holds only that
// layout's vector path (and the element-a-thread path for a range that is
// not 16-byte aligned), where the general lean kernel holds every layout's
// and is capped at 128 registers for two blocks an SM: ncu on an H100
// counted 230,681 local-memory spill requests in its 2^24-parameter bf16-
// moment step (47% of its memory requests). Same functions, same bits.
// Each warp asks L2 for its next tile while it computes this one (Ahead =
// 1, lean_range_vec): with two blocks an SM few other warps hide a tile's
// loads. H100, 2^30: bf16 moments 9.52 -> 8.75 ms; two tiles ahead was
// slower (9.68), and so was the same hint in the fp32 kernel (0-8%).
template <optim::Master Ms, optim::Moments Mo>
struct UniformLeanRange {
  static constexpr int kMinBlocks = 2;
  template <class Kernel, class C>
  __device__ static void run(const TensorEntry& g, const ParamEntry& p, std::int64_t begin, std::int64_t end,
                             float inv_scale, float clip, const C& co, double*) {
    const auto* grad = static_cast<const bfloat16*>(g.data);
    auto* weight = static_cast<bfloat16*>(p.weight);
    PrecursorAcc none;  // out null: no sums
    const std::int64_t step = *p.step + 1;
    if (lean_vec_ok(grad, weight, p.master, p.state, p.lean, begin)) {
      lean_range_vec<Kernel, false, Ms, Mo, /*Ahead=*/1>(grad, weight, p.master, p.state, p.lean, step, begin, end,
                                                         inv_scale, clip, co, none);
    } else {
      lean_range<Kernel>(grad, weight, p.master, p.state, p.lean, step, begin, end, inv_scale, clip, co, none);
    }
  }
};

// The step over share `part` of `parts` of the list (the elements laid end
// to end, split evenly at step_grain; part == parts: none), then, by the
// last block of the grid to finish, the step counts (it returns true there):
// the body of step_kernel and of the fused check and step
// (check_and_step_kernel), which passes `found_inf` from its own pass 1
// instead of *in.found_inf.
template <class Kernel, class Range>
__device__ inline bool step_blocks(const TensorEntry* grads, const Chunk* chunks, std::int64_t num_chunks,
                                   const ParamEntry* params, int num_params,
                                   const GroupHypers<typename Kernel::Hyper>& groups,
                                   const optim::LRSchedule& schedule, const StepInputs& in, bool found_inf,
                                   unsigned int* blocks_done, const PrepassView& pre, const std::int64_t* offsets,
                                   std::int64_t part, std::int64_t parts) {
  const std::int64_t applied = *in.applied_steps;
  const double factor = schedule.factor(applied);
  // Every group's lr is checked before any element changes: a step with one
  // unusable lr is skipped whole (NaN fails the comparisons too).
  bool lr_ok = true;
  for (int g = 0; g < groups.count; ++g) lr_ok = lr_ok && usable_lr(groups.h[g].lr * factor);
  const bool apply = !found_inf && lr_ok;
  if (apply && part < parts) {
    float inv_scale, clip;
    step_transform(in, inv_scale, clip);
    // This block's range (step_grain): its part of each chunk it meets.
    const std::int64_t total = offsets[num_chunks];
    const SplitPoint first = split_point(chunks, offsets, num_chunks, total * part / parts);
    const std::int64_t stop = split_point(chunks, offsets, num_chunks, total * (part + 1) / parts).at;
    for (std::int64_t c = first.chunk; c < num_chunks && offsets[c] < stop; ++c) {
      Chunk ch = chunks[c];
      const std::int64_t from = first.at > offsets[c] ? first.at : offsets[c];
      const std::int64_t to = stop < offsets[c + 1] ? stop : offsets[c + 1];
      if (from >= to) continue;  // the whole block alike
      ch.end = ch.begin + (to - offsets[c]);
      ch.begin += from - offsets[c];
      const TensorEntry g = grads[ch.tensor];
      const ParamEntry p = params[ch.tensor];
      const typename Kernel::Hyper& h = groups.h[p.group];
      auto co = Kernel::coeffs(h, h.lr * factor, static_cast<double>(*p.step + 1));
      finish_coeffs<Kernel>(co, h, h.lr * factor, static_cast<double>(*p.step + 1), pre, ch.tensor, g.numel);
      double* pre_t = in.precursors != nullptr ? in.precursors + ch.tensor * optim::kPrecursorSums : nullptr;
      Range::template run<Kernel>(g, p, ch.begin, ch.end, inv_scale, clip, co, pre_t);
    }
  }
  // The step's count, by the last block to finish: every block has read the
  // step counts and the applied count by then.
  if (!last_block_to_finish(blocks_done)) return false;
  if (apply) {
    for (int i = threadIdx.x; i < num_params; i += blockDim.x) {
      *params[i].step = amp::saturating_increment(*params[i].step);
    }
  }
  if (threadIdx.x == 0) {
    if (apply) *in.applied_steps = amp::saturating_increment(applied);
    if (found_inf && in.any_inf) *in.any_inf = 1;
    if (!found_inf && !lr_ok && in.nonfinite_lr_steps) {
      *in.nonfinite_lr_steps = amp::saturating_increment(*in.nonfinite_lr_steps);
    }
    *blocks_done = 0;  // ready for the next launch (or graph replay)
  }
  return true;
}

template <class Kernel, class Range>
__global__ void __launch_bounds__(step_threads, Range::kMinBlocks)
    step_kernel(const TensorEntry* grads, const Chunk* chunks, std::int64_t num_chunks, const ParamEntry* params,
                int num_params, GroupHypers<typename Kernel::Hyper> groups, optim::LRSchedule schedule, StepInputs in,
                unsigned int* blocks_done, PrepassView pre, const std::int64_t* offsets) {
  // Launched dependent (launch_dependent): nothing is read before the
  // kernels before this one have finished; the scale update after it may be
  // scheduled now.
  wait_for_prior_kernels();
  allow_dependent_launch();
  step_blocks<Kernel, Range>(grads, chunks, num_chunks, params, num_params, groups, schedule, in,
                             *in.found_inf != 0, blocks_done, pre, offsets, blockIdx.x, gridDim.x);
}

// Pass 1 and the step in one cooperative launch (every block resident at
// once, at least two): each block checks its items of the list as
// check_grads_kernel does, a non-finite one also setting the flag
// cb.any_bad; the grid waits at one barrier; then the last block writes
// pass 1's results (reduce_check, the last block's code in the two-launch
// form) for whoever reads them after the launch, while the others, having
// read the flag, update the list shared out among them (that serial
// reduction is off their path); the last of all to finish does the step
// counts and clears the flag. With clipping the grid waits a second time,
// for the norm. Same items, same per-item and per-tensor order as
// check_grads_kernel, same updates as step_kernel: same bits. A Range with
// the precursor sums (a monitor's logged step) bins exponents in pass 1 too.
template <class Kernel, class Range>
__global__ void __launch_bounds__(step_threads, Range::kMinBlocks)
    check_and_step_kernel(const TensorEntry* grads, const Chunk* chunks, std::int64_t num_chunks, CheckBuffers cb,
                          const ParamEntry* params, int num_params, GroupHypers<typename Kernel::Hyper> groups,
                          optim::LRSchedule schedule, StepInputs in, unsigned int* blocks_done, PrepassView pre,
                          const std::int64_t* offsets) {
  static_assert(step_threads == check_threads, "pass 1's items are summed by blocks of check_threads");
  wait_for_prior_kernels();
  allow_dependent_launch();
  check_items<Range::kSums>(grads, chunks, num_chunks, cb.slices, cb.slice_sums, cb.slice_bad, cb.histogram,
                            cb.any_bad);
  cooperative_groups::this_grid().sync();
  const bool found_inf = __ldcg(cb.any_bad) != 0u;
  const unsigned reducer = gridDim.x - 1;
  if (blockIdx.x == reducer) {
    reduce_check(grads, cb.slices, cb.num_tensors, cb.slice_sums, cb.slice_bad, cb.sum_squares, cb.nonfinite,
                 cb.total, cb.found_inf);
  }
  if (in.total_sum_squares != nullptr) cooperative_groups::this_grid().sync();  // the norm, for the clip
  if (step_blocks<Kernel, Range>(grads, chunks, num_chunks, params, num_params, groups, schedule, in, found_inf,
                                 blocks_done, pre, offsets, blockIdx.x, reducer) &&
      threadIdx.x == 0) {
    *cb.any_bad = 0u;  // every block has read it
  }
}

// The end of an iteration: count it, update the scale, reset the flag
// (amp::end_iteration, the rule the monitor's fused launch runs too).
__global__ void update_scale_kernel(amp::DeviceScalerState* s, amp::ScalePolicy policy, int dynamic) {
  wait_for_prior_kernels();  // launched dependent on the step
  amp::end_iteration(*s, policy, dynamic != 0);
}

}  // namespace detail

/// Parameters of one optimizer in device memory (weights, fp32 masters and
/// state, step counts, groups), matched index by index to the gradients'
/// TensorList, and the step kernel's block counter. One step runs on it at
/// a time (optim::Optimizer orders its launches across streams).
class ParamList {
 public:
  /// `num_chunks`: the chunks of the gradients' TensorList, for the
  /// pre-pass's workspace (optim/family.hpp; 0: none, and a step that needs
  /// a pre-pass is refused).
  explicit ParamList(const std::vector<ParamEntry>& params, std::int64_t num_chunks = 0)
      : count_(static_cast<int>(params.size())) {
    MIXPREC_CUDA_CHECK(cudaGetDevice(&device_));
    counter_ = Buffer(sizeof(unsigned int), Device::cuda(device_));
    MIXPREC_CUDA_CHECK(cudaMemset(counter_.data(), 0, counter_.bytes()));
    if (num_chunks > 0 || !params.empty()) {
      // Doubles first: [tensor sums][grad total][chunk sums (float)][counter].
      const std::size_t doubles = (params.size() * kMaxPrepassSums + 1) * sizeof(double);
      const std::size_t floats = static_cast<std::size_t>(num_chunks) * kMaxPrepassSums * sizeof(float);
      prepass_buffer_ = Buffer(doubles + floats + sizeof(unsigned int), Device::cuda(device_));
      MIXPREC_CUDA_CHECK(cudaMemset(prepass_buffer_.data(), 0, prepass_buffer_.bytes()));
      char* base = static_cast<char*>(prepass_buffer_.data());
      prepass_.tensor_sums = reinterpret_cast<double*>(base);
      prepass_.grad_total = prepass_.tensor_sums + params.size() * kMaxPrepassSums;
      prepass_.chunk_sums = reinterpret_cast<float*>(base + doubles);
      prepass_.blocks_done = reinterpret_cast<unsigned int*>(base + doubles + floats);
      prepass_.chunks = num_chunks;
    }
    if (params.empty()) return;
    buffer_ = Buffer(params.size() * sizeof(ParamEntry), Device::cuda(device_));
    MIXPREC_CUDA_CHECK(cudaMemcpy(buffer_.data(), params.data(), buffer_.bytes(), cudaMemcpyHostToDevice));
    uniform_weight_dtype_ = params[0].weight_dtype;
    uniform_lean_ = std::make_pair(params[0].lean.master, lean_moments_class(params[0].lean.moments));
    for (const ParamEntry& p : params) {
      groups_ = p.group + 1 > groups_ ? p.group + 1 : groups_;
      has_lean_ = has_lean_ || p.lean.active;
      if (p.weight_dtype != params[0].weight_dtype) uniform_weight_dtype_.reset();
      if (!p.lean.active || p.lean.master != uniform_lean_->first ||
          lean_moments_class(p.lean.moments) != uniform_lean_->second) {
        uniform_lean_.reset();
      }
    }
  }
  const ParamEntry* entries() const { return static_cast<const ParamEntry*>(buffer_.data()); }
  int size() const { return count_; }
  /// 1 + the largest group index of the entries (0 when there are none).
  int groups() const { return groups_; }
  /// Whether an entry keeps lean state (its step needs the lean paths).
  bool has_lean() const { return has_lean_; }
  /// The weights' dtype when every entry has the same (none when empty).
  std::optional<DType> uniform_weight_dtype() const { return uniform_weight_dtype_; }
  /// The lean layout (master, moments; Moments::bf16 for bf16 and bf16_sr)
  /// when every entry keeps lean state in the same one (none otherwise).
  std::optional<std::pair<optim::Master, optim::Moments>> uniform_lean() const { return uniform_lean_; }
  /// bf16_sr's moments are stored as bf16's: one kernel path for both.
  static optim::Moments lean_moments_class(optim::Moments m) {
    return m == optim::Moments::bf16_sr ? optim::Moments::bf16 : m;
  }
  unsigned int* blocks_done() const { return static_cast<unsigned int*>(counter_.data()); }
  /// The pre-pass's workspace (chunks == 0: made without one).
  const PrepassView& prepass() const { return prepass_; }

 private:
  int count_ = 0;
  int groups_ = 0;
  bool has_lean_ = false;
  std::optional<DType> uniform_weight_dtype_;
  std::optional<std::pair<optim::Master, optim::Moments>> uniform_lean_;
  int device_ = 0;
  Buffer buffer_;
  Buffer counter_;
  Buffer prepass_buffer_;
  PrepassView prepass_;
};

namespace detail {
// The state tensors the uniform kernel has room for: all of an optimizer's
// but the third (Adam's amsgrad maximum, RMSprop's momentum buffer), which
// would cost it the registers it saves.
template <class Kernel>
inline constexpr int uniform_states = optim::kernel_states_v<Kernel> < 2 ? optim::kernel_states_v<Kernel> : 2;
}  // namespace detail

namespace detail {
// Whether no group's options use a state index >= first (uses() reads the
// options' switches only): a uniform kernel leaves those states out.
template <class Hyper>
bool no_group_uses_states_from(const std::vector<Hyper>& groups, int first) {
  using Kernel = typename Hyper::kernel;
  for (const Hyper& h : groups) {
    const auto c = Kernel::coeffs(h, h.lr, 1.0);
    for (int k = first; k < 3; ++k) {
      if (Kernel::uses(c, k)) return false;
    }
  }
  return true;
}
}  // namespace detail

/// Whether launch_step runs the uniform kernel (detail::UniformRange) for
/// these arguments: fp16 gradients and weights throughout, or bf16, no lean
/// parameter, and no group using a state the kernel has no room for (with
/// the precursor sums when they are asked). Any other list runs the general
/// kernel; both give the same bits.
template <class Hyper>
bool uniform_step(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups) {
  const std::optional<DType> g = grads.uniform_dtype(), w = params.uniform_weight_dtype();
  return !params.has_lean() && g && w && *g == *w &&
         (*g == DType::float16 || *g == DType::bfloat16) &&
         detail::no_group_uses_states_from(groups, detail::uniform_states<typename Hyper::kernel>);
}

namespace detail {
// The uniform lean kernel of a layout, for the layouts that change one
// thing from the default (issue 18's: bf16 or 8-bit moments, a remainder
// master, no master); null for the others, which run the general lean
// kernel (each instantiation costs compile time).
// (With Check = CheckBuffers: the fused check and step's signature.)
template <class Kernel, class... Check>
using StepKernelPtr = void (*)(const TensorEntry*, const Chunk*, std::int64_t, Check..., const ParamEntry*, int,
                               GroupHypers<typename Kernel::Hyper>, optim::LRSchedule, StepInputs, unsigned int*,
                               PrepassView, const std::int64_t*);
// pick(UniformRange<...>{}) for a list uniform_step accepts: its gradients'
// dtype (fp16 or bf16), with the precursor sums or without.
template <class Kernel, class Pick>
auto pick_uniform(DType dtype, bool sums, Pick pick) {
  constexpr int states = uniform_states<Kernel>;
  if (dtype == DType::float16) {
    return sums ? pick(UniformRange<half, half, states, true>{}) : pick(UniformRange<half, half, states>{});
  }
  return sums ? pick(UniformRange<bfloat16, bfloat16, states, true>{})
              : pick(UniformRange<bfloat16, bfloat16, states>{});
}
// The uniform step kernel; the fused check and step (check_and_step_kernel)
// of the same range, `logged` asking the monitor's histograms and sums.
template <class Kernel>
StepKernelPtr<Kernel> uniform_kernel(DType dtype, bool sums) {
  return pick_uniform<Kernel>(dtype, sums, [](auto r) -> StepKernelPtr<Kernel> {
    return step_kernel<Kernel, decltype(r)>;
  });
}
template <class Kernel>
StepKernelPtr<Kernel, CheckBuffers> fused_uniform_kernel(DType dtype, bool logged) {
  return pick_uniform<Kernel>(dtype, logged, [](auto r) -> StepKernelPtr<Kernel, CheckBuffers> {
    return check_and_step_kernel<Kernel, decltype(r)>;
  });
}
template <class Kernel>
StepKernelPtr<Kernel> uniform_lean_kernel(optim::Master master, optim::Moments moments) {
  using optim::Master;
  using optim::Moments;
  if (master == Master::fp32 && moments == Moments::bf16) {
    return step_kernel<Kernel, UniformLeanRange<Master::fp32, Moments::bf16>>;
  }
  if (master == Master::fp32 && moments == Moments::int8) {
    return step_kernel<Kernel, UniformLeanRange<Master::fp32, Moments::int8>>;
  }
  if (master == Master::remainder && moments == Moments::fp32) {
    return step_kernel<Kernel, UniformLeanRange<Master::remainder, Moments::fp32>>;
  }
  if (master == Master::none && moments == Moments::fp32) {
    return step_kernel<Kernel, UniformLeanRange<Master::none, Moments::fp32>>;
  }
  return nullptr;
}
}  // namespace detail

/// Whether the step's list is the common lean one (detail::UniformLeanRange):
/// bf16 gradients and weights throughout, every parameter in the same lean
/// layout, no precursor sums asked, no group using a third state. Its kernel
/// is the one of uniform_lean_kernel when that has one for the layout.
template <class Hyper>
bool uniform_lean_step(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups,
                       const StepInputs& in) {
  const std::optional<DType> g = grads.uniform_dtype(), w = params.uniform_weight_dtype();
  return params.uniform_lean().has_value() && in.precursors == nullptr && g && w && *g == DType::bfloat16 &&
         *w == DType::bfloat16 && detail::no_group_uses_states_from(groups, 2);
}

namespace detail {
// Which step kernel launch_step_with may run: the fastest for the list, or
// the general one whatever the list (tests: both must give the same bits).
enum class StepKernelChoice { fastest, general };
template <class Hyper>
void launch_step_with(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups,
                      const optim::LRSchedule& schedule, const StepInputs& in, StepKernelChoice choice,
                      cudaStream_t stream);

// The launch's checks of its arguments, before anything is queued, and the
// groups' table the kernels take.
template <class Hyper>
GroupHypers<Hyper> group_table(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups,
                               const optim::LRSchedule& schedule, const StepInputs& in) {
  static_assert(std::is_trivially_copyable<Hyper>::value, "an optimizer's Hyper travels as a kernel argument");
  static_assert(sizeof(GroupHypers<Hyper>) <= 4096 - 512, "64 of this Hyper do not fit a kernel's arguments");
  MIXPREC_CHECK(grads.num_tensors() == params.size(), "launch_step: ", grads.num_tensors(),
                " gradients but ", params.size(), " parameters");
  MIXPREC_CHECK(in.found_inf && in.scale && in.applied_steps, "launch_step: found_inf, scale and "
                "applied_steps must point to device memory");
  MIXPREC_CHECK(!groups.empty() && groups.size() <= optim::kMaxDeviceGroups, "launch_step: ", groups.size(),
                " groups, must be in [1, ", optim::kMaxDeviceGroups, "]");
  MIXPREC_CHECK(params.groups() <= static_cast<int>(groups.size()), "launch_step: a parameter is in group ",
                params.groups() - 1, ", there are ", groups.size(), " groups");
  schedule.validate();
  GroupHypers<Hyper> table;
  for (std::size_t g = 0; g < groups.size(); ++g) table.h[g] = groups[g];
  table.count = static_cast<int>(groups.size());
  return table;
}

// The pre-pass rounds the groups ask for (optim/family.hpp; 0: none).
template <class Hyper>
unsigned prepass_flags(const std::vector<Hyper>& groups) {
  unsigned flags = 0;
  if constexpr (optim::prepass_sums_v<typename Hyper::kernel> > 0) {
    for (const Hyper& h : groups) flags |= Hyper::kernel::prepass(h);
  }
  return flags;
}

// Whether the current device launches cooperative kernels (asked once a
// device).
inline bool cooperative_launch_ok() {
  return kernel_query(2, nullptr, 0, [] {
           int device = 0, ok = 0;
           MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
           MIXPREC_CUDA_CHECK(cudaDeviceGetAttribute(&ok, cudaDevAttrCooperativeLaunch, device));
           return ok;
         }) != 0;
}
}  // namespace detail

/// Pass 2 and the step's count over every parameter of `params`, one
/// launch: `groups[g]` are the hyperparameters of the entries whose group is
/// g. Unless *in.found_inf or a group's scheduled lr is unusable, updates
/// every parameter, then adds one to every step count and *in.applied_steps;
/// sets *in.any_inf when *in.found_inf; counts an unusable lr in
/// *in.nonfinite_lr_steps. Asynchronous on `stream`.
template <class Hyper>
void launch_step(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups,
                 const optim::LRSchedule& schedule, const StepInputs& in, cudaStream_t stream = nullptr) {
  detail::launch_step_with(grads, params, groups, schedule, in, detail::StepKernelChoice::fastest, stream);
}

template <class Hyper>
void detail::launch_step_with(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups,
                              const optim::LRSchedule& schedule, const StepInputs& in, StepKernelChoice choice,
                              cudaStream_t stream) {
  using Kernel = typename Hyper::kernel;
  const GroupHypers<Hyper> table = detail::group_table(grads, params, groups, schedule, in);
  const std::int64_t chunks = grads.num_chunks();
  const unsigned grid = chunks == 0 ? 1u : grid_for(chunks * detail::step_threads, detail::step_threads, 4);
  const PrepassView& pre = params.prepass();
  if constexpr (optim::prepass_sums_v<Kernel> > 0) {
    // The pre-pass rounds the groups ask for (optim/family.hpp), queued
    // before the step; they write only the workspace, so a failure here
    // leaves the optimizer as it was.
    static_assert(optim::prepass_sums_v<Kernel> <= kMaxPrepassSums, "a pre-pass makes at most 3 sums per tensor");
    const unsigned flags = detail::prepass_flags(groups);
    if (flags != 0u) {
      MIXPREC_CHECK(pre.chunks >= chunks && pre.tensor_sums != nullptr, "launch_step: optimizer \"", Kernel::kKey,
                    "\" needs a pre-pass over ", chunks, " chunks, the ParamList's workspace has room for ",
                    pre.chunks, "; make the ParamList with the gradients' num_chunks()");
      if ((flags & optim::kPrepassGradNorm) != 0u) {
        detail::prepass_kernel<Kernel, true><<<grid, detail::step_threads, 0, stream>>>(
            grads.entries(), grads.chunks(), chunks, params.entries(), params.size(), table, schedule, in, pre);
        MIXPREC_CUDA_CHECK_LAUNCH("prepass_kernel (gradient round)");
      }
      if ((flags & optim::kPrepassSums) != 0u) {
        detail::prepass_kernel<Kernel, false><<<grid, detail::step_threads, 0, stream>>>(
            grads.entries(), grads.chunks(), chunks, params.entries(), params.size(), table, schedule, in, pre);
        MIXPREC_CUDA_CHECK_LAUNCH("prepass_kernel");
      }
    }
  }
  // A list with lean parameters gets the kernel with the lean paths; a
  // uniform one (detail::UniformRange) the kernel without the other paths.
  auto kernel = params.has_lean() ? detail::step_kernel<Kernel, detail::AnyRange<true>>
                                  : detail::step_kernel<Kernel, detail::AnyRange<false>>;
  const bool fastest = choice == detail::StepKernelChoice::fastest;
  if (fastest && uniform_step(grads, params, groups)) {
    kernel = detail::uniform_kernel<Kernel>(*grads.uniform_dtype(), in.precursors != nullptr);
  } else if (fastest && uniform_lean_step(grads, params, groups, in)) {
    const auto layout = *params.uniform_lean();
    if (auto lean = detail::uniform_lean_kernel<Kernel>(layout.first, layout.second)) kernel = lean;
  }
  // As many blocks as the GPU holds at once, fewer for a list of fewer grains.
  const std::int64_t grains = (grads.num_elements() + detail::step_grain - 1) / detail::step_grain;
  const std::int64_t held = static_cast<std::int64_t>(resident_blocks(kernel, detail::step_threads)) *
                            multiprocessor_count();
  const unsigned step_grid = static_cast<unsigned>(std::max<std::int64_t>(1, std::min(grains, held)));
  launch_dependent("step_kernel", kernel, step_grid, detail::step_threads, stream, grads.entries(), grads.chunks(),
                   chunks, params.entries(), params.size(), table, schedule, in, params.blocks_done(), pre,
                   grads.chunk_offsets());
}

/// The same with one group for every parameter.
template <class Hyper>
void launch_step(const TensorList& grads, const ParamList& params, const Hyper& hyper,
                 const optim::LRSchedule& schedule, const StepInputs& in, cudaStream_t stream = nullptr) {
  launch_step(grads, params, std::vector<Hyper>{hyper}, schedule, in, stream);
}

/// check.launch(grads, stream, histogram), then launch_step, in one
/// cooperative launch (check_and_step_kernel) where it can: the list runs
/// the uniform kernel (16-bit gradients and weights of one dtype, no lean
/// parameter, no third state), asks no pre-pass, the exponent histograms
/// and the precursor sums are asked both (a monitor's logged step) or
/// neither, and the device launches cooperative kernels; otherwise in those
/// two launches. Same results (pass 1's too) and same bits either way.
/// `check` must have been made for `grads`, and in.found_inf must be
/// check.found_inf() (in.total_sum_squares, when clipping, its total).
/// Asynchronous on `stream`; capturable in a CUDA graph.
///
/// Not what the host API runs (DeviceGradScaler::step launches the two):
/// on an H200 (2026-12-06) it was 3-5% faster than the two launches for
/// SGD with momentum at 2^21 to 2^24 parameters (RMSprop: 2-4% faster at
/// 2^21 and 2^24, 1% slower at 2^22), the same for AdamW at 2^24 and 7%
/// slower for AdamW at 2^21 and 2^22, whose kernel holds three blocks an
/// SM, too few for every pass 1 item to have a block (docs/performance.md).
template <class Hyper>
void launch_check_and_step(const TensorList& grads, const ParamList& params, GradCheck& check,
                           const std::vector<Hyper>& groups, const optim::LRSchedule& schedule, const StepInputs& in,
                           cudaStream_t stream = nullptr, std::uint64_t* histogram = nullptr) {
  using Kernel = typename Hyper::kernel;
  const GroupHypers<Hyper> table = detail::group_table(grads, params, groups, schedule, in);
  MIXPREC_CHECK(check.num_chunks() == grads.num_chunks() && in.found_inf == check.found_inf(),
                "launch_check_and_step: the check was made for another list, or in.found_inf is not the check's");
  const bool logged = histogram != nullptr;
  const std::int64_t chunks = grads.num_chunks();
  if (chunks > 0 && uniform_step(grads, params, groups) && detail::prepass_flags(groups) == 0u &&
      (in.precursors != nullptr) == logged &&
      detail::cooperative_launch_ok()) {
    const auto kernel = detail::fused_uniform_kernel<Kernel>(*grads.uniform_dtype(), logged);
    // Every block resident at once (a cooperative launch refuses more), at
    // least two; fewer for a list of fewer items and grains.
    const std::int64_t held = static_cast<std::int64_t>(resident_blocks(kernel, detail::step_threads)) *
                              multiprocessor_count();
    if (held >= 2) {
      detail::CheckBuffers cb = check.buffers();
      static_assert(sizeof(unsigned long long) == sizeof(std::uint64_t), "64-bit counts");
      cb.histogram = reinterpret_cast<unsigned long long*>(histogram);
      const std::int64_t grains = (grads.num_elements() + detail::step_grain - 1) / detail::step_grain;
      const std::int64_t work = std::max<std::int64_t>(chunks * cb.slices, grains);
      const unsigned grid = static_cast<unsigned>(std::max<std::int64_t>(2, std::min(work + 1, held)));
      launch_cooperative("check_and_step_kernel", kernel, grid, detail::step_threads, stream, grads.entries(),
                         grads.chunks(), chunks, cb, params.entries(), params.size(), table, schedule, in,
                         params.blocks_done(), params.prepass(), grads.chunk_offsets());
      return;
    }
  }
  check.launch(grads, stream, histogram);
  launch_step(grads, params, groups, schedule, in, stream);
}
template <class Hyper>
void launch_check_and_step(const TensorList& grads, const ParamList& params, GradCheck& check, const Hyper& hyper,
                           const optim::LRSchedule& schedule, const StepInputs& in, cudaStream_t stream = nullptr,
                           std::uint64_t* histogram = nullptr) {
  launch_check_and_step(grads, params, check, std::vector<Hyper>{hyper}, schedule, in, stream, histogram);
}

/// The step launchers of the optimizers' kernel parts, by their kKey: what
/// DevicePlan::step finds. The built-in optimizers are registered by
/// backend.cuh; a user's own by MIXPREC_REGISTER_OPTIMIZER(TheirKernel) in
/// one .cu file (after including <mixprec/cuda/backend.cuh>).
using StepLauncher = void (*)(const TensorList&, const ParamList&, const void* hypers, std::size_t count,
                              const optim::LRSchedule&, const StepInputs&, cudaStream_t);

namespace detail {
struct StepRegistry {
  std::mutex mutex;
  std::map<std::string, std::pair<StepLauncher, std::size_t>> launchers;  // launcher, sizeof(Hyper)
};
inline StepRegistry& step_registry() {
  static StepRegistry r;
  return r;
}
template <class Kernel>
void launch_erased(const TensorList& grads, const ParamList& params, const void* hypers, std::size_t count,
                   const optim::LRSchedule& schedule, const StepInputs& in, cudaStream_t stream) {
  using Hyper = typename Kernel::Hyper;
  const Hyper* h = static_cast<const Hyper*>(hypers);
  launch_step(grads, params, std::vector<Hyper>(h, h + count), schedule, in, stream);
}
}  // namespace detail

/// Makes `Kernel` (an optimizer's kernel part: Hyper, Coeffs, kKey, coeffs,
/// uses, update; see optim/family.hpp) runnable by the device step.
/// Registering the same key twice keeps the first.
template <class Kernel>
bool register_step_kernel() {
  static_assert(std::is_same<typename Kernel::Hyper::kernel, Kernel>::value,
                "Kernel::Hyper::kernel must name Kernel");
  detail::StepRegistry& r = detail::step_registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  r.launchers.emplace(Kernel::kKey, std::make_pair(&detail::launch_erased<Kernel>, sizeof(typename Kernel::Hyper)));
  return true;
}

/// The launcher registered for `key`, checked against the caller's
/// sizeof(Hyper); an error naming the key and the fix when there is none.
inline StepLauncher find_step_kernel(const char* key, std::size_t hyper_bytes) {
  detail::StepRegistry& r = detail::step_registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  const auto it = r.launchers.find(key);
  MIXPREC_CHECK(it != r.launchers.end(), "the device step has no kernel for optimizer \"", key,
                "\": add MIXPREC_REGISTER_OPTIMIZER(<its kernel struct>) to one .cu file of the program "
                "(docs/optimizers.md, \"Your own optimizer\")");
  MIXPREC_CHECK(it->second.second == hyper_bytes, "the device step's kernel for optimizer \"", key,
                "\" takes hyperparameters of ", it->second.second, " bytes, the optimizer passed ", hyper_bytes,
                "; two different kernel structs share this key");
  return it->second.first;
}

/// The end of an iteration (DeviceGradScaler::update): counts it as applied
/// or skipped by s->any_inf, updates the scale when `dynamic`, resets any_inf.
inline void launch_update_scale(amp::DeviceScalerState* s, const amp::ScalePolicy& policy, bool dynamic,
                                cudaStream_t stream = nullptr) {
  launch_dependent("update_scale_kernel", detail::update_scale_kernel, 1, 1, stream, s, policy, dynamic ? 1 : 0);
}

}  // namespace cuda
MIXPREC_NAMESPACE_END

/// Registers an optimizer's kernel part with the device step (at static
/// initialisation). One line, in one .cu file that includes
/// <mixprec/cuda/backend.cuh>, per optimizer of the program's own.
#define MIXPREC_REGISTER_OPTIMIZER_CAT2(a, b) a##b
#define MIXPREC_REGISTER_OPTIMIZER_CAT(a, b) MIXPREC_REGISTER_OPTIMIZER_CAT2(a, b)
#define MIXPREC_REGISTER_OPTIMIZER(...)                                                              \
  namespace {                                                                                        \
  [[maybe_unused]] const bool MIXPREC_REGISTER_OPTIMIZER_CAT(mixprec_registered_step_, __COUNTER__) = \
      ::mixprec::cuda::register_step_kernel<__VA_ARGS__>();                                           \
  }

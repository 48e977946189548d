// SPDX-License-Identifier: Apache-2.0
// Pass 2 of a mixed-precision step on the GPU, with the step's count: one
// launch per optimizer applies the same update formulas as the CPU path
// (optim/formulas.hpp) to every parameter of every group, reading found-inf,
// the loss scale and the clip input from device memory, and its last block
// counts the step. One launch: a step is queued whole or not at all. The
// scaler's update is a second, single-thread launch (amp/scale_update.hpp).
// Nothing here synchronises the host, so a whole step can be captured in a
// CUDA graph.
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mixprec/amp/scale_update.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/exact_float.cuh"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/cuda/multi_tensor.cuh"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/formulas.hpp"
#include "mixprec/optim/schedule.hpp"
#include "mixprec/tensor/memory.hpp"

namespace mixprec::cuda {

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

// The coefficients of one parameter's update, from the hyperparameters, its
// step count after this step and the scheduled lr: the host code of the CPU
// optimizers (optim/optimizers/*.hpp), in double, then rounded to float.
__device__ inline optim::AdamCoeffs coeffs(const AdamHyper& h, double lr, double step) {
  optim::AdamCoeffs c;
  c.decoupled = h.decoupled;
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.decay = static_cast<float>(1.0 - lr * h.weight_decay);
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.bias_correction2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(h.beta2, step)));
  c.eps = static_cast<float>(h.eps);
  c.neg_step_size = static_cast<float>(-(lr / (1.0 - ::pow(h.beta1, step))));
  c.maximize = h.maximize;
  c.amsgrad = h.amsgrad;
  return c;
}
__device__ inline optim::SgdCoeffs coeffs(const SgdHyper& h, double lr, double step) {
  optim::SgdCoeffs c;
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.momentum = static_cast<float>(h.momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - h.dampening);
  c.neg_lr = static_cast<float>(-lr);
  c.maximize = h.maximize;
  c.nesterov = h.nesterov;
  // The momentum buffer starts as a copy of the gradient.
  c.first_step = step == 1.0 || h.fresh_buffers;
  return c;
}
__device__ inline optim::RmspropCoeffs coeffs(const RmspropHyper& h, double lr, double) {
  optim::RmspropCoeffs c;
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.alpha = static_cast<float>(h.alpha);
  c.one_minus_alpha = static_cast<float>(1.0 - h.alpha);
  c.eps = static_cast<float>(h.eps);
  c.momentum = static_cast<float>(h.momentum);
  c.neg_lr = static_cast<float>(-lr);
  c.maximize = h.maximize;
  c.centered = h.centered;
  return c;
}

// One element through the shared formula, in exact_float (no contraction:
// the CPU path's bits). s0..s2 are the element's state values; `uses` says
// which ones the options read and write, so only those are loaded and
// stored.
__device__ inline void update(exact_float& p, exact_float& s0, exact_float& s1, exact_float& s2, exact_float g,
                              const optim::AdamCoeffs& c) {
  optim::adam_update(p, s0, s1, s2, g, c);
}
__device__ inline void update(exact_float& p, exact_float& s0, exact_float&, exact_float&, exact_float g,
                              const optim::SgdCoeffs& c) {
  optim::sgd_update(p, s0, g, c);
}
__device__ inline void update(exact_float& p, exact_float& s0, exact_float& s1, exact_float& s2, exact_float g,
                              const optim::RmspropCoeffs& c) {
  optim::rmsprop_update(p, s0, s1, s2, g, c);
}
__device__ inline bool uses(const optim::AdamCoeffs& c, int k) { return k < 2 || c.amsgrad; }
__device__ inline bool uses(const optim::SgdCoeffs& c, int k) { return k == 0 && c.momentum != 0.0f; }
__device__ inline bool uses(const optim::RmspropCoeffs& c, int k) {
  return k == 0 || (k == 1 && c.centered) || (k == 2 && c.momentum > 0.0f);
}

// Four consecutive elements of T, loaded or stored as one 8- or 16-byte access.
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

template <class G, class W, class C>
__device__ inline void update_one(const G* grad, W* weight, const ParamEntry& p, std::int64_t i, float inv_scale,
                                  float clip, const C& c) {
  exact_float g = mixprec::to_float(grad[i]);
  if (inv_scale != 1.0f) g = g * inv_scale;
  if (clip != 1.0f) g = g * clip;
  exact_float m = p.master[i], s[3] = {0.0f, 0.0f, 0.0f};
  for (int k = 0; k < 3; ++k) {
    if (uses(c, k)) s[k] = p.state[k][i];
  }
  update(m, s[0], s[1], s[2], g, c);
  p.master[i] = m.v;
  for (int k = 0; k < 3; ++k) {
    if (uses(c, k)) p.state[k][i] = s[k].v;
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
// for the tail, one at a time. Same arithmetic either way.
template <class G, class W, class C>
__device__ inline void update_range(const G* grad, W* weight, const ParamEntry& p, std::int64_t begin,
                                    std::int64_t end, float inv_scale, float clip, const C& c) {
  bool aligned = quad_aligned(grad + begin) && quad_aligned(weight + begin) && quad_aligned(p.master + begin);
  for (int k = 0; k < 3; ++k) aligned = aligned && (!uses(c, k) || quad_aligned(p.state[k] + begin));
  std::int64_t i = begin;
  if (aligned) {
    const std::int64_t quads = (end - begin) / 4;
    for (std::int64_t q = threadIdx.x; q < quads; q += blockDim.x) {
      const std::int64_t e = begin + 4 * q;
      const Quad<G> gq = *reinterpret_cast<const Quad<G>*>(grad + e);
      Quad<float> mq = *reinterpret_cast<const Quad<float>*>(p.master + e);
      Quad<float> sq[3];
      for (int k = 0; k < 3; ++k) {
        if (uses(c, k)) sq[k] = *reinterpret_cast<const Quad<float>*>(p.state[k] + e);
      }
      Quad<W> wq;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        exact_float g = mixprec::to_float(gq.v[j]);
        if (inv_scale != 1.0f) g = g * inv_scale;
        if (clip != 1.0f) g = g * clip;
        exact_float m = mq.v[j];
        exact_float s0 = uses(c, 0) ? sq[0].v[j] : 0.0f, s1 = uses(c, 1) ? sq[1].v[j] : 0.0f,
                    s2 = uses(c, 2) ? sq[2].v[j] : 0.0f;
        update(m, s0, s1, s2, g, c);
        mq.v[j] = m.v;
        sq[0].v[j] = s0.v;
        sq[1].v[j] = s1.v;
        sq[2].v[j] = s2.v;
        wq.v[j] = mixprec::from_float<W>(m.v);
      }
      *reinterpret_cast<Quad<float>*>(p.master + e) = mq;
      for (int k = 0; k < 3; ++k) {
        if (uses(c, k)) *reinterpret_cast<Quad<float>*>(p.state[k] + e) = sq[k];
      }
      *reinterpret_cast<Quad<W>*>(weight + e) = wq;
    }
    i = begin + 4 * quads;
  }
  for (std::int64_t k = i + threadIdx.x; k < end; k += blockDim.x) update_one(grad, weight, p, k, inv_scale, clip, c);
}

template <class G, class C>
__device__ inline void dispatch_weight(const G* grad, const ParamEntry& p, std::int64_t begin,
                                       std::int64_t end, float inv_scale, float clip, const C& c) {
  switch (p.weight_dtype) {
    case DType::float16:
      update_range(grad, static_cast<half*>(p.weight), p, begin, end, inv_scale, clip, c);
      break;
    case DType::bfloat16:
      update_range(grad, static_cast<bfloat16*>(p.weight), p, begin, end, inv_scale, clip, c);
      break;
    case DType::float32:
      update_range(grad, static_cast<float*>(p.weight), p, begin, end, inv_scale, clip, c);
      break;
  }
}

// A scheduled lr the update can use: finite, and finite as a float.
__device__ inline bool usable_lr(double lr) { return lr >= 0.0 && lr <= static_cast<double>(FLT_MAX); }

template <class Hyper>
__global__ void __launch_bounds__(step_threads)
    step_kernel(const TensorEntry* grads, const Chunk* chunks, std::int64_t num_chunks, const ParamEntry* params,
                int num_params, GroupHypers<Hyper> groups, optim::LRSchedule schedule, StepInputs in,
                unsigned int* blocks_done) {
  const bool found_inf = *in.found_inf != 0;
  const std::int64_t applied = *in.applied_steps;
  const double factor = schedule.factor(applied);
  // Every group's lr is checked before any element changes: a step with one
  // unusable lr is skipped whole (NaN fails the comparisons too).
  bool lr_ok = true;
  for (int g = 0; g < groups.count; ++g) lr_ok = lr_ok && usable_lr(groups.h[g].lr * factor);
  const bool apply = !found_inf && lr_ok;
  if (apply) {
    const float inv_scale = static_cast<float>(1.0 / (static_cast<double>(*in.scale) * in.grad_divisor));
    float clip = 1.0f;
    if (in.total_sum_squares) {
      // GradScaler::clip_grad_norm: norm of the unscaled gradients, then
      // torch's min(1, (1 / (norm + 1e-6)) * max_norm) in float.
      const float norm = static_cast<float>(::sqrt(*in.total_sum_squares) * inv_scale);
      const float coef = (1.0f / (norm + 1e-6f)) * static_cast<float>(in.max_norm);
      clip = coef < 1.0f ? coef : 1.0f;
    }
    for (std::int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
      const Chunk ch = chunks[c];
      const TensorEntry g = grads[ch.tensor];
      const ParamEntry p = params[ch.tensor];
      const Hyper& h = groups.h[p.group];
      const auto co = coeffs(h, h.lr * factor, static_cast<double>(*p.step + 1));
      switch (g.dtype) {
        case DType::float16:
          dispatch_weight(static_cast<const half*>(g.data), p, ch.begin, ch.end, inv_scale, clip, co);
          break;
        case DType::bfloat16:
          dispatch_weight(static_cast<const bfloat16*>(g.data), p, ch.begin, ch.end, inv_scale, clip, co);
          break;
        case DType::float32:
          dispatch_weight(static_cast<const float*>(g.data), p, ch.begin, ch.end, inv_scale, clip, co);
          break;
      }
    }
  }
  // The step's count, by the last block to finish: every block has read the
  // step counts and the applied count by then.
  __shared__ bool is_last;
  __syncthreads();
  __threadfence();
  if (threadIdx.x == 0) is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
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
}

// The end of an iteration: count it, update the scale, reset the flag.
__global__ void update_scale_kernel(amp::DeviceScalerState* s, amp::ScalePolicy policy, int dynamic) {
  const bool skip = s->any_inf != 0;
  std::int64_t& count = skip ? s->skipped : s->applied;
  count = amp::saturating_increment(count);
  if (dynamic) {
    amp::update_scale(s->state, skip, policy);
  } else {
    s->state.skip_streak = skip ? amp::saturating_increment(s->state.skip_streak) : 0;
  }
  if (policy.max_consecutive_skips > 0 && s->state.skip_streak == policy.max_consecutive_skips) {
    s->streak_limit_hits = amp::saturating_increment(s->streak_limit_hits);
  }
  s->any_inf = 0;
}

}  // namespace detail

/// Parameters of one optimizer in device memory (weights, fp32 masters and
/// state, step counts, groups), matched index by index to the gradients'
/// TensorList, and the step kernel's block counter. One step runs on it at
/// a time (optim::Optimizer orders its launches across streams).
class ParamList {
 public:
  explicit ParamList(const std::vector<ParamEntry>& params) : count_(static_cast<int>(params.size())) {
    MIXPREC_CUDA_CHECK(cudaGetDevice(&device_));
    counter_ = Buffer(sizeof(unsigned int), Device::cuda(device_));
    MIXPREC_CUDA_CHECK(cudaMemset(counter_.data(), 0, counter_.bytes()));
    if (params.empty()) return;
    buffer_ = Buffer(params.size() * sizeof(ParamEntry), Device::cuda(device_));
    MIXPREC_CUDA_CHECK(cudaMemcpy(buffer_.data(), params.data(), buffer_.bytes(), cudaMemcpyHostToDevice));
    for (const ParamEntry& p : params) groups_ = p.group + 1 > groups_ ? p.group + 1 : groups_;
  }
  const ParamEntry* entries() const { return static_cast<const ParamEntry*>(buffer_.data()); }
  int size() const { return count_; }
  /// 1 + the largest group index of the entries (0 when there are none).
  int groups() const { return groups_; }
  unsigned int* blocks_done() const { return static_cast<unsigned int*>(counter_.data()); }

 private:
  int count_ = 0;
  int groups_ = 0;
  int device_ = 0;
  Buffer buffer_;
  Buffer counter_;
};

/// Pass 2 and the step's count over every parameter of `params`, one
/// launch: `groups[g]` are the hyperparameters of the entries whose group is
/// g. Unless *in.found_inf or a group's scheduled lr is unusable, updates
/// every parameter, then adds one to every step count and *in.applied_steps;
/// sets *in.any_inf when *in.found_inf; counts an unusable lr in
/// *in.nonfinite_lr_steps. Asynchronous on `stream`.
template <class Hyper>
void launch_step(const TensorList& grads, const ParamList& params, const std::vector<Hyper>& groups,
                 const optim::LRSchedule& schedule, const StepInputs& in, cudaStream_t stream = nullptr) {
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
  const std::int64_t chunks = grads.num_chunks();
  const unsigned grid = chunks == 0 ? 1u : grid_for(chunks * detail::step_threads, detail::step_threads, 4);
  detail::step_kernel<Hyper><<<grid, detail::step_threads, 0, stream>>>(
      grads.entries(), grads.chunks(), chunks, params.entries(), params.size(), table, schedule, in,
      params.blocks_done());
  MIXPREC_CUDA_CHECK_LAUNCH("step_kernel");
}

/// The same with one group for every parameter.
template <class Hyper>
void launch_step(const TensorList& grads, const ParamList& params, const Hyper& hyper,
                 const optim::LRSchedule& schedule, const StepInputs& in, cudaStream_t stream = nullptr) {
  launch_step(grads, params, std::vector<Hyper>{hyper}, schedule, in, stream);
}

/// The end of an iteration (DeviceGradScaler::update): counts it as applied
/// or skipped by s->any_inf, updates the scale when `dynamic`, resets any_inf.
inline void launch_update_scale(amp::DeviceScalerState* s, const amp::ScalePolicy& policy, bool dynamic,
                                cudaStream_t stream = nullptr) {
  detail::update_scale_kernel<<<1, 1, 0, stream>>>(s, policy, dynamic ? 1 : 0);
  MIXPREC_CUDA_CHECK_LAUNCH("update_scale_kernel");
}

}  // namespace mixprec::cuda

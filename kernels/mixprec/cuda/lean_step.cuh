// SPDX-License-Identifier: Apache-2.0
// The device step of a parameter whose group keeps lean state
// (optim/state_layout.hpp): the host's Optimizer::update_elements_lean.
// Tiles of 256 elements, one 8-bit block (lean::kBlock) and eight tie-bit
// words each: every element's master and state are decoded to fp32, run
// through the optimizer's formula (in exact_float, the CPU path's
// operations) and encoded again: the 8-bit code's scale is the tile's
// largest magnitude (the same value in any order), the tie bits one bit an
// element in order, stochastic rounding (Master::none's weight,
// Moments::bf16_sr's moments: two streams) the element's own number. The
// codecs are the host's functions, so the CPU and the GPU write the same
// bits. Two ways through a range, same bits:
// - lean_range_vec (16-bit weights, gradients of their type, every array
//   16-byte aligned: the usual case; the step kernel decides), compiled
//   once per layout (master x moments: no run-time switch per element):
//   a warp takes a tile, each lane 8 consecutive elements with one vector
//   access per array (16 bytes of bf16, 8 of codes), so a thread has 8
//   elements' loads in flight; the tile's scale is a warp maximum, its tie
//   words gathered by shuffles;
// - lean_range (any types and alignment): a block takes a tile, one element
//   a thread.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/cuda/exact_float.cuh"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/state_layout.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda::detail {

inline constexpr int lean_tile = 256;
static_assert(optim::lean::kBlock == lean_tile, "a tile is one 8-bit block");
// lean_range takes a tile as one element a thread of a 256-thread block
// (the step kernel's; optimizer_step.cuh checks its block size against it).

// State value k of element e, decoded.
__device__ inline float lean_load_state(const optim::DeviceLeanState& L, const float* fp32, int k, std::int64_t e) {
  switch (L.moments) {
    case optim::Moments::fp32:
      return fp32[e];
    case optim::Moments::bf16:
    case optim::Moments::bf16_sr:
      return mixprec::to_float(static_cast<const bfloat16*>(L.packed[k])[e]);
    case optim::Moments::int8:
      return optim::lean::decode_value(static_cast<const std::uint8_t*>(L.packed[k])[e], (L.nonnegative >> k) & 1u,
                                       L.scales[k][e / optim::lean::kBlock]);
  }
  return 0.0f;
}

// The largest of the block's 256 values (every thread gets it).
__device__ inline float lean_tile_max(float v, float* warp_max) {
  for (int h = 16; h > 0; h /= 2) v = ::fmaxf(v, __shfl_xor_sync(0xffffffffu, v, h));
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  float m = 0.0f;
  for (int w = 0; w < lean_tile / 32; ++w) m = ::fmaxf(m, warp_max[w]);
  __syncthreads();  // read before the next call writes it
  return m;
}

/// Elements [begin, end) of one parameter in a lean layout; begin is a
/// multiple of 256 (chunks start at multiples of 2^16, the step kernel's
/// slices of them at multiples of 1024), and every thread of
/// the block (256) calls it alike. `pa` gathers the precursor terms (the
/// step kernel's PrecursorAcc; its `out` null: off).
template <class Kernel, class G, class W, class C, class Acc>
__device__ inline void lean_range(const G* grad, W* weight, float* master, float* const (&fp32_state)[3],
                                  const optim::DeviceLeanState& L, std::int64_t step, std::int64_t begin,
                                  std::int64_t end, float inv_scale, float clip, const C& c, Acc& pa) {
  __shared__ float warp_max[lean_tile / 32];
  const std::uint64_t key =
      optim::lean::rounding_key(L.seed, L.index, static_cast<std::uint64_t>(step));
  const std::uint64_t moments_key = optim::lean::moment_key(key);
  for (std::int64_t tile = begin; tile < end; tile += lean_tile) {
    const std::int64_t e = tile + threadIdx.x;
    const bool live = e < end;
    exact_float m = 0.0f, s[3] = {0.0f, 0.0f, 0.0f};
    if (live) {
      exact_float g = mixprec::to_float(grad[e]);
      if (inv_scale != 1.0f) g = g * inv_scale;
      if (clip != 1.0f) g = g * clip;
      if (L.master == optim::Master::fp32) {
        m = master[e];
      } else if (L.master == optim::Master::remainder) {
        if constexpr (std::is_same_v<W, bfloat16>) {
          m = optim::lean::join_master(to_bits(weight[e]), L.remainder[e], (L.tie_bits[e / 32] >> (e % 32)) & 1u);
        }
      } else {
        m = mixprec::to_float(weight[e]);
      }
      for (int k = 0; k < 3; ++k) {
        if (Kernel::uses(c, k)) s[k] = lean_load_state(L, fp32_state[k], k, e);
      }
      const float before = m.v;
      Kernel::update(m, s[0], s[1], s[2], g, c);
      if (pa.out != nullptr) pa.template add<W>(before, m.v, g.v, pa.v_state >= 0 ? s[pa.v_state].v : 0.0f);
    }
    for (int k = 0; k < 3; ++k) {
      if (!Kernel::uses(c, k)) continue;
      switch (L.moments) {
        case optim::Moments::fp32:
          if (live) fp32_state[k][e] = s[k].v;
          break;
        case optim::Moments::bf16:
          if (live) static_cast<bfloat16*>(L.packed[k])[e] = mixprec::from_float<bfloat16>(s[k].v);
          break;
        case optim::Moments::bf16_sr:
          if (live) {
            static_cast<bfloat16*>(L.packed[k])[e] = from_bits<bfloat16>(
                optim::lean::stochastic_round_bf16_bits(s[k].v, optim::lean::rounding_bits(moments_key, e)));
          }
          break;
        case optim::Moments::int8: {
          const float scale = lean_tile_max(live ? optim::lean::finite_magnitude(s[k].v) : 0.0f, warp_max);
          if (threadIdx.x == 0) L.scales[k][tile / optim::lean::kBlock] = scale;
          if (live) {
            std::uint8_t code = 0;
            optim::lean::encode_block(&s[k].v, 1, (L.nonnegative >> k) & 1u, scale, &code);
            static_cast<std::uint8_t*>(L.packed[k])[e] = code;
          }
          break;
        }
      }
    }
    switch (L.master) {
      case optim::Master::fp32:
        if (live) {
          master[e] = m.v;
          weight[e] = mixprec::from_float<W>(m.v);
        }
        break;
      case optim::Master::remainder: {
        if constexpr (std::is_same_v<W, bfloat16>) {
          const optim::lean::SplitMaster sm = optim::lean::split_master(m.v);
          if (live) {
            weight[e] = from_bits<bfloat16>(sm.weight);
            L.remainder[e] = sm.remainder;
          }
          const unsigned word = __ballot_sync(0xffffffffu, live && sm.tie_up);
          if (live && threadIdx.x % 32 == 0) L.tie_bits[e / 32] = word;
        }
        break;
      }
      case optim::Master::none:
        if (live) weight[e] = optim::lean::stochastic_round<W>(m.v, optim::lean::rounding_bits(key, e));
        break;
    }
  }
}

// Eight consecutive elements of T, moved as one access (16 bytes for 2-byte
// T, two for floats, 8 bytes of 8-bit codes).
template <class T>
struct alignas(sizeof(T) == 1 ? 8 : 16) Oct {
  T v[8];
};

// The live elements [0, n) of the eight at p: one vector access when all
// eight are live, else one at a time (n <= 0: none).
template <class T>
__device__ inline Oct<T> load_oct(const T* p, int n) {
  if (n >= 8) return *reinterpret_cast<const Oct<T>*>(p);
  Oct<T> x{};
  for (int j = 0; j < 8; ++j) {
    if (j < n) x.v[j] = p[j];
  }
  return x;
}
template <class T>
__device__ inline void store_oct(T* p, const Oct<T>& x, int n) {
  if (n >= 8) {
    *reinterpret_cast<Oct<T>*>(p) = x;
    return;
  }
  for (int j = 0; j < 8; ++j) {
    if (j < n) p[j] = x.v[j];
  }
}

template <class T>
__device__ inline bool oct_aligned(const T* p, std::int64_t begin) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p + begin) % alignof(Oct<T>) == 0;
}

/// Whether lean_range_vec may take elements [begin, ...) of this parameter:
/// every array it touches is aligned for 8-element accesses at begin (a
/// multiple of 256).
template <class G, class W>
__device__ inline bool lean_vec_ok(const G* grad, const W* weight, const float* master,
                                   float* const (&fp32_state)[3], const optim::DeviceLeanState& L,
                                   std::int64_t begin) {
  // (A remainder master needs bf16 weights: refused before any step; the
  // element-a-thread path, which stores nothing for it either, keeps it.)
  if (L.master == optim::Master::remainder && !std::is_same_v<W, bfloat16>) return false;
  bool ok = oct_aligned(grad, begin) && oct_aligned(weight, begin) && oct_aligned(L.remainder, begin);
  if (L.master == optim::Master::fp32) ok = ok && oct_aligned(master, begin);
  for (int k = 0; k < 3; ++k) {
    switch (L.moments) {
      case optim::Moments::fp32:
        ok = ok && oct_aligned(fp32_state[k], begin);
        break;
      case optim::Moments::bf16:
      case optim::Moments::bf16_sr:
        ok = ok && oct_aligned(static_cast<const bfloat16*>(L.packed[k]), begin);
        break;
      case optim::Moments::int8:
        ok = ok && oct_aligned(static_cast<const std::uint8_t*>(L.packed[k]), begin);
        break;
    }
  }
  return ok;
}

// f(table) with the 8-bit table's choice as a compile-time constant
// (decltype(table)::value: std::true_type for the nonnegative table,
// std::false_type for the signed one): one branch a tile, and each table's
// decoding or encoding without a select a value.
template <class F>
__device__ inline void with_table(bool nonnegative, F&& f) {
  if (nonnegative) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Whether the vector path touches state k: a path compiled without the
// third state (Third false; AdamW without amsgrad, RMSprop without momentum)
// never holds its 8 values, which the 128 registers of the lean kernel had
// no room for (the element loop spilled).
template <class Kernel, bool Third, class C>
__device__ inline bool lean_uses(const C& c, int k) {
  return k < optim::kernel_states_v<Kernel> && (Third || k < 2) && Kernel::uses(c, k);
}

/// lean_range's elements [begin, end), a warp a tile and 8 elements a lane
/// (see the top of this file), for the layout's master Ms and moments Mo
/// (fp32, bf16 for both bf16 and bf16_sr, or int8) fixed at compile time:
/// a thread holds only the arrays and codecs its layout has (a run-time
/// switch kept every layout's registers live at once: 128 a thread with
/// spills). Every thread of the block calls it alike, and it needs
/// lean_vec_ok. The same decoding, formula and encoding as lean_range,
/// element for element.
template <class Kernel, bool Third, optim::Master Ms, optim::Moments Mo, int Ahead = 0, class G, class W, class C,
          class Acc>
__device__ inline void lean_range_vec(const G* grad, W* weight, float* master, float* const (&state_ptrs)[3],
                                      const optim::DeviceLeanState& lean_state, std::int64_t step, std::int64_t begin,
                                      std::int64_t end, float inv_scale, float clip, const C& coeffs, Acc& pa) {
  using optim::Master;
  using optim::Moments;
  // Copies, for registers: read through the references, a use in the loop
  // may be loaded again after the loop's stores (which the compiler cannot
  // prove do not alias them). ncu counted 1.5M local-memory loads a 2^24
  // launch on an H100 that are not spills; whether these copies remove
  // them is not measured yet (docs/optimizers.md, "Third version").
  const optim::DeviceLeanState L = lean_state;
  float* const fp32_state[3] = {state_ptrs[0], state_ptrs[1], state_ptrs[2]};
  const C c = coeffs;
  const bool precursors = pa.out != nullptr;
  const int v_state = pa.v_state;
  static_assert(Mo != Moments::bf16_sr, "bf16_sr takes the bf16 instantiation (its stores look at L.moments)");
  static_assert(Ms != Master::remainder || std::is_same_v<W, bfloat16>, "a remainder master needs bf16 weights");
  // Elements a lane: V = 8, a warp's 32 lanes one block of the 8-bit code
  // (its scale a warp maximum) and one tile. 4 a lane for the other layouts,
  // fewer registers, was slower on an H100: 14.6 vs 13.0 ms for bf16
  // moments at 2^30 (docs/optimizers.md).
  constexpr int V = 8;
  static_assert(optim::lean::kBlock == 32 * V && lean_tile == 32 * V, "a warp's 32 lanes are one tile, one block");
  constexpr int warps = lean_tile / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (std::int64_t tile = begin + static_cast<std::int64_t>(threadIdx.x / 32) * lean_tile; tile < end;
       tile += warps * lean_tile) {
    if constexpr (Ahead > 0) {
      // The warp's tile Ahead rounds on, asked of L2 now: its DRAM reads
      // overlap this tile's arithmetic (two blocks an SM leave few other
      // warps to hide them).
      const std::int64_t next = tile + static_cast<std::int64_t>(Ahead) * warps * lean_tile;
      if (next < end) {
        const std::int64_t n_next = end - next < lean_tile ? end - next : lean_tile;
        prefetch_l2(grad + next, n_next * static_cast<std::int64_t>(sizeof(G)));
        if constexpr (Ms == Master::fp32) {
          prefetch_l2(master + next, n_next * 4);
        } else {
          prefetch_l2(weight + next, n_next * static_cast<std::int64_t>(sizeof(W)));
          if constexpr (Ms == Master::remainder) prefetch_l2(L.remainder + next, n_next * 2);
        }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          if (!lean_uses<Kernel, Third>(c, k)) continue;
          if constexpr (Mo == Moments::fp32) {
            prefetch_l2(fp32_state[k] + next, n_next * 4);
          } else if constexpr (Mo == Moments::bf16) {
            prefetch_l2(static_cast<const bfloat16*>(L.packed[k]) + next, n_next * 2);
          } else {
            prefetch_l2(static_cast<const std::uint8_t*>(L.packed[k]) + next, n_next);
          }
        }
      }
    }
    const std::int64_t e0 = tile + V * lane;  // this lane's first element
    const std::int64_t left = end - e0;
    const int n = left >= V ? V : (left > 0 ? static_cast<int>(left) : 0);  // its live elements
    // Every load first: V elements of each array in flight.
    const Oct<G> gq = load_oct(grad + e0, n);
    Oct<float> mq{};
    Oct<W> wq{};
    Oct<std::uint16_t> rq{};
    std::uint32_t ties = 0;
    if constexpr (Ms == Master::fp32) {
      mq = load_oct(master + e0, n);
    } else {
      wq = load_oct(weight + e0, n);
      if constexpr (Ms == Master::remainder) {
        rq = load_oct(L.remainder + e0, n);
        if (n > 0) ties = L.tie_bits[e0 / 32] >> (e0 % 32);  // this lane's V bits, lowest first
      }
    }
    Oct<float> sq[3] = {};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (!lean_uses<Kernel, Third>(c, k)) continue;
      if constexpr (Mo == Moments::fp32) {
        sq[k] = load_oct(fp32_state[k] + e0, n);
      } else if constexpr (Mo == Moments::bf16) {
        const Oct<bfloat16> b = load_oct(static_cast<const bfloat16*>(L.packed[k]) + e0, n);
#pragma unroll
        for (int j = 0; j < V; ++j) sq[k].v[j] = mixprec::to_float(b.v[j]);
      } else {
        const Oct<std::uint8_t> b = load_oct(static_cast<const std::uint8_t*>(L.packed[k]) + e0, n);
        const float scale = n > 0 ? L.scales[k][e0 / optim::lean::kBlock] : 0.0f;
        with_table((L.nonnegative >> k) & 1u, [&](auto table) {
#pragma unroll
          for (int j = 0; j < V; ++j) sq[k].v[j] = optim::lean::decode_value(b.v[j], decltype(table)::value, scale);
        });
      }
    }
    // The formula, element by element (lanes past the end compute on zeros
    // and store nothing).
#pragma unroll
    for (int j = 0; j < V; ++j) {
      exact_float g = mixprec::to_float(gq.v[j]);
      if (inv_scale != 1.0f) g = g * inv_scale;
      if (clip != 1.0f) g = g * clip;
      exact_float m = 0.0f;
      if constexpr (Ms == Master::fp32) {
        m = mq.v[j];
      } else if constexpr (Ms == Master::remainder) {
        m = optim::lean::join_master(to_bits(wq.v[j]), rq.v[j], (ties >> j) & 1u);
      } else {
        m = mixprec::to_float(wq.v[j]);
      }
      exact_float s0 = sq[0].v[j], s1 = sq[1].v[j], s2 = sq[2].v[j];
      const float before = m.v;
      Kernel::update(m, s0, s1, s2, g, c);
      if (precursors && j < n) {
        pa.template add<W>(before, m.v, g.v, v_state == 0 ? s0.v : v_state == 1 ? s1.v : s2.v);
      }
      mq.v[j] = m.v;
      sq[0].v[j] = s0.v;
      sq[1].v[j] = s1.v;
      sq[2].v[j] = s2.v;
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (!lean_uses<Kernel, Third>(c, k)) continue;
      if constexpr (Mo == Moments::fp32) {
        store_oct(fp32_state[k] + e0, sq[k], n);
      } else if constexpr (Mo == Moments::bf16) {
        Oct<bfloat16> b;
        if (L.moments == Moments::bf16_sr) {
          // Drawn here only: the key's two mixes cost nothing to the other layouts.
          const std::uint64_t moments_key = optim::lean::moment_key(
              optim::lean::rounding_key(L.seed, L.index, static_cast<std::uint64_t>(step)));
#pragma unroll
          for (int j = 0; j < V; ++j) {
            b.v[j] = from_bits<bfloat16>(optim::lean::stochastic_round_bf16_bits(
                sq[k].v[j], optim::lean::rounding_bits(moments_key, static_cast<std::uint64_t>(e0 + j))));
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) b.v[j] = mixprec::from_float<bfloat16>(sq[k].v[j]);
        }
        store_oct(static_cast<bfloat16*>(L.packed[k]) + e0, b, n);
      } else {
        float mx = 0.0f;
        bool finite = true;  // this lane's live values
#pragma unroll
        for (int j = 0; j < V; ++j) {
          mx = j < n ? ::fmaxf(mx, optim::lean::finite_magnitude(sq[k].v[j])) : mx;
          finite = finite && (j >= n || ::isfinite(sq[k].v[j]));
        }
        for (int h = 16; h > 0; h /= 2) mx = ::fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, h));
        if (lane == 0) L.scales[k][tile / optim::lean::kBlock] = mx;
        Oct<std::uint8_t> b;
        const bool nonnegative = (L.nonnegative >> k) & 1u;
        // The block's values all finite and its scale in range (the usual
        // case; the test is the warp's, so no lane diverges): the codes
        // from the scale's reciprocal, without a division or a branch a
        // value (the same codes, optim_lean_test).
        if (__all_sync(0xffffffffu, finite) && optim::lean::fast_scale(mx)) {
          const float r = __frcp_rn(mx);  // rounded to nearest whatever -prec-div says (quotient's premise)
          with_table(nonnegative, [&](auto table) {
#pragma unroll
            for (int j = 0; j < V; ++j) b.v[j] = optim::lean::encode_finite(sq[k].v[j], decltype(table)::value, mx, r);
          });
        } else {
          optim::lean::encode_block(sq[k].v, V, nonnegative, mx, b.v);
        }
        store_oct(static_cast<std::uint8_t*>(L.packed[k]) + e0, b, n);
      }
    }
    if constexpr (Ms == Master::fp32) {
      store_oct(master + e0, mq, n);
#pragma unroll
      for (int j = 0; j < V; ++j) wq.v[j] = mixprec::from_float<W>(mq.v[j]);
      store_oct(weight + e0, wq, n);
    } else if constexpr (Ms == Master::remainder) {
      std::uint32_t bits = 0;  // this lane's 8 tie bits, element e0 + j at bit j
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const optim::lean::SplitMaster sm = optim::lean::split_master(mq.v[j]);
        wq.v[j] = from_bits<bfloat16>(sm.weight);
        rq.v[j] = sm.remainder;
        if (j < n && sm.tie_up) bits |= 1u << j;
      }
      store_oct(weight + e0, wq, n);
      store_oct(L.remainder + e0, rq, n);
      // A word is 32 elements, 4 lanes: lane 4i gathers lanes 4i+1..4i+3.
      std::uint32_t word = bits;
      for (int d = 1; d < 4; ++d) word |= __shfl_down_sync(0xffffffffu, bits, d) << (8 * d);
      if (lane % 4 == 0 && n > 0) L.tie_bits[e0 / 32] = word;
    } else {
      const std::uint64_t key = optim::lean::rounding_key(L.seed, L.index, static_cast<std::uint64_t>(step));
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const std::uint32_t r = optim::lean::rounding_bits(key, static_cast<std::uint64_t>(e0 + j));
        if constexpr (std::is_same_v<W, bfloat16>) {
          // stochastic_round<bfloat16>'s bits without its division (tested equal).
          wq.v[j] = from_bits<bfloat16>(optim::lean::stochastic_round_bf16_bits(mq.v[j], r));
        } else {
          wq.v[j] = optim::lean::stochastic_round<W>(mq.v[j], r);
        }
      }
      store_oct(weight + e0, wq, n);
    }
  }
}

/// lean_range_vec for the parameter's layout (L.master, L.moments) and
/// whether its update uses a third state, the run-time choices made once a
/// range. A remainder master with other than bf16 weights is refused by the
/// optimizer before any step (lean_vec_ok sends it elsewhere).
template <class Kernel, bool Third, optim::Master Ms, class G, class W, class C, class Acc>
__device__ inline void lean_range_vec_moments(const G* grad, W* weight, float* master, float* const (&fp32_state)[3],
                                              const optim::DeviceLeanState& L, std::int64_t step, std::int64_t begin,
                                              std::int64_t end, float inv_scale, float clip, const C& c, Acc& pa) {
  switch (L.moments) {
    case optim::Moments::fp32:
      // fp32 moments with an fp32 master is the default layout, never a
      // lean parameter (StateLayout::lean()): not compiled.
      if constexpr (Ms != optim::Master::fp32) {
        lean_range_vec<Kernel, Third, Ms, optim::Moments::fp32>(grad, weight, master, fp32_state, L, step, begin,
                                                                 end, inv_scale, clip, c, pa);
      }
      break;
    case optim::Moments::bf16:
    case optim::Moments::bf16_sr:
      lean_range_vec<Kernel, Third, Ms, optim::Moments::bf16>(grad, weight, master, fp32_state, L, step, begin, end,
                                                               inv_scale, clip, c, pa);
      break;
    case optim::Moments::int8:
      lean_range_vec<Kernel, Third, Ms, optim::Moments::int8>(grad, weight, master, fp32_state, L, step, begin, end,
                                                               inv_scale, clip, c, pa);
      break;
  }
}

template <class Kernel, bool Third, class G, class W, class C, class Acc>
__device__ inline void lean_range_vec_master(const G* grad, W* weight, float* master, float* const (&fp32_state)[3],
                                             const optim::DeviceLeanState& L, std::int64_t step, std::int64_t begin,
                                             std::int64_t end, float inv_scale, float clip, const C& c, Acc& pa) {
  switch (L.master) {
    case optim::Master::fp32:
      lean_range_vec_moments<Kernel, Third, optim::Master::fp32>(grad, weight, master, fp32_state, L, step, begin,
                                                                 end, inv_scale, clip, c, pa);
      break;
    case optim::Master::remainder:
      if constexpr (std::is_same_v<W, bfloat16>) {
        lean_range_vec_moments<Kernel, Third, optim::Master::remainder>(grad, weight, master, fp32_state, L, step,
                                                                        begin, end, inv_scale, clip, c, pa);
      }
      break;
    case optim::Master::none:
      lean_range_vec_moments<Kernel, Third, optim::Master::none>(grad, weight, master, fp32_state, L, step, begin,
                                                                 end, inv_scale, clip, c, pa);
      break;
  }
}

// Not inlined: a call of its own (once a range of >= 1024 elements) gives
// the vector path a register allocation of its own, which ptxas reports
// without spills; inlined, the step kernel's other paths (fp32 state in the
// same launch, the element-a-thread lean path) share its pressure. Measured
// on an H100: the same time as inlined (12.8 vs 13.0 ms, bf16 moments at
// 2^30).
template <class Kernel, class G, class W, class C, class Acc>
__device__ __noinline__ void lean_range_vec_any(const G* grad, W* weight, float* master, float* const (&fp32_state)[3],
                                          const optim::DeviceLeanState& L, std::int64_t step, std::int64_t begin,
                                          std::int64_t end, float inv_scale, float clip, const C& c, Acc& pa) {
  if constexpr (optim::kernel_states_v<Kernel> > 2) {
    if (Kernel::uses(c, 2)) {
      lean_range_vec_master<Kernel, true>(grad, weight, master, fp32_state, L, step, begin, end, inv_scale, clip, c,
                                          pa);
      return;
    }
  }
  lean_range_vec_master<Kernel, false>(grad, weight, master, fp32_state, L, step, begin, end, inv_scale, clip, c, pa);
}

}  // namespace cuda::detail
MIXPREC_NAMESPACE_END

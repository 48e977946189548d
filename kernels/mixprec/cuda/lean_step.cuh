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
//   16-byte aligned: the usual case; the step kernel decides): a warp
//   takes a tile, each lane 8 consecutive elements with one vector access
//   per array (16 bytes of bf16, 8 of codes), so a thread has 8 elements'
//   loads in flight; the tile's scale is a warp maximum, its tie words
//   gathered by shuffles;
// - lean_range (any types and alignment): a block takes a tile, one element
//   a thread.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/cuda/exact_float.cuh"
#include "mixprec/optim/device_backend.hpp"
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

/// lean_range's elements [begin, end), a warp a tile and 8 elements a lane
/// (see the top of this file); every thread of the block calls it alike,
/// and it needs lean_vec_ok. The same decoding, formula and encoding as
/// lean_range, element for element.
template <class Kernel, class G, class W, class C, class Acc>
__device__ inline void lean_range_vec(const G* grad, W* weight, float* master, float* const (&fp32_state)[3],
                                      const optim::DeviceLeanState& L, std::int64_t step, std::int64_t begin,
                                      std::int64_t end, float inv_scale, float clip, const C& c, Acc& pa) {
  constexpr int warps = lean_tile / 32;
  static_assert(optim::lean::kBlock == 32 * 8, "a warp's 32 lanes of 8 elements are one 8-bit block");
  const std::uint64_t key = optim::lean::rounding_key(L.seed, L.index, static_cast<std::uint64_t>(step));
  const std::uint64_t moments_key = optim::lean::moment_key(key);
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (std::int64_t tile = begin + static_cast<std::int64_t>(threadIdx.x / 32) * lean_tile; tile < end;
       tile += warps * lean_tile) {
    const std::int64_t e0 = tile + 8 * lane;  // this lane's first element
    const std::int64_t left = end - e0;
    const int n = left >= 8 ? 8 : (left > 0 ? static_cast<int>(left) : 0);  // its live elements
    // Every load first: 8 elements of each array in flight.
    const Oct<G> gq = load_oct(grad + e0, n);
    Oct<float> mq{};
    Oct<W> wq{};
    Oct<std::uint16_t> rq{};
    std::uint32_t ties = 0;
    if (L.master == optim::Master::fp32) {
      mq = load_oct(master + e0, n);
    } else {
      wq = load_oct(weight + e0, n);
      if (L.master == optim::Master::remainder) {
        rq = load_oct(L.remainder + e0, n);
        if (n > 0) ties = L.tie_bits[e0 / 32] >> (e0 % 32);  // this lane's 8 bits, lowest first
      }
    }
    Oct<float> sq[3] = {};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (!Kernel::uses(c, k)) continue;
      switch (L.moments) {
        case optim::Moments::fp32:
          sq[k] = load_oct(fp32_state[k] + e0, n);
          break;
        case optim::Moments::bf16:
        case optim::Moments::bf16_sr: {
          const Oct<bfloat16> b = load_oct(static_cast<const bfloat16*>(L.packed[k]) + e0, n);
#pragma unroll
          for (int j = 0; j < 8; ++j) sq[k].v[j] = mixprec::to_float(b.v[j]);
          break;
        }
        case optim::Moments::int8: {
          const Oct<std::uint8_t> b = load_oct(static_cast<const std::uint8_t*>(L.packed[k]) + e0, n);
          const float scale = n > 0 ? L.scales[k][e0 / optim::lean::kBlock] : 0.0f;
          const bool nonnegative = (L.nonnegative >> k) & 1u;
#pragma unroll
          for (int j = 0; j < 8; ++j) sq[k].v[j] = optim::lean::decode_value(b.v[j], nonnegative, scale);
          break;
        }
      }
    }
    // The formula, element by element (lanes past the end compute on zeros
    // and store nothing).
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      exact_float g = mixprec::to_float(gq.v[j]);
      if (inv_scale != 1.0f) g = g * inv_scale;
      if (clip != 1.0f) g = g * clip;
      exact_float m = 0.0f;
      if (L.master == optim::Master::fp32) {
        m = mq.v[j];
      } else if (L.master == optim::Master::remainder) {
        if constexpr (std::is_same_v<W, bfloat16>) {
          m = optim::lean::join_master(to_bits(wq.v[j]), rq.v[j], (ties >> j) & 1u);
        }
      } else {
        m = mixprec::to_float(wq.v[j]);
      }
      exact_float s0 = sq[0].v[j], s1 = sq[1].v[j], s2 = sq[2].v[j];
      const float before = m.v;
      Kernel::update(m, s0, s1, s2, g, c);
      if (pa.out != nullptr && j < n) {
        pa.template add<W>(before, m.v, g.v, pa.v_state == 0 ? s0.v : pa.v_state == 1 ? s1.v : s2.v);
      }
      mq.v[j] = m.v;
      sq[0].v[j] = s0.v;
      sq[1].v[j] = s1.v;
      sq[2].v[j] = s2.v;
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (!Kernel::uses(c, k)) continue;
      switch (L.moments) {
        case optim::Moments::fp32:
          store_oct(fp32_state[k] + e0, sq[k], n);
          break;
        case optim::Moments::bf16: {
          Oct<bfloat16> b;
#pragma unroll
          for (int j = 0; j < 8; ++j) b.v[j] = mixprec::from_float<bfloat16>(sq[k].v[j]);
          store_oct(static_cast<bfloat16*>(L.packed[k]) + e0, b, n);
          break;
        }
        case optim::Moments::bf16_sr: {
          Oct<bfloat16> b;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            b.v[j] = from_bits<bfloat16>(optim::lean::stochastic_round_bf16_bits(
                sq[k].v[j], optim::lean::rounding_bits(moments_key, static_cast<std::uint64_t>(e0 + j))));
          }
          store_oct(static_cast<bfloat16*>(L.packed[k]) + e0, b, n);
          break;
        }
        case optim::Moments::int8: {
          float mx = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j) mx = j < n ? ::fmaxf(mx, optim::lean::finite_magnitude(sq[k].v[j])) : mx;
          for (int h = 16; h > 0; h /= 2) mx = ::fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, h));
          if (lane == 0) L.scales[k][tile / optim::lean::kBlock] = mx;
          Oct<std::uint8_t> b;
          optim::lean::encode_block(sq[k].v, 8, (L.nonnegative >> k) & 1u, mx, b.v);
          store_oct(static_cast<std::uint8_t*>(L.packed[k]) + e0, b, n);
          break;
        }
      }
    }
    switch (L.master) {
      case optim::Master::fp32: {
        store_oct(master + e0, mq, n);
#pragma unroll
        for (int j = 0; j < 8; ++j) wq.v[j] = mixprec::from_float<W>(mq.v[j]);
        store_oct(weight + e0, wq, n);
        break;
      }
      case optim::Master::remainder: {
        if constexpr (std::is_same_v<W, bfloat16>) {
          std::uint32_t bits = 0;  // this lane's 8 tie bits, element e0 + j at bit j
#pragma unroll
          for (int j = 0; j < 8; ++j) {
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
        }
        break;
      }
      case optim::Master::none: {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          wq.v[j] = optim::lean::stochastic_round<W>(
              mq.v[j], optim::lean::rounding_bits(key, static_cast<std::uint64_t>(e0 + j)));
        }
        store_oct(weight + e0, wq, n);
        break;
      }
    }
  }
}

}  // namespace cuda::detail
MIXPREC_NAMESPACE_END

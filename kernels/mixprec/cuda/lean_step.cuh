// SPDX-License-Identifier: Apache-2.0
// The device step of a parameter whose group keeps lean state
// (optim/state_layout.hpp): the host's Optimizer::update_elements_lean, one
// element a thread. A block takes its chunk in tiles of 256 elements, one
// 8-bit block (lean::kBlock) and eight tie-bit words each: every thread
// decodes its element's master and state to fp32, runs the optimizer's
// formula (in exact_float, the CPU path's operations), and the tile encodes
// them again: the 8-bit code's scale is the tile's largest magnitude (a
// shared-memory maximum: the same value in any order), the tie bits a warp
// ballot, stochastic rounding (Master::none's weight, Moments::bf16_sr's
// moments: two streams) the element's own number. The codecs are the
// host's functions, so the CPU and the GPU write the same bits.
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

}  // namespace cuda::detail
MIXPREC_NAMESPACE_END

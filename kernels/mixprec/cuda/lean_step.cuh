// SPDX-License-Identifier: Apache-2.0
// The device step of a parameter whose group keeps lean state
// (optim/state_layout.hpp): the host's Optimizer::update_elements_lean, one
// element a thread. A block takes its chunk in tiles of 256 elements, one
// 8-bit block (lean::kBlock) and eight tie-bit words each: every thread
// decodes its element's master and state to fp32, runs the optimizer's
// formula (in exact_float, the CPU path's operations), and the tile encodes
// them again: the 8-bit code's scale is the tile's largest magnitude (a
// shared-memory maximum: the same value in any order), the tie bits a warp
// ballot, stochastic rounding the element's own number. The codecs are the
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

/// Tiles a thread works on at once in lean_range: their loads are all in
/// flight before the first update (one tile at a time left the step
/// latency-bound: 15-20% of copy bandwidth on an H200).
inline constexpr int lean_tiles_at_once = 4;

/// Elements [begin, end) of one parameter in a lean layout; begin is a
/// multiple of 256 (chunks and their slices start at multiples of 1024),
/// and every thread of the block (256) calls it alike. `pa` gathers the
/// precursor terms (the step kernel's PrecursorAcc; its `out` null: off).
/// Tiles are taken lean_tiles_at_once at a time, each as before: the same
/// operations on every element, the same scales and tie words.
template <class Kernel, class G, class W, class C, class Acc>
__device__ inline void lean_range(const G* grad, W* weight, float* master, float* const (&fp32_state)[3],
                                  const optim::DeviceLeanState& L, std::int64_t step, std::int64_t begin,
                                  std::int64_t end, float inv_scale, float clip, const C& c, Acc& pa) {
  constexpr int U = lean_tiles_at_once;
  __shared__ float warp_max[lean_tile / 32];
  const std::uint64_t key =
      optim::lean::rounding_key(L.seed, L.index, static_cast<std::uint64_t>(step));
  for (std::int64_t first = begin; first < end; first += U * lean_tile) {
    std::int64_t e[U];
    bool live[U];
    exact_float m[U], s[U][3], g[U];
    // Loads of all U tiles.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      e[u] = first + u * lean_tile + threadIdx.x;
      live[u] = e[u] < end;
      m[u] = 0.0f;
      for (int k = 0; k < 3; ++k) s[u][k] = 0.0f;
      g[u] = 0.0f;
      if (!live[u]) continue;
      g[u] = mixprec::to_float(grad[e[u]]);
      if (L.master == optim::Master::fp32) {
        m[u] = master[e[u]];
      } else if (L.master == optim::Master::remainder) {
        if constexpr (std::is_same_v<W, bfloat16>) {
          m[u] = optim::lean::join_master(to_bits(weight[e[u]]), L.remainder[e[u]],
                                          (L.tie_bits[e[u] / 32] >> (e[u] % 32)) & 1u);
        }
      } else {
        m[u] = mixprec::to_float(weight[e[u]]);
      }
      for (int k = 0; k < 3; ++k) {
        if (Kernel::uses(c, k)) s[u][k] = lean_load_state(L, fp32_state[k], k, e[u]);
      }
    }
    // The updates, tile after tile (the precursors' order of old).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!live[u]) continue;
      exact_float gu = g[u];
      if (inv_scale != 1.0f) gu = gu * inv_scale;
      if (clip != 1.0f) gu = gu * clip;
      const float before = m[u].v;
      Kernel::update(m[u], s[u][0], s[u][1], s[u][2], gu, c);
      if (pa.out != nullptr) pa.template add<W>(before, m[u].v, gu.v, pa.v_state >= 0 ? s[u][pa.v_state].v : 0.0f);
    }
    // The stores. A tile wholly past `end` has no 8-bit block or tie word
    // to write (the whole block agrees on that, so its syncs stay uniform).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const std::int64_t tile = first + u * lean_tile;
      if (tile >= end) break;
      for (int k = 0; k < 3; ++k) {
        if (!Kernel::uses(c, k)) continue;
        switch (L.moments) {
          case optim::Moments::fp32:
            if (live[u]) fp32_state[k][e[u]] = s[u][k].v;
            break;
          case optim::Moments::bf16:
            if (live[u]) static_cast<bfloat16*>(L.packed[k])[e[u]] = mixprec::from_float<bfloat16>(s[u][k].v);
            break;
          case optim::Moments::int8: {
            const float scale =
                lean_tile_max(live[u] ? optim::lean::finite_magnitude(s[u][k].v) : 0.0f, warp_max);
            if (threadIdx.x == 0) L.scales[k][tile / optim::lean::kBlock] = scale;
            if (live[u]) {
              std::uint8_t code = 0;
              optim::lean::encode_block(&s[u][k].v, 1, (L.nonnegative >> k) & 1u, scale, &code);
              static_cast<std::uint8_t*>(L.packed[k])[e[u]] = code;
            }
            break;
          }
        }
      }
      switch (L.master) {
        case optim::Master::fp32:
          if (live[u]) {
            master[e[u]] = m[u].v;
            weight[e[u]] = mixprec::from_float<W>(m[u].v);
          }
          break;
        case optim::Master::remainder: {
          if constexpr (std::is_same_v<W, bfloat16>) {
            const optim::lean::SplitMaster sm = optim::lean::split_master(m[u].v);
            if (live[u]) {
              weight[e[u]] = from_bits<bfloat16>(sm.weight);
              L.remainder[e[u]] = sm.remainder;
            }
            const unsigned word = __ballot_sync(0xffffffffu, live[u] && sm.tie_up);
            if (live[u] && threadIdx.x % 32 == 0) L.tie_bits[e[u] / 32] = word;
          }
          break;
        }
        case optim::Master::none:
          if (live[u]) weight[e[u]] = optim::lean::stochastic_round<W>(m[u].v, optim::lean::rounding_bits(key, e[u]));
          break;
      }
    }
  }
}

}  // namespace cuda::detail
MIXPREC_NAMESPACE_END

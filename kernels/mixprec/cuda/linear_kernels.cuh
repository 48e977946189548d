// SPDX-License-Identifier: Apache-2.0
// mixprec's own kernels for narrow Linear layers (at most kNarrowOut
// outputs, a classifier's last layer), where cuBLASLt's GEMMs cost a step
// most per FLOP: on an H100 the MLP example's 1024 -> 10 layer took 7.7 us
// forward (a split-K GEMM and its reduction) and 12.3 us for its weight and
// bias gradients (a 4-block GEMM) for 5 MFLOP each (docs/performance.md).
// These spread the work over batch rows (forward) or input features
// (gradients) instead of output columns.
// Every sum runs in float in an order fixed by the shape, so a step's bits
// do not depend on the device's scheduling or on a graph replay.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {
namespace nn_detail {

/// The widest layer (outputs) the narrow kernels take.
inline constexpr int kNarrowOut = 16;
/// Forward: batch rows a block (kNarrowRows * kNarrowOut sums = 32, one a
/// lane after warp_reduce_scatter) and threads a block (its warps split the
/// features).
inline constexpr int kNarrowRows = 2;
inline constexpr int kNarrowForwardThreads = 256;
/// Gradients: input features a lane and warps a block (each warp a slice of
/// the batch rows, summed over the warps in a fixed tree).
inline constexpr int kNarrowFeatures = 2;
inline constexpr int kNarrowGradWarps = 16;

/// Whether a Linear layer's shape and pointers suit the narrow kernels: at
/// most kNarrowOut outputs, `in` a multiple of 4, and the arrays read or
/// written in packs (x and w forward, x and grad_w backward) aligned for
/// 4 elements (grad_w needs 2; one rule for both). Others take cuBLASLt.
inline bool narrow_linear_fits(std::int64_t in, std::int64_t out, std::size_t elem_bytes,
                               std::initializer_list<const void*> arrays) {
  if (out < 1 || out > kNarrowOut || in < 4 || in % 4 != 0) return false;
  for (const void* p : arrays) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % (4 * elem_bytes) != 0) return false;
  }
  return true;
}

// v[0..32) on every lane in; out: each lane's v[0] is the warp's sum of
// v[lane] (a reduce-scatter: 31 shuffles for 32 sums, not 160). At the
// round of width h a lane keeps the half of its pairs (k, k + h) that its
// bit h names and receives that half from lane ^ h; after the five rounds
// lane L holds index L's sum. The order is fixed: the same bits every run.
__device__ inline float warp_reduce_scatter(float (&v)[32]) {
  const unsigned lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 16; h >= 1; h /= 2) {
    const bool upper = (lane & static_cast<unsigned>(h)) != 0;
#pragma unroll
    for (int k = 0; k < h; ++k) {
      const float send = upper ? v[k] : v[k + h];
      const float keep = upper ? v[k + h] : v[k];
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, h);
    }
  }
  return v[0];
}

template <class T>
__device__ inline void load4(const T* p, float (&f)[4]) {
  const Pack<T, 4> v = *reinterpret_cast<const Pack<T, 4>*>(p);
#pragma unroll
  for (int j = 0; j < 4; ++j) f[j] = mixprec::to_float(v.v[j]);
}

// y[b, o] = act(sum_i x[b, i] w[o, i] + bias[o]) for o < out <= kNarrowOut
// (x [batch, in], w [out, in], y [batch, out], row-major; bias may be null;
// act none or relu). A block takes kNarrowRows rows and its warps split the
// features into equal segments (a multiple of 4 long): each lane 4
// consecutive features a round (one 8-byte load of each row of x and of w
// for 16-bit types), the warp's 32 partial sums reduce-scattered, then
// summed over the warps in order by warp 0, lane L writing row L / 16,
// output L % 16. Many short warps, not a few long ones: a warp that walked
// all of `in` alone spent the kernel waiting on its loads. in % 4 == 0 and
// 4-element alignment (narrow_linear_fits).
template <class T>
__global__ void __launch_bounds__(kNarrowForwardThreads)
    narrow_linear_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                 T* __restrict__ y, std::int64_t batch, std::int64_t in, int out,
                                 nn::Activation act) {
  static_assert(kNarrowRows * kNarrowOut == 32, "one sum a lane");
  constexpr int warps = kNarrowForwardThreads / 32;
  __shared__ float partial[warps][32];
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * kNarrowRows;
  const std::int64_t rows = batch - row0 < kNarrowRows ? batch - row0 : kNarrowRows;
  const std::int64_t segment = (in / 4 + warps - 1) / warps * 4;
  const std::int64_t first = warp * segment, last = first + segment < in ? first + segment : in;
  float acc[32] = {};  // acc[r * kNarrowOut + o]
#pragma unroll 2
  for (std::int64_t i = first + 4 * lane; i < last; i += 128) {
    float xv[kNarrowRows][4];
#pragma unroll
    for (int r = 0; r < kNarrowRows; ++r) {
      if (r < rows) {
        load4(x + (row0 + r) * in + i, xv[r]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[r][j] = 0.0f;
      }
    }
#pragma unroll
    for (int o = 0; o < kNarrowOut; ++o) {
      if (o < out) {
        float wv[4];
        load4(w + o * in + i, wv);
#pragma unroll
        for (int r = 0; r < kNarrowRows; ++r) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[r * kNarrowOut + o] = fmaf(xv[r][j], wv[j], acc[r * kNarrowOut + o]);
        }
      }
    }
  }
  partial[warp][lane] = warp_reduce_scatter(acc);
  __syncthreads();
  if (warp != 0) return;
  float sum = 0;
#pragma unroll
  for (int k = 0; k < warps; ++k) sum += partial[k][lane];
  const int r = lane / kNarrowOut, o = lane % kNarrowOut;
  if (r < rows && o < out) {
    const float b = bias != nullptr ? mixprec::to_float(bias[o]) : 0.0f;
    y[(row0 + r) * out + o] = mixprec::from_float<T>(nn::fn::activate(act, sum + b));
  }
}

// gw[o, i] = sum_b dz[b, o] x[b, i] and, when gb is not null, gb[o] =
// sum_b dz[b, o], for o < out <= kNarrowOut (x [batch, in], dz [batch, out],
// gw [out, in], row-major). Block j takes features [64 j, 64 j + 64), two a
// lane; its warps split the batch rows into contiguous slices, each warp
// staging 32 rows of dz at a time in shared memory as float (read back as
// broadcasts), and the warps' sums meet in a fixed tree. Block 0 also sums
// dz's columns for gb (each warp its rows, then the warps in order). in % 4 == 0 and 4-element alignment
// (narrow_linear_fits).
template <class T>
__global__ void __launch_bounds__(kNarrowGradWarps * 32)
    narrow_linear_wgrad_kernel(const T* __restrict__ x, const T* __restrict__ dz, T* __restrict__ gw,
                               T* __restrict__ gb, std::int64_t batch, std::int64_t in, int out) {
  constexpr int kSums = kNarrowFeatures * kNarrowOut;  // 32 a lane
  // Staging: a warp's 32 rows x kNarrowOut floats; then the tree's half of
  // the warps' sums (kNarrowGradWarps / 2 x kSums x 32 floats): 32 KB each.
  static_assert(kNarrowGradWarps * 32 * kNarrowOut == kNarrowGradWarps / 2 * kSums * 32, "one buffer for both");
  __shared__ __align__(16) float shared[kNarrowGradWarps * 32 * kNarrowOut];
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * (32 * kNarrowFeatures) + kNarrowFeatures * lane;
  const bool has_features = i < in;  // in is even: both or neither
  const bool sums_bias = gb != nullptr && blockIdx.x == 0;
  const std::int64_t per_warp = (batch + kNarrowGradWarps - 1) / kNarrowGradWarps;
  const std::int64_t first = warp * per_warp;
  const std::int64_t last = first + per_warp < batch ? first + per_warp : batch;
  float acc[kSums] = {};  // acc[f * kNarrowOut + o]
  float bias_sum = 0;     // block 0, lane o < kNarrowOut: column o of dz over the warp's rows
  float* stage = shared + warp * 32 * kNarrowOut;
  for (std::int64_t b0 = first; b0 < last; b0 += 32) {
    const std::int64_t rows = last - b0 < 32 ? last - b0 : 32;
    // Lane l stages row b0 + l (zeros past the slice and past out).
    {
      float d[kNarrowOut];
#pragma unroll
      for (int o = 0; o < kNarrowOut; ++o) {
        d[o] = lane < rows && o < out ? mixprec::to_float(dz[(b0 + lane) * out + o]) : 0.0f;
      }
#pragma unroll
      for (int o = 0; o < kNarrowOut; o += 4) {
        *reinterpret_cast<float4*>(stage + lane * kNarrowOut + o) = make_float4(d[o], d[o + 1], d[o + 2], d[o + 3]);
      }
    }
    __syncwarp();
    if (sums_bias && lane < kNarrowOut) {
      for (int r = 0; r < rows; ++r) bias_sum += stage[r * kNarrowOut + lane];
    }
    if (has_features) {
      // kGroup rows' loads issued before any is used: a warp waits on
      // memory once a group, not once a row.
      constexpr int kGroup = 8;
      for (int g = 0; g < rows; g += kGroup) {
        Pack<T, kNarrowFeatures> xv[kGroup];
#pragma unroll
        for (int r = 0; r < kGroup; ++r) {
          if (g + r < rows) xv[r] = *reinterpret_cast<const Pack<T, kNarrowFeatures>*>(x + (b0 + g + r) * in + i);
        }
#pragma unroll
        for (int r = 0; r < kGroup; ++r) {
          if (g + r >= rows) break;
          float xf[kNarrowFeatures];
#pragma unroll
          for (int f = 0; f < kNarrowFeatures; ++f) xf[f] = mixprec::to_float(xv[r].v[f]);
#pragma unroll
          for (int o = 0; o < kNarrowOut; o += 4) {
            const float4 d = *reinterpret_cast<const float4*>(stage + (g + r) * kNarrowOut + o);
#pragma unroll
            for (int f = 0; f < kNarrowFeatures; ++f) {
              acc[f * kNarrowOut + o] = fmaf(xf[f], d.x, acc[f * kNarrowOut + o]);
              acc[f * kNarrowOut + o + 1] = fmaf(xf[f], d.y, acc[f * kNarrowOut + o + 1]);
              acc[f * kNarrowOut + o + 2] = fmaf(xf[f], d.z, acc[f * kNarrowOut + o + 2]);
              acc[f * kNarrowOut + o + 3] = fmaf(xf[f], d.w, acc[f * kNarrowOut + o + 3]);
            }
          }
        }
      }
    }
    __syncwarp();  // the stage is written again next round
  }
  // The warps' sums: the upper half of the warps hands its sums to the
  // lower half, halving until warp 0 holds the block's (a fixed tree).
  for (int half = kNarrowGradWarps / 2; half >= 1; half /= 2) {
    __syncthreads();  // the stage (or the last round's sums) is read by now
    if (warp >= half && warp < 2 * half) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) shared[((warp - half) * kSums + k) * 32 + lane] = acc[k];
    }
    __syncthreads();
    if (warp < half) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) acc[k] += shared[(warp * kSums + k) * 32 + lane];
    }
  }
  if (warp == 0 && has_features) {
#pragma unroll
    for (int o = 0; o < kNarrowOut; ++o) {
      if (o < out) {
        Pack<T, kNarrowFeatures> g;
#pragma unroll
        for (int f = 0; f < kNarrowFeatures; ++f) g.v[f] = mixprec::from_float<T>(acc[f * kNarrowOut + o]);
        *reinterpret_cast<Pack<T, kNarrowFeatures>*>(gw + o * in + i) = g;
      }
    }
  }
  if (sums_bias) {
    __syncthreads();  // the tree's last reads are done
    if (lane < kNarrowOut) shared[warp * kNarrowOut + lane] = bias_sum;
    __syncthreads();
    if (threadIdx.x < static_cast<unsigned>(out)) {
      float s = 0;
      for (int k = 0; k < kNarrowGradWarps; ++k) s += shared[k * kNarrowOut + threadIdx.x];
      gb[threadIdx.x] = mixprec::from_float<T>(s);
    }
  }
}

/// The narrow Linear forward (narrow_linear_forward_kernel). Asynchronous on
/// `stream`; launch errors throw.
template <class T>
void launch_narrow_linear_forward(const T* x, const T* w, const T* bias, T* y, std::int64_t batch, std::int64_t in,
                                  int out, nn::Activation act, cudaStream_t stream) {
  if (batch == 0) return;
  const std::int64_t blocks = (batch + kNarrowRows - 1) / kNarrowRows;
  narrow_linear_forward_kernel<T><<<static_cast<unsigned>(blocks), kNarrowForwardThreads, 0, stream>>>(
      x, w, bias, y, batch, in, out, act);
  MIXPREC_CUDA_CHECK_LAUNCH("narrow_linear_forward_kernel");
}

/// The narrow Linear weight and bias gradients (narrow_linear_wgrad_kernel;
/// gb may be null). Asynchronous on `stream`; launch errors throw.
template <class T>
void launch_narrow_linear_wgrad(const T* x, const T* dz, T* gw, T* gb, std::int64_t batch, std::int64_t in, int out,
                                cudaStream_t stream) {
  const std::int64_t blocks = (in + 32 * kNarrowFeatures - 1) / (32 * kNarrowFeatures);
  narrow_linear_wgrad_kernel<T><<<static_cast<unsigned>(blocks), kNarrowGradWarps * 32, 0, stream>>>(
      x, dz, gw, gb, batch, in, out);
  MIXPREC_CUDA_CHECK_LAUNCH("narrow_linear_wgrad_kernel");
}

}  // namespace nn_detail
}  // namespace cuda
MIXPREC_NAMESPACE_END

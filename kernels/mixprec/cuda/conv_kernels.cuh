// SPDX-License-Identifier: Apache-2.0
// mixprec's own kernels for the convolution layers (NCHW), where cuDNN's
// calls cost a step most (measured in docs/performance.md, "The CNN step"):
// - max pooling, forward and backward, with the CPU layer's rule bit for
//   bit (the first maximum of a window wins, a NaN before any number);
// - a convolution's bias and ReLU on its output in one pass, and on the way
//   back the ReLU's derivative applied while the bias gradient is summed;
// - a direct convolution for layers with few taps a filter (c * r * s <=
//   kDirectTaps, a network's first layer on 1- or 3-channel images): the
//   forward with its bias and ReLU, and the weight and bias gradients in
//   one read of dy (cuDNN ran 28 us and 69 us for these on an H100, most of
//   it transposes and a 46-block split-K kernel).
// Every sum runs in float in an order fixed by the shape, so a step's bits
// do not depend on the device's scheduling or on a graph replay.
#pragma once

#include <cstdint>

#include "mixprec/core/convert.hpp"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {
namespace nn_detail {

// --- bias and activation -----------------------------------------------------

// The bias gradient's split over images: a block sums about 8192 elements
// of one channel. It depends on the shape alone, so the bits do not depend
// on the device.
inline std::int64_t conv_bias_images_per_split(std::int64_t n, std::int64_t pq) {
  constexpr std::int64_t target = 8192;  // elements a block, about 16 KB of 16-bit data
  const std::int64_t images = pq >= target ? 1 : target / pq;
  return images < n ? images : (n > 0 ? n : 1);
}

// y[n, c, pixel] = act(y + bias[c]) in float, rounded to T, V elements a
// thread (pq % V == 0, so a pack never spans two channels). bias may be null.
template <class T, int V>
__global__ void conv_bias_act_kernel(T* y, const T* bias, std::int64_t k, std::int64_t pq, std::int64_t total,
                                     nn::Activation act) {
  const std::int64_t packs = total / V, stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  Pack<T, V>* p = reinterpret_cast<Pack<T, V>*>(y);
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += stride) {
    const float b = bias != nullptr ? mixprec::to_float(bias[(i * V / pq) % k]) : 0.0f;
    Pack<T, V> v = p[i];
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = mixprec::from_float<T>(nn::fn::activate(act, mixprec::to_float(v.v[j]) + b));
    p[i] = v;
  }
}

// Block (c, s) sums channel c of dz over images [s * per, (s + 1) * per)
// into partials[c * splits + s], where dz = dy, or with a ReLU (y its
// output, not null) dz = dy * relu'(y), which it also writes to dz_out
// when that is not null (for cuDNN's weight and input gradients). Each
// thread walks its (image, pixel) pairs by increments: one division per
// thread, not one per element.
template <class T>
__global__ void conv_bias_partial_kernel(const T* dy, const T* y, T* dz_out, std::int64_t n, std::int64_t k,
                                         std::int64_t pq, std::int64_t per_split, float* partials) {
  __shared__ float warp_sums[block_threads / 32];
  const std::int64_t channel = blockIdx.x, split = blockIdx.y;
  const std::int64_t first = split * per_split;
  const std::int64_t last = first + per_split < n ? first + per_split : n;
  const std::int64_t count = (last - first) * pq;
  const std::int64_t step_images = blockDim.x / pq, step_pixels = blockDim.x % pq;
  std::int64_t image = first + threadIdx.x / pq, pixel = threadIdx.x % pq;
  float s = 0;
  for (std::int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const std::int64_t at = (image * k + channel) * pq + pixel;
    float g = mixprec::to_float(dy[at]);
    if (y != nullptr) {
      g *= nn::fn::relu_grad_from_output(mixprec::to_float(y[at]));  // dy * 0 or dy * 1: exact in T
      if (dz_out != nullptr) dz_out[at] = mixprec::from_float<T>(g);
    }
    s += g;
    image += step_images;
    pixel += step_pixels;
    if (pixel >= pq) {
      pixel -= pq;
      ++image;
    }
  }
  const float total = block_sum_in_order(s, warp_sums);
  if (threadIdx.x == 0) partials[channel * gridDim.y + split] = total;
}

// One warp per channel: lane l adds partials l, l + 32, ... in order, then a
// fixed shuffle tree.
template <class T>
__global__ void conv_bias_finish_kernel(const float* partials, std::int64_t k, std::int64_t splits, T* db) {
  const std::int64_t channel = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (channel >= k) return;  // whole warps: blockDim is a multiple of 32
  const float s = warp_sum_in_order(partials + channel * splits, splits, 1);
  if (lane == 0) db[channel] = mixprec::from_float<T>(s);
}

// --- direct convolution, few taps ---------------------------------------------

// A filter's taps (c * r * s) for which the direct kernels run instead of
// cuDNN, and the most weights (k * taps) the forward holds in shared
// memory, widened (32 KiB).
inline constexpr int kDirectTaps = 32;
inline constexpr std::int64_t kDirectWeights = 8192;

// Index math inside an image or a plane is 32-bit (64-bit divisions and
// products cost the first versions of these kernels 10x their memory
// time); the shapes the kernels take keep those offsets below 2^31.
inline bool plane_fits_int(std::int64_t elements) { return elements > 0 && elements < (std::int64_t{1} << 31); }

inline bool direct_conv_fits(const nn::ConvShape& s) {
  const std::int64_t taps = s.c * s.r * s.s;
  return taps >= 1 && taps <= kDirectTaps && s.k * taps <= kDirectWeights && plane_fits_int(s.c * s.h * s.w) &&
         plane_fits_int(s.k * s.p * s.q);
}

// Where output pixel `pixel` of a plane reads its image: the offset of its
// window's top-left corner (may lie in the padding) and the mask of the taps
// inside the image. Tap j = (c, r, t) in the CPU layer's order reads the
// corner's offset + rel[j], rel[j] = (c * h + r) * w + t (block-shared).
struct DirectPixel {
  int corner;
  unsigned inside;
};

__device__ inline void direct_tap_offsets(const nn::ConvShape& s, int taps, int* rel) {
  for (int j = static_cast<int>(threadIdx.x); j < taps; j += static_cast<int>(blockDim.x)) {
    const int rs = static_cast<int>(s.r * s.s), c = j / rs, r = j % rs / static_cast<int>(s.s),
              t = j % static_cast<int>(s.s);
    rel[j] = (c * static_cast<int>(s.h) + r) * static_cast<int>(s.w) + t;
  }
}

__device__ inline DirectPixel direct_pixel(const nn::ConvShape& s, int taps, int pixel) {
  const int q_ = static_cast<int>(s.q), w_ = static_cast<int>(s.w), h_ = static_cast<int>(s.h);
  const int r_ = static_cast<int>(s.r), s_ = static_cast<int>(s.s);
  const int h0 = pixel / q_ * static_cast<int>(s.stride) - static_cast<int>(s.pad);
  const int w0 = pixel % q_ * static_cast<int>(s.stride) - static_cast<int>(s.pad);
  unsigned inside = 0;
  int r = 0, t = 0;
  for (int j = 0; j < taps; ++j) {
    const int h = h0 + r, w = w0 + t;
    if (h >= 0 && h < h_ && w >= 0 && w < w_) inside |= 1u << j;
    if (++t == s_) {
      t = 0;
      if (++r == r_) r = 0;
    }
  }
  return DirectPixel{h0 * w_ + w0, inside};
}

// A thread an output position (image, pixel), grid-stride over all images'
// (a block's threads over one image's pixels left the last block of each
// image mostly idle: 784 = 3 x 256 + 16); a thread computes every filter:
// y = act(round_T(sum of x * w over the taps inside the image, (c, r, t)
// order) + bias) in float, rounded to T: the cuDNN path's (and PyTorch's)
// roundings. Dynamic shared memory: the k * taps weights, widened. MaxTaps
// >= taps bounds the unrolled tap loops (9 for a 3x3 filter of one channel:
// a 32-tap loop's predicates cost every thread more than its arithmetic).
template <class T, int MaxTaps>
__global__ void direct_conv_forward_kernel(const T* x, const T* w, const T* bias, T* y, nn::ConvShape s,
                                           nn::Activation act) {
  extern __shared__ float weights[];
  __shared__ int rel[kDirectTaps];
  const int taps = static_cast<int>(s.c * s.r * s.s), k = static_cast<int>(s.k);
  for (int i = static_cast<int>(threadIdx.x); i < k * taps; i += static_cast<int>(blockDim.x)) {
    weights[i] = mixprec::to_float(w[i]);
  }
  direct_tap_offsets(s, taps, rel);
  __syncthreads();
  const int pq = static_cast<int>(s.p * s.q);
  int at[MaxTaps];
#pragma unroll
  for (int j = 0; j < MaxTaps; ++j) at[j] = j < taps ? rel[j] : 0;
  const std::int64_t image_in = s.c * s.h * s.w, image_out = s.k * pq, positions = s.n * pq;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t pos = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pos < positions;
       pos += stride) {
    const std::int64_t image = pos / pq;
    const int pixel = static_cast<int>(pos - image * pq);
    const DirectPixel px = direct_pixel(s, taps, pixel);
    const T* xi = x + image * image_in + px.corner;
    float xv[MaxTaps];
#pragma unroll
    for (int j = 0; j < MaxTaps; ++j) xv[j] = (px.inside >> j) & 1u ? mixprec::to_float(xi[at[j]]) : 0.0f;
    T* out = y + image * image_out + pixel;
#pragma unroll 4  // four filters' sums in flight (one dependent chain at a time: 22 us for the example's first layer)
    for (int f = 0; f < k; ++f) {
      const float* wf = weights + f * taps;
      float acc = 0.0f;
#pragma unroll
      for (int j = 0; j < MaxTaps; ++j) {
        if ((px.inside >> j) & 1u) acc += xv[j] * wf[j];  // taps in the padding skipped, as on the CPU
      }
      const float b = bias != nullptr ? mixprec::to_float(bias[f]) : 0.0f;
      const float conv = mixprec::to_float(mixprec::from_float<T>(acc));  // rounded to T first, as cuDNN's output
      out[f * pq] = mixprec::from_float<T>(nn::fn::activate(act, conv + b));
    }
  }
}

// The weight and bias gradients of a direct convolution in one read of dy,
// as a small GEMM over positions (image, pixel): dw[f, j] = sum over
// positions of dz[f] * x_tap[j], db[f] = sum of dz[f]. A warp takes 32
// positions at a time: lane l loads position l's taps and its dz for 32
// filters (dz = dy, times relu'(y) when y is not null) into shared memory;
// then lane l, for filter f0 + l, adds the 32 positions' products in order.
// The taps are read once for all filters (a block a filter read them 32
// times: 160 instructions an element, 58 us for the example's first layer).
// Block (b, g): positions [b * kWgradPositions, (b + 1) * kWgradPositions)
// and filters [32 g, 32 g + 32); its sums, the warps added in order, go to
// partials[((b * k) + f) * (taps + 1) + j], j = taps for the bias. A tap in
// the zero padding adds dz * 0.
inline constexpr int kWgradThreads = 128;
inline constexpr std::int64_t kWgradPositions = 512;  // a block's share, fixed: the bits depend on the shape only

template <class T, int MaxTaps>
__global__ void __launch_bounds__(kWgradThreads)
    direct_conv_wgrad_partial_kernel(const T* x, const T* dy, const T* y, nn::ConvShape s, float* partials) {
  constexpr int warps = kWgradThreads / 32;
  constexpr int xs_ld = MaxTaps | 1;  // odd: lane l's row starts in its own bank
  __shared__ float xs[warps][32][xs_ld];
  __shared__ float ds[warps][32][33];  // also, at the end, each warp's sums: [filter][tap]
  __shared__ int rel[kDirectTaps];
  const int taps = static_cast<int>(s.c * s.r * s.s);
  direct_tap_offsets(s, taps, rel);
  __syncthreads();
  int at[MaxTaps];
#pragma unroll
  for (int j = 0; j < MaxTaps; ++j) at[j] = j < taps ? rel[j] : 0;
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int pq = static_cast<int>(s.p * s.q);
  const std::int64_t positions = s.n * pq, image_in = s.c * s.h * s.w, image_out = s.k * pq;
  const std::int64_t f0 = 32 * static_cast<std::int64_t>(blockIdx.y);
  const int filters = static_cast<int>(s.k - f0 < 32 ? s.k - f0 : 32);
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.x) * kWgradPositions;
  const std::int64_t end = begin + kWgradPositions < positions ? begin + kWgradPositions : positions;
  float acc[MaxTaps + 1];
#pragma unroll
  for (int j = 0; j <= MaxTaps; ++j) acc[j] = 0.0f;
  for (std::int64_t chunk = begin + 32 * warp; chunk < end; chunk += 32 * warps) {
    const std::int64_t pos = chunk + lane;
    if (pos < end) {
      const std::int64_t image = pos / pq;
      const int pixel = static_cast<int>(pos - image * pq);
      const DirectPixel px = direct_pixel(s, taps, pixel);
      const T* xi = x + image * image_in + px.corner;
#pragma unroll
      for (int j = 0; j < MaxTaps; ++j) {
        if (j < taps) xs[warp][lane][j] = (px.inside >> j) & 1u ? mixprec::to_float(xi[at[j]]) : 0.0f;
      }
      const std::int64_t o = image * image_out + f0 * pq + pixel;
      for (int f = 0; f < filters; ++f) {
        float g = mixprec::to_float(dy[o + f * pq]);
        if (y != nullptr) g *= nn::fn::relu_grad_from_output(mixprec::to_float(y[o + f * pq]));
        ds[warp][lane][f] = g;
      }
    } else {
#pragma unroll
      for (int j = 0; j < MaxTaps; ++j) {
        if (j < taps) xs[warp][lane][j] = 0.0f;
      }
      for (int f = 0; f < filters; ++f) ds[warp][lane][f] = 0.0f;
    }
    __syncwarp();
    if (lane < filters) {
      for (int q = 0; q < 32; ++q) {
        const float g = ds[warp][q][lane];
#pragma unroll
        for (int j = 0; j < MaxTaps; ++j) {
          if (j < taps) acc[j] += g * xs[warp][q][j];
        }
        acc[MaxTaps] += g;
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int j = 0; j <= MaxTaps; ++j) ds[warp][lane][j] = acc[j];  // after the warp's last __syncwarp: its own rows
  __syncthreads();
  // Thread e: entry (filter e / (taps + 1), tap e % (taps + 1)), the warps in order.
  for (int e = static_cast<int>(threadIdx.x); e < filters * (taps + 1); e += kWgradThreads) {
    const int f = e / (taps + 1), j = e % (taps + 1);
    float total = 0;
    for (int w = 0; w < warps; ++w) total += ds[w][f][j == taps ? MaxTaps : j];
    partials[(static_cast<std::int64_t>(blockIdx.x) * s.k + f0 + f) * (taps + 1) + j] = total;
  }
}

// One warp an entry (filter, tap or bias): lane l adds the blocks' partials
// l, l + 32, ... in order, then a fixed shuffle tree; rounded to T. dw [k,
// taps], db [k] (may be null).
template <class T>
__global__ void direct_conv_wgrad_finish_kernel(const float* partials, std::int64_t k, int taps,
                                                std::int64_t blocks, T* dw, T* db) {
  const std::int64_t e = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (e >= k * (taps + 1)) return;  // whole warps: blockDim is a multiple of 32
  const float sum = warp_sum_in_order(partials + e, blocks, k * (taps + 1));
  if (lane != 0) return;
  const std::int64_t f = e / (taps + 1);
  const int j = static_cast<int>(e % (taps + 1));
  if (j < taps) {
    dw[f * taps + j] = mixprec::from_float<T>(sum);
  } else if (db != nullptr) {
    db[f] = mixprec::from_float<T>(sum);
  }
}

// --- max pooling ---------------------------------------------------------------

inline bool pool_fits_int(const nn::PoolShape& s) { return plane_fits_int(s.h * s.w); }

// The offset in its plane of the first maximum of output (p, q)'s window, a
// NaN before any number: the CPU layer's for_each_window.
template <class T>
__device__ inline int pool_argmax(const T* plane, int w, int window, int stride, int p, int q) {
  int best = -1;
  float m = 0;
  for (int r = 0; r < window; ++r) {
    for (int t = 0; t < window; ++t) {
      const int i = (p * stride + r) * w + q * stride + t;
      const float v = mixprec::to_float(plane[i]);
      if (best < 0 || v > m || (v != v && m == m)) {
        best = i;
        m = v;
      }
    }
  }
  return best;
}

// Non-overlapping windows of W x W (stride W, the usual pooling), every
// index below 2^31: one thread an output element of the whole tensor, flat
// 32-bit index math, the window unrolled. These take about a tenth of the
// general kernels' instructions (which are bound by them: the general
// backward ran 330 instructions an input element).
inline bool pool_tiled(const nn::PoolShape& s, int w) {
  return s.window == w && s.stride == w && plane_fits_int(s.n * s.c * s.h * s.w);
}

// The first maximum (a NaN before any number) of the window at xp (row
// length w): its offset from xp.
template <class T, int W>
__device__ __forceinline__ int tiled_argmax(const T* xp, int w) {
  int best = 0;
  float m = mixprec::to_float(xp[0]);
#pragma unroll
  for (int r = 0; r < W; ++r) {
#pragma unroll
    for (int t = 0; t < W; ++t) {
      if (r == 0 && t == 0) continue;
      const float v = mixprec::to_float(xp[r * w + t]);
      if (v > m || (v != v && m == m)) {
        best = r * w + t;
        m = v;
      }
    }
  }
  return best;
}

template <class T, int W>
__global__ void maxpool_forward_tiled_kernel(const T* x, T* y, nn::PoolShape s) {
  const unsigned sq = static_cast<unsigned>(s.q), pq = static_cast<unsigned>(s.p * s.q);
  const unsigned w = static_cast<unsigned>(s.w), hw = static_cast<unsigned>(s.h * s.w);
  const unsigned total = static_cast<unsigned>(s.n * s.c) * pq;
  for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < total; o += gridDim.x * blockDim.x) {
    const unsigned plane = o / pq, pixel = o - plane * pq, p = pixel / sq, q = pixel - p * sq;
    const T* xp = x + plane * hw + p * W * w + q * W;
    y[o] = xp[tiled_argmax<T, W>(xp, static_cast<int>(w))];
  }
}

// dx of a window = dy at its first maximum, 0 elsewhere (0 + dy in float,
// the CPU's sum). Rows and columns that no window covers (h or w not a
// multiple of W) are zeroed by the caller beforehand.
template <class T, int W>
__global__ void maxpool_backward_tiled_kernel(const T* x, const T* dy, T* dx, nn::PoolShape s) {
  const unsigned sq = static_cast<unsigned>(s.q), pq = static_cast<unsigned>(s.p * s.q);
  const unsigned w = static_cast<unsigned>(s.w), hw = static_cast<unsigned>(s.h * s.w);
  const unsigned total = static_cast<unsigned>(s.n * s.c) * pq;
  for (unsigned o = blockIdx.x * blockDim.x + threadIdx.x; o < total; o += gridDim.x * blockDim.x) {
    const unsigned plane = o / pq, pixel = o - plane * pq, p = pixel / sq, q = pixel - p * sq;
    const unsigned corner = plane * hw + p * W * w + q * W;
    const int best = tiled_argmax<T, W>(x + corner, static_cast<int>(w));
    const float g = 0.0f + mixprec::to_float(dy[o]);
    T* dxp = dx + corner;
#pragma unroll
    for (int r = 0; r < W; ++r) {
#pragma unroll
      for (int t = 0; t < W; ++t) {
        dxp[r * static_cast<int>(w) + t] = mixprec::from_float<T>(r * static_cast<int>(w) + t == best ? g : 0.0f);
      }
    }
  }
}

// The general case (any window and stride): block (x, y): output pixel
// blockIdx.x * blockDim.x + threadIdx.x of planes y, y + gridDim.y, ...
template <class T>
__global__ void maxpool_forward_kernel(const T* x, T* y, nn::PoolShape s) {
  const int pq = static_cast<int>(s.p * s.q), o = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (o >= pq) return;
  const int w = static_cast<int>(s.w), window = static_cast<int>(s.window), stride = static_cast<int>(s.stride);
  const int p = o / static_cast<int>(s.q), q = o % static_cast<int>(s.q);
  for (std::int64_t plane = blockIdx.y; plane < s.n * s.c; plane += gridDim.y) {
    const T* xp = x + plane * s.h * s.w;
    y[plane * pq + o] = xp[pool_argmax(xp, w, window, stride, p, q)];
  }
}

// Block (x, y): input pixel blockIdx.x * blockDim.x + threadIdx.x of planes
// y, y + gridDim.y, ...: the sum, over the windows that hold it in (p, q)
// order, of dy where it is the window's first maximum. The CPU adds the
// same terms in the same order, so the bits match; no atomics, no zeroing
// pass.
template <class T>
__global__ void maxpool_backward_kernel(const T* x, const T* dy, T* dx, nn::PoolShape s) {
  const int hw = static_cast<int>(s.h * s.w), at = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (at >= hw) return;
  const int w = static_cast<int>(s.w), window = static_cast<int>(s.window), stride = static_cast<int>(s.stride);
  const int sp = static_cast<int>(s.p), sq = static_cast<int>(s.q);
  const int h = at / w, c = at % w;
  // Windows p with p * stride <= h < p * stride + window, and 0 <= p < s.p.
  const int p0 = h < window ? 0 : (h - window) / stride + 1, q0 = c < window ? 0 : (c - window) / stride + 1;
  const int p1 = h / stride < sp - 1 ? h / stride : sp - 1, q1 = c / stride < sq - 1 ? c / stride : sq - 1;
  for (std::int64_t plane = blockIdx.y; plane < s.n * s.c; plane += gridDim.y) {
    const T* xp = x + plane * hw;
    const T* dyp = dy + plane * sp * sq;
    float g = 0.0f;
    for (int p = p0; p <= p1; ++p) {
      for (int q = q0; q <= q1; ++q) {
        if (pool_argmax(xp, w, window, stride, p, q) == at) g += mixprec::to_float(dyp[p * sq + q]);
      }
    }
    dx[plane * hw + at] = mixprec::from_float<T>(g);
  }
}

}  // namespace nn_detail
}  // namespace cuda
MIXPREC_NAMESPACE_END

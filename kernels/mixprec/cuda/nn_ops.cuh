// SPDX-License-Identifier: Apache-2.0
// The layers' device work (nn::DeviceOps): Linear through cuBLASLt with
// fused epilogues (bias + ReLU/GELU in the forward, the bias gradient in
// the weight-gradient GEMM) or, opt-in for layers of at most 16 outputs,
// mixprec's kernels (linear_kernels.cuh), and mixprec's own kernels for
// activations, their derivatives and the losses. Installed by backend.cuh. Convolution
// goes through cuDNN where mixprec::cuda found it (MIXPREC_WITH_CUDNN;
// without it Conv2d throws, naming what is missing), with mixprec's kernels
// for its bias and ReLU, its bias gradient and layers of few taps
// (conv_kernels.cuh); max pooling is mixprec's own.
#pragma once

#include <cublasLt.h>
#if MIXPREC_WITH_CUDNN
#include <cudnn.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/cublas_check.hpp"
#include "mixprec/core/cudnn_check.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/conv_kernels.cuh"
#include "mixprec/cuda/convert.cuh"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/cuda/linear_kernels.cuh"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

namespace nn_detail {

// Keeps the stream busy for about `cycles` clock cycles (timing GEMM
// candidates: the calls behind it are queued before it ends).
__global__ inline void spin_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

template <class T>
__global__ void activation_forward_kernel(nn::Activation act, const T* x, T* y, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = mixprec::from_float<T>(nn::fn::activate(act, mixprec::to_float(x[i])));
  }
}

// dx = dy * act'(z), z the pre-activation (or, for ReLU, anything with its sign).
template <class T>
__global__ void activation_backward_kernel(nn::Activation act, const T* z, const T* dy, T* dx, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = nn::fn::activation_grad(act, mixprec::to_float(z[i]));
    dx[i] = mixprec::from_float<T>(mixprec::to_float(dy[i]) * g);
  }
}

// *out = (sum of values[0, n), in double) / divisor, by one warp (every
// lane calls it): lane l adds values l, l + 32, ... in order, then a fixed
// shuffle tree, so the bits do not depend on scheduling (one thread adding
// 256 values took 12 us on an H200). L2 loads: the values may be other
// blocks' writes of the same launch.
__device__ inline void warp_mean(const float* values, std::int64_t n, double divisor, float* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  double s = 0;
  for (std::int64_t i = lane; i < n; i += 32) s += __ldcg(values + i);
  for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  if (lane == 0) *out = static_cast<float>(s / divisor);
}

// One row by one warp: max, sum of exp, the row's loss and the scaled
// gradient.
template <class T>
__device__ inline void softmax_xent_row(const T* logits, const std::int32_t* labels, std::int64_t row,
                                        std::int64_t batch, std::int64_t classes, const float* scale, T* dlogits,
                                        float* row_loss, int* bad_label) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T* z = logits + row * classes;
  T* dz = dlogits + row * classes;
  float m = -INFINITY;
  for (std::int64_t c = lane; c < classes; c += 32) m = fmaxf(m, mixprec::to_float(z[c]));
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0;
  for (std::int64_t c = lane; c < classes; c += 32) s += expf(mixprec::to_float(z[c]) - m);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  const float lse = m + logf(s);
  const std::int32_t label = labels[row];
  const bool ok = label >= 0 && label < classes;
  const float g = *scale / static_cast<float>(batch);
  for (std::int64_t c = lane; c < classes; c += 32) {
    const float p = expf(mixprec::to_float(z[c]) - lse);
    dz[c] = mixprec::from_float<T>(ok ? (p - (c == label ? 1.0f : 0.0f)) * g : 0.0f);
  }
  if (lane == 0) {
    row_loss[row] = ok ? lse - mixprec::to_float(z[label]) : 0.0f;
    if (!ok) *bad_label = 1;
  }
}

// The counters of the kernels whose last block to finish completes the
// launch's work: zero when the module loads, and each launch leaves its
// counter at zero (no allocation or clearing, so a first call inside a
// graph capture is fine). One per kernel and device, shared by calls as
// NnOps's scratch is (calls on two streams at once would share it too).
static __device__ unsigned softmax_blocks_done = 0;
static __device__ unsigned gather_blocks_done = 0;

// One warp per row (softmax_xent_row); then the last block to finish takes
// the mean of the rows' losses into *loss (warp_mean: the same bits
// whichever block is last), so the loss costs the step no launch of its
// own (a one-warp kernel after this one took about 3 us of every step of
// the MLP example on an H100).
template <class T>
__global__ void softmax_xent_kernel(const T* logits, const std::int32_t* labels, std::int64_t batch,
                                    std::int64_t classes, const float* scale, T* dlogits, float* row_loss,
                                    int* bad_label, float* loss) {
  unsigned* blocks_done = &softmax_blocks_done;
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row < batch) softmax_xent_row(logits, labels, row, batch, classes, scale, dlogits, row_loss, bad_label);
  if (!last_block_to_finish(blocks_done)) return;
  if (threadIdx.x < 32) warp_mean(row_loss, batch, static_cast<double>(batch), loss);
  if (threadIdx.x == 0) *blocks_done = 0;  // ready for the next launch (or graph replay)
}

// dy = scale * 2 (y - t) / n; squared differences summed per block.
template <class T>
__global__ void mse_kernel(const T* y, const T* t, std::int64_t n, const float* scale, T* dy, float* block_sums) {
  __shared__ float warp_sums[block_threads / 32];
  const float g = 2.0f * *scale / static_cast<float>(n);
  float s = 0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float d = mixprec::to_float(y[i]) - mixprec::to_float(t[i]);
    s += d * d;
    dy[i] = mixprec::from_float<T>(d * g);
  }
  const float total = block_sum_in_order(s, warp_sums);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
}

// *out = (sum of values) / divisor, by one warp (warp_mean).
__global__ inline void mean_kernel(const float* values, std::int64_t n, double divisor, float* out) {
  warp_mean(values, n, divisor, out);
}

// Block b copies batch row b: order[(*cursor * batch + b) % n] of rows, in
// 16-byte words when every address allows, else byte by byte. The last
// block to finish then advances *cursor (every block has read it by then),
// so the advance costs the step no launch of its own.
__global__ inline void gather_batch_kernel(const unsigned char* rows, std::size_t row_bytes,
                                           const std::int32_t* row_labels, const std::int32_t* order, std::int64_t n,
                                           std::int64_t* cursor, std::int64_t batch, unsigned char* x,
                                           std::int32_t* labels, bool vector) {
  unsigned* blocks_done = &gather_blocks_done;
  const std::int64_t b = blockIdx.x;
  const std::int64_t r = order[(*cursor * batch + b) % n];
  const unsigned char* src = rows + static_cast<std::size_t>(r) * row_bytes;
  unsigned char* dst = x + static_cast<std::size_t>(b) * row_bytes;
  if (vector) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (std::size_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) d4[i] = s4[i];
  } else {
    for (std::size_t i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
  }
  if (threadIdx.x == 0 && labels != nullptr) labels[b] = row_labels[r];
  // Every thread of every block has read *cursor before the last one changes it.
  if (last_block_to_finish(blocks_done) && threadIdx.x == 0) {
    *cursor += 1;
    *blocks_done = 0;  // ready for the next launch (or graph replay)
  }
}

__global__ inline void advance_kernel(std::int64_t* cursor) { *cursor += 1; }
__global__ inline void accumulate_kernel(float* sum, const float* value) { *sum += *value; }

// One warp per row: the first index of the largest logit against the label
// (a row whose entries are all NaN or -inf has no prediction).
template <class T>
__global__ void count_correct_kernel(const T* logits, const std::int32_t* labels, std::int64_t batch,
                                     std::int64_t classes, unsigned long long* correct) {
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch) return;
  const T* z = logits + row * classes;
  float best = -INFINITY;
  std::int64_t at = classes;
  for (std::int64_t c = lane; c < classes; c += 32) {
    const float v = mixprec::to_float(z[c]);
    if (v > best) {  // NaN and -inf never win
      best = v;
      at = c;
    }
  }
  for (int o = 16; o > 0; o /= 2) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const std::int64_t oa = __shfl_xor_sync(0xffffffffu, at, o);
    if (ob > best || (ob == best && oa < at)) {
      best = ob;
      at = oa;
    }
  }
  if (lane == 0 && at == labels[row]) atomicAdd(correct, 1ull);
}

inline cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::float16:
      return CUDA_R_16F;
    case DType::bfloat16:
      return CUDA_R_16BF;
    case DType::float32:
      break;
  }
  return CUDA_R_32F;
}

// Calls f(T*) with the pointer cast to the element type of `d`.
template <class F>
void with_type(DType d, F&& f) {
  switch (d) {
    case DType::float16:
      f(static_cast<half*>(nullptr));
      return;
    case DType::bfloat16:
      f(static_cast<bfloat16*>(nullptr));
      return;
    case DType::float32:
      f(static_cast<float*>(nullptr));
      return;
  }
}

}  // namespace nn_detail

/// nn::DeviceOps on the current device, with one cuBLASLt handle and a
/// 32 MiB workspace (NVIDIA's recommendation for Hopper) made on first use,
/// and scratch memory that grows to the largest request. Set-up work
/// (handle, workspace, scratch growth, heuristic queries; with
/// nn::GemmAlgorithms::timed, timing the candidates) happens on the first
/// call with a given shape: run one step before capturing a graph.
class NnOps final : public nn::DeviceOps {
 public:
  ~NnOps() override {
    for (auto& [key, plan] : plans_) {
      (void)key;
      destroy(plan);
    }
    for (Plan& plan : retired_plans_) destroy(plan);
#if MIXPREC_WITH_CUDNN
    for (auto& [key, p] : conv_plans_) {
      (void)key;
      (void)cudnnDestroyTensorDescriptor(p.x);
      (void)cudnnDestroyTensorDescriptor(p.y);
      (void)cudnnDestroyFilterDescriptor(p.w);
      (void)cudnnDestroyConvolutionDescriptor(p.conv);
    }
    if (cudnn_) (void)cudnnDestroy(cudnn_);
#endif
    if (handle_) (void)cublasLtDestroy(handle_);
  }

  // --- how GEMM algorithms are chosen (nn::GemmAlgorithms) ----------------

  void set_gemm_algorithms(nn::GemmAlgorithms how) override {
    MIXPREC_CHECK(how == nn::GemmAlgorithms::heuristic || how == nn::GemmAlgorithms::timed,
                  "NnOps::set_gemm_algorithms: how = ", static_cast<int>(how), " is not a GemmAlgorithms value");
    std::lock_guard<std::mutex> lock(mutex_);
    if (how == gemm_algorithms_) return;
    retired_plans_.reserve(retired_plans_.size() + plans_.size());  // no throw below: no plan in both
    // Plans of the other setting go out of use, not away: kept until this
    // object goes, as outgrown scratch is (cuBLASLt does not say whether a
    // captured call still refers to its descriptors), a few hundred bytes each.
    for (auto& [key, plan] : plans_) {
      (void)key;
      retired_plans_.push_back(plan);
    }
    plans_.clear();
    gemm_algorithms_ = how;
  }
  nn::GemmAlgorithms gemm_algorithms() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return gemm_algorithms_;
  }
  std::vector<nn::GemmPlanInfo> gemm_plans() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<nn::GemmPlanInfo> out;
    out.reserve(plans_.size());
    for (const auto& [key, plan] : plans_) {
      (void)key;
      out.push_back(plan.info);
    }
    return out;
  }

  void set_narrow_linear(bool on) override { narrow_linear_.store(on, std::memory_order_relaxed); }
  bool narrow_linear() const override { return narrow_linear_.load(std::memory_order_relaxed); }

  // --- convolution (cuDNN, or mixprec's direct kernels) and pooling (mixprec's) ---

#if MIXPREC_WITH_CUDNN
  void conv2d_forward(DType dtype, const nn::ConvShape& s, const void* x, const void* w, const void* bias,
                      nn::Activation act, void* y, stream_t stream) override {
    const std::int64_t pq = s.p * s.q, total = s.n * s.k * pq;
    if (total == 0) return;
    if (nn_detail::direct_conv_fits(s)) {
      nn_detail::with_type(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const std::size_t smem = static_cast<std::size_t>(s.k * s.c * s.r * s.s) * sizeof(float);
        auto* kernel = s.c * s.r * s.s <= 9 ? nn_detail::direct_conv_forward_kernel<T, 9>
                                            : nn_detail::direct_conv_forward_kernel<T, nn_detail::kDirectTaps>;
        kernel<<<grid_for(s.n * pq), block_threads, smem, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                                                    static_cast<const T*>(bias), static_cast<T*>(y), s,
                                                                    act);
      });
      MIXPREC_CUDA_CHECK_LAUNCH("direct_conv_forward_kernel");
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ConvPlan& p = conv_plan(dtype, s);
      MIXPREC_CUDNN_CHECK(cudnnSetStream(cudnn_, stream));
      const float one = 1.0f, zero = 0.0f;
      MIXPREC_CUDNN_CHECK(cudnnConvolutionForward(cudnn_, &one, p.x, x, p.w, w, p.conv, p.fwd, workspace(p.ws),
                                                  p.ws, &zero, p.y, y));
    }
    if (bias == nullptr && act == nn::Activation::none) return;
    // The bias and the activation in one pass over y (cudnnAddTensor and an
    // activation kernel took two, 36 us + 15 us of the example CNN's step).
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      T* out = static_cast<T*>(y);
      const T* b = static_cast<const T*>(bias);
      if (pq % 4 == 0 && reinterpret_cast<std::uintptr_t>(out) % (4 * sizeof(T)) == 0) {  // a view may start anywhere
        nn_detail::conv_bias_act_kernel<T, 4><<<grid_for(total / 4), block_threads, 0, stream>>>(out, b, s.k, pq,
                                                                                                 total, act);
      } else {
        nn_detail::conv_bias_act_kernel<T, 1><<<grid_for(total), block_threads, 0, stream>>>(out, b, s.k, pq, total,
                                                                                             act);
      }
    });
    MIXPREC_CUDA_CHECK_LAUNCH("conv_bias_act_kernel");
  }

  void conv2d_backward(DType dtype, const nn::ConvShape& s, const void* x, const void* w, const void* y,
                       const void* dy, nn::Activation act, void* dx, void* grad_w, void* grad_bias,
                       stream_t stream) override {
    const std::int64_t pq = s.p * s.q;
    const std::int64_t per_split = nn_detail::conv_bias_images_per_split(s.n, pq);
    const std::int64_t splits = (s.n + per_split - 1) / per_split;
    const bool relu = act == nn::Activation::relu;
    if (nn_detail::direct_conv_fits(s) && dx == nullptr) {
      // A first layer: the weight and bias gradients in one read of dy, no dz written.
      const int taps = static_cast<int>(s.c * s.r * s.s);
      const std::int64_t blocks = (s.n * pq + nn_detail::kWgradPositions - 1) / nn_detail::kWgradPositions;
      std::lock_guard<std::mutex> lock(mutex_);
      float* partials =
          static_cast<float*>(scratch(static_cast<std::size_t>(blocks * s.k * (taps + 1)) * sizeof(float), 3));
      nn_detail::with_type(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((s.k + 31) / 32));
        const T* xt = static_cast<const T*>(x);
        const T* dyt = static_cast<const T*>(dy);
        const T* yt = relu ? static_cast<const T*>(y) : nullptr;
        auto* kernel = taps <= 9 ? nn_detail::direct_conv_wgrad_partial_kernel<T, 9>
                                 : nn_detail::direct_conv_wgrad_partial_kernel<T, nn_detail::kDirectTaps>;
        kernel<<<grid, nn_detail::kWgradThreads, 0, stream>>>(xt, dyt, yt, s, partials);
        MIXPREC_CUDA_CHECK_LAUNCH("direct_conv_wgrad_partial_kernel");
        const std::int64_t entries = s.k * (taps + 1);
        nn_detail::direct_conv_wgrad_finish_kernel<T>
            <<<static_cast<unsigned>((entries * 32 + block_threads - 1) / block_threads), block_threads, 0, stream>>>(
                partials, s.k, taps, blocks, static_cast<T*>(grad_w), static_cast<T*>(grad_bias));
      });
      MIXPREC_CUDA_CHECK_LAUNCH("direct_conv_wgrad_finish_kernel");
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ConvPlan& p = conv_plan(dtype, s);
    const void* dz = dy;
    if (grad_bias != nullptr || relu) {
      // One pass over dy: the bias gradient's partial sums and, with a ReLU,
      // dz = dy * relu'(y) for cuDNN (an activation kernel's pass saved).
      void* dz_buf = relu ? scratch(static_cast<std::size_t>(s.n * s.k * pq) * dtype_size(dtype), 4) : nullptr;
      float* partials = static_cast<float*>(scratch(static_cast<std::size_t>(s.k * splits) * sizeof(float), 3));
      nn_detail::with_type(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        nn_detail::conv_bias_partial_kernel<T>
            <<<dim3(static_cast<unsigned>(s.k), static_cast<unsigned>(splits)), block_threads, 0, stream>>>(
                static_cast<const T*>(dy), relu ? static_cast<const T*>(y) : nullptr, static_cast<T*>(dz_buf), s.n,
                s.k, pq, per_split, partials);
        MIXPREC_CUDA_CHECK_LAUNCH("conv_bias_partial_kernel");
        if (grad_bias != nullptr) {
          nn_detail::conv_bias_finish_kernel<T>
              <<<static_cast<unsigned>((s.k * 32 + block_threads - 1) / block_threads), block_threads, 0, stream>>>(
                  partials, s.k, splits, static_cast<T*>(grad_bias));
          MIXPREC_CUDA_CHECK_LAUNCH("conv_bias_finish_kernel");
        }
      });
      if (relu) dz = dz_buf;
    }
    MIXPREC_CUDNN_CHECK(cudnnSetStream(cudnn_, stream));
    const float one = 1.0f, zero = 0.0f;
    MIXPREC_CUDNN_CHECK(cudnnConvolutionBackwardFilter(cudnn_, &one, p.x, x, p.y, dz, p.conv, p.bwd_filter,
                                                       workspace(p.ws), p.ws, &zero, p.w, grad_w));
    if (dx) {
      MIXPREC_CUDNN_CHECK(cudnnConvolutionBackwardData(cudnn_, &one, p.w, w, p.y, dz, p.conv, p.bwd_data,
                                                       workspace(p.ws), p.ws, &zero, p.x, dx));
    }
  }
#else
  void conv2d_forward(DType, const nn::ConvShape&, const void*, const void*, const void*, nn::Activation, void*,
                      stream_t) override {
    without_cudnn("Conv2d");
  }
  void conv2d_backward(DType, const nn::ConvShape&, const void*, const void*, const void*, const void*,
                       nn::Activation, void*, void*, void*, stream_t) override {
    without_cudnn("Conv2d");
  }
  [[noreturn]] static void without_cudnn(const char* layer) {
    mixprec::detail::throw_error(layer, " on a GPU needs cuDNN, and this program's mixprec::cuda was configured "
                                 "without it (cudnn.h and libcudnn not found, or MIXPREC_ENABLE_CUDNN=OFF): "
                                 "install cuDNN (or set CUDNN_ROOT) and reconfigure, or run the layer on the CPU");
  }
#endif

  // Blocks for the plane kernels: x over a plane's pixels, y over the
  // planes (a block loops over planes past the grid's 65535).
  static dim3 plane_grid(std::int64_t pixels, std::int64_t planes) {
    return dim3(static_cast<unsigned>((pixels + block_threads - 1) / block_threads),
                static_cast<unsigned>(planes < 65535 ? planes : 65535));
  }
  static void check_pool(const nn::PoolShape& s) {
    MIXPREC_CHECK(nn_detail::pool_fits_int(s), "MaxPool2d on a GPU: a plane of ", s.h, " x ", s.w,
                  " elements, more than the kernels' 32-bit offsets allow (2^31)");
  }

  // Max pooling by mixprec's kernels, the CPU layer's bits (cuDNN's took
  // 80 us of the example CNN's step on an H100, its backward 56 of them).
  void maxpool2d_forward(DType dtype, const nn::PoolShape& s, const void* x, void* y, stream_t stream) override {
    const std::int64_t total = s.n * s.c * s.p * s.q;
    if (total == 0) return;
    check_pool(s);
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* in = static_cast<const T*>(x);
      T* out = static_cast<T*>(y);
      if (nn_detail::pool_tiled(s, 2)) {
        nn_detail::maxpool_forward_tiled_kernel<T, 2><<<grid_for(total), block_threads, 0, stream>>>(in, out, s);
      } else if (nn_detail::pool_tiled(s, 3)) {
        nn_detail::maxpool_forward_tiled_kernel<T, 3><<<grid_for(total), block_threads, 0, stream>>>(in, out, s);
      } else {
        nn_detail::maxpool_forward_kernel<T><<<plane_grid(s.p * s.q, s.n * s.c), block_threads, 0, stream>>>(in, out,
                                                                                                            s);
      }
    });
    MIXPREC_CUDA_CHECK_LAUNCH("maxpool_forward_kernel");
  }

  void maxpool2d_backward(DType dtype, const nn::PoolShape& s, const void* x, const void* y, const void* dy,
                          void* dx, stream_t stream) override {
    (void)y;
    const std::int64_t total = s.n * s.c * s.h * s.w;
    if (total == 0) return;
    check_pool(s);
    const int tiled = nn_detail::pool_tiled(s, 2) ? 2 : nn_detail::pool_tiled(s, 3) ? 3 : 0;
    if (tiled != 0 && (s.h % tiled != 0 || s.w % tiled != 0)) {
      // Rows or columns no window covers: zero, the windows' kernel writes the rest.
      MIXPREC_CUDA_CHECK(cudaMemsetAsync(dx, 0, static_cast<std::size_t>(total) * dtype_size(dtype), stream));
    }
    const std::int64_t windows = s.n * s.c * s.p * s.q;
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* in = static_cast<const T*>(x);
      const T* g = static_cast<const T*>(dy);
      T* out = static_cast<T*>(dx);
      if (tiled == 2) {
        nn_detail::maxpool_backward_tiled_kernel<T, 2><<<grid_for(windows), block_threads, 0, stream>>>(in, g, out, s);
      } else if (tiled == 3) {
        nn_detail::maxpool_backward_tiled_kernel<T, 3><<<grid_for(windows), block_threads, 0, stream>>>(in, g, out, s);
      } else {
        nn_detail::maxpool_backward_kernel<T><<<plane_grid(s.h * s.w, s.n * s.c), block_threads, 0, stream>>>(
            in, g, out, s);
      }
    });
    MIXPREC_CUDA_CHECK_LAUNCH("maxpool_backward_kernel");
  }

  void linear_forward(DType dtype, const void* x, const void* w, const void* bias, void* y, std::int64_t batch,
                      std::int64_t in, std::int64_t out, nn::Activation act, const nn::LinearFusion& f,
                      stream_t stream) override {
    void* aux = f.aux;
    if ((act == nn::Activation::none || (act == nn::Activation::relu && aux == nullptr)) &&
        narrow_linear() && nn_detail::narrow_linear_fits(in, out, dtype_size(dtype), {x, w})) {  // y: scalar stores
      nn_detail::with_type(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        nn_detail::launch_narrow_linear_forward(static_cast<const T*>(x), static_cast<const T*>(w),
                                                static_cast<const T*>(bias), static_cast<T*>(y), batch, in,
                                                static_cast<int>(out), act, stream);
      });
      return;
    }
    // Column-major: Y^T [out, batch] = W^T^T (A = W, transposed) * X^T (B = X).
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    const bool gelu_fused = act == nn::Activation::gelu && out % 8 == 0;  // aux ld: a multiple of 8
    const bool relu_mask = act == nn::Activation::relu && aux != nullptr;
    if (act == nn::Activation::relu) {
      epi = relu_mask ? (bias ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX)
                      : (bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU);
    }
    if (gelu_fused) epi = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    if (act == nn::Activation::none && bias) epi = CUBLASLT_EPILOGUE_BIAS;
    void* d = y;
    if (act == nn::Activation::gelu && !gelu_fused) {
      // No fused GELU: z (with bias) into aux, then the activation kernel.
      epi = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      d = aux;
    }
    matmul(dtype, Key{dtype, epi, CUBLAS_OP_T, CUBLAS_OP_N, out, batch, in, in, in, out}, w, x, d, bias,
           gelu_fused || relu_mask ? aux : nullptr, gelu_fused ? out : f.aux_ld, stream);
    if (act == nn::Activation::gelu && !gelu_fused) activation_forward(dtype, act, aux, y, batch * out, stream);
  }

  void linear_backward(DType dtype, const void* x, const void* w, const void* y, const void* dy, void* dx,
                       void* grad_w, void* grad_bias, std::int64_t batch, std::int64_t in, std::int64_t out,
                       nn::Activation act, const nn::LinearFusion& f, stream_t stream) override {
    const void* dz = dy;
    const void* aux = f.aux;
    if (f.dy_is_dz) grad_bias = nullptr;  // written by the next layer's epilogue
    if (act != nn::Activation::none && !f.dy_is_dz) {
      // dz = dy * act'(z): ReLU's sign from y, GELU's z from the aux.
      void* buf = scratch(static_cast<std::size_t>(batch * out) * dtype_size(dtype));
      activation_backward(dtype, act, act == nn::Activation::relu ? y : aux, dy, buf, batch * out, stream);
      dz = buf;
    }
    if (narrow_linear() && nn_detail::narrow_linear_fits(in, out, dtype_size(dtype), {x, grad_w})) {
      nn_detail::with_type(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        nn_detail::launch_narrow_linear_wgrad(static_cast<const T*>(x), static_cast<const T*>(dz),
                                              static_cast<T*>(grad_w), static_cast<T*>(grad_bias), batch, in,
                                              static_cast<int>(out), stream);
      });
    } else {
      // dW^T [in, out] = X^T [in, batch] * dZ [batch, out]: A = X (N), B = dZ (T);
      // the bias gradient (sum over the batch of dZ) from B in the epilogue.
      const cublasLtEpilogue_t epi = grad_bias ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT;
      matmul(dtype, Key{dtype, epi, CUBLAS_OP_N, CUBLAS_OP_T, in, out, batch, in, out, in}, x, dz, grad_w,
             grad_bias, nullptr, 0, stream);
    }
    if (dx) {
      // dX^T [in, batch] = W^T [in, out] * dZ^T [out, batch]: A = W (N), B = dZ (N);
      // with the previous layer's activation derivative (and bias gradient,
      // the row sums of the result) in the epilogue.
      cublasLtEpilogue_t e = CUBLASLT_EPILOGUE_DEFAULT;
      if (f.prev_act == nn::Activation::relu) e = f.prev_grad_bias ? CUBLASLT_EPILOGUE_DRELU_BGRAD : CUBLASLT_EPILOGUE_DRELU;
      if (f.prev_act == nn::Activation::gelu) e = f.prev_grad_bias ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
      matmul(dtype, Key{dtype, e, CUBLAS_OP_N, CUBLAS_OP_N, in, batch, out, in, out, in}, w, dz, dx,
             f.prev_grad_bias, f.prev_act == nn::Activation::none ? nullptr : f.prev_aux, f.prev_aux_ld, stream);
    }
  }

  void convert(DType from, const void* src, DType to, void* dst, std::int64_t n, stream_t stream) override {
    if (n == 0) return;
    nn_detail::with_type(from, [&](auto* from_tag) {
      using From = std::remove_pointer_t<decltype(from_tag)>;
      nn_detail::with_type(to, [&](auto* to_tag) {
        using To = std::remove_pointer_t<decltype(to_tag)>;
        launch_convert(static_cast<const From*>(src), static_cast<To*>(dst), n, stream);
      });
    });
  }

  void activation_forward(DType dtype, nn::Activation act, const void* x, void* y, std::int64_t n,
                          stream_t stream) override {
    if (n == 0) return;
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      nn_detail::activation_forward_kernel<T><<<grid_for(n), block_threads, 0, stream>>>(
          act, static_cast<const T*>(x), static_cast<T*>(y), n);
    });
    MIXPREC_CUDA_CHECK_LAUNCH("activation_forward_kernel");
  }

  void activation_backward(DType dtype, nn::Activation act, const void* x, const void* dy, void* dx,
                           std::int64_t n, stream_t stream) override {
    if (n == 0) return;
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      nn_detail::activation_backward_kernel<T><<<grid_for(n), block_threads, 0, stream>>>(
          act, static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx), n);
    });
    MIXPREC_CUDA_CHECK_LAUNCH("activation_backward_kernel");
  }

  void softmax_cross_entropy(DType dtype, const void* logits, const std::int32_t* labels, std::int64_t batch,
                             std::int64_t classes, const float* scale, void* dlogits, float* loss, int* bad_label,
                             stream_t stream) override {
    float* rows = static_cast<float*>(scratch(static_cast<std::size_t>(batch) * sizeof(float), 1));
    const unsigned blocks = static_cast<unsigned>((batch * 32 + block_threads - 1) / block_threads);
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      nn_detail::softmax_xent_kernel<T><<<blocks, block_threads, 0, stream>>>(
          static_cast<const T*>(logits), labels, batch, classes, scale, static_cast<T*>(dlogits), rows, bad_label,
          loss);
    });
    MIXPREC_CUDA_CHECK_LAUNCH("softmax_xent_kernel");
  }

  void mse(DType dtype, const void* y, const void* target, std::int64_t n, const float* scale, void* dy,
           float* loss, stream_t stream) override {
    const unsigned blocks = grid_for(n);
    float* sums = static_cast<float*>(scratch(blocks * sizeof(float), 1));
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      nn_detail::mse_kernel<T><<<blocks, block_threads, 0, stream>>>(
          static_cast<const T*>(y), static_cast<const T*>(target), n, scale, static_cast<T*>(dy), sums);
    });
    MIXPREC_CUDA_CHECK_LAUNCH("mse_kernel");
    nn_detail::mean_kernel<<<1, 32, 0, stream>>>(sums, blocks, static_cast<double>(n), loss);
    MIXPREC_CUDA_CHECK_LAUNCH("mean_kernel");
  }

  // --- data: batches, running sums, accuracy ------------------------------

  void gather_batch(const void* rows, std::size_t row_bytes, const std::int32_t* row_labels,
                    const std::int32_t* order, std::int64_t n, std::int64_t* cursor, std::int64_t batch, void* x,
                    std::int32_t* labels, stream_t stream) override {
    if (batch > 0) {
      const bool vector = row_bytes % 16 == 0 && reinterpret_cast<std::uintptr_t>(rows) % 16 == 0 &&
                          reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
      nn_detail::gather_batch_kernel<<<static_cast<unsigned>(batch), 128, 0, stream>>>(
          static_cast<const unsigned char*>(rows), row_bytes, row_labels, order, n, cursor, batch,
          static_cast<unsigned char*>(x), labels, vector);
      MIXPREC_CUDA_CHECK_LAUNCH("gather_batch_kernel");  // it advances the cursor too
      return;
    }
    nn_detail::advance_kernel<<<1, 1, 0, stream>>>(cursor);
    MIXPREC_CUDA_CHECK_LAUNCH("advance_kernel");
  }

  void accumulate(float* sum, const float* value, stream_t stream) override {
    nn_detail::accumulate_kernel<<<1, 1, 0, stream>>>(sum, value);
    MIXPREC_CUDA_CHECK_LAUNCH("accumulate_kernel");
  }

  void count_correct(DType dtype, const void* logits, const std::int32_t* labels, std::int64_t batch,
                     std::int64_t classes, std::int64_t* correct, stream_t stream) override {
    if (batch == 0) return;
    static_assert(sizeof(unsigned long long) == sizeof(std::int64_t));
    const unsigned blocks = static_cast<unsigned>((batch * 32 + block_threads - 1) / block_threads);
    nn_detail::with_type(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      nn_detail::count_correct_kernel<T><<<blocks, block_threads, 0, stream>>>(
          static_cast<const T*>(logits), labels, batch, classes, reinterpret_cast<unsigned long long*>(correct));
    });
    MIXPREC_CUDA_CHECK_LAUNCH("count_correct_kernel");
  }

 private:
  // One GEMM's shape and epilogue: D[m, n] (column-major, ld ldd) =
  // op(A)[m, k] * op(B)[k, n].
  struct Key {
    DType dtype;
    cublasLtEpilogue_t epilogue;
    cublasOperation_t transa, transb;
    std::int64_t m, n, k, lda, ldb, ldd;
    bool operator<(const Key& o) const {
      return std::tie(dtype, epilogue, transa, transb, m, n, k, lda, ldb, ldd) <
             std::tie(o.dtype, o.epilogue, o.transa, o.transb, o.m, o.n, o.k, o.lda, o.ldb, o.ldd);
    }
  };
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    nn::GemmPlanInfo info{};
  };
  // Timed choice: candidates asked of the heuristic, calls a timing round,
  // rounds (the best round counts), and the margin by which a candidate must
  // beat the heuristic's first to replace it (fewer flips between runs).
  static constexpr int kCandidates = 16, kTimedCalls = 5, kTimedRounds = 3;
  static constexpr double kTimedMargin = 0.97;
  // About 100 us at Hopper's clocks: the host queues a candidate's calls meanwhile.
  static constexpr long long kSpinCycles = 200000;

  static void destroy(Plan& p) {
    if (p.desc) (void)cublasLtMatmulDescDestroy(p.desc);
    if (p.a) (void)cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) (void)cublasLtMatrixLayoutDestroy(p.b);
    if (p.d) (void)cublasLtMatrixLayoutDestroy(p.d);
  }

  void ensure_handle() {
    if (handle_) return;
    MIXPREC_CUBLAS_CHECK(cublasLtCreate(&handle_));
    int device = 0;
    MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
    workspace_ = Buffer(kWorkspace, Device::cuda(device));
  }

  // Device scratch of at least `bytes` (slot 0: activation gradients, slot
  // 1: loss partials, 2: cuDNN's workspace, 3: conv bias and weight
  // partials, 4: a convolution's dz). Grows by allocating a bigger buffer (cudaMalloc: not
  // inside a capture, so the first call of a shape runs eagerly); later
  // calls and graph replays reuse it, and an outgrown one is kept alive.
  void* scratch(std::size_t bytes, int slot = 0) {
    Buffer& b = scratch_[slot];
    if (b.bytes() < bytes) {
      int device = 0;
      MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
      Buffer bigger(bytes, Device::cuda(device));
      // The old buffer stays allocated until this object goes: queued work
      // and captured CUDA graphs may still point into it.
      if (b.data() != nullptr) retired_.push_back(std::move(b));
      b = std::move(bigger);
    }
    return b.data();
  }

  Plan& plan_for(const Key& key, const void* a, const void* b, void* d, const void* bias, const void* aux,
                 std::int64_t aux_ld, stream_t stream) {
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    const bool timed = gemm_algorithms_ == nn::GemmAlgorithms::timed;
    if (timed) require_not_capturing(key, stream);  // before anything is made
    ensure_handle();
    // What is made here is freed on any throw until the plan is stored.
    struct Making {
      Plan plan;
      cublasLtMatmulPreference_t pref = nullptr;
      bool stored = false;
      ~Making() {
        if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
        if (!stored) destroy(plan);
      }
    } making;
    Plan& p = making.plan;
    const cudaDataType_t t = nn_detail::cuda_type(key.dtype);
    MIXPREC_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    MIXPREC_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &key.transa, sizeof key.transa));
    MIXPREC_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &key.transb, sizeof key.transb));
    MIXPREC_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &key.epilogue, sizeof key.epilogue));
    // The heuristic looks at the real pointers' alignment.
    set_pointers(p, bias, aux, aux_ld);
    const auto rows = [](cublasOperation_t op, std::int64_t r, std::int64_t c) { return op == CUBLAS_OP_N ? r : c; };
    const auto cols = [](cublasOperation_t op, std::int64_t r, std::int64_t c) { return op == CUBLAS_OP_N ? c : r; };
    MIXPREC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, t, rows(key.transa, key.m, key.k),
                                                    cols(key.transa, key.m, key.k), key.lda));
    MIXPREC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, t, rows(key.transb, key.k, key.n),
                                                    cols(key.transb, key.k, key.n), key.ldb));
    MIXPREC_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.d, t, key.m, key.n, key.ldd));
    MIXPREC_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&making.pref));
    const std::uint64_t ws = kWorkspace;
    MIXPREC_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(making.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                              &ws, sizeof ws));
    if (key.dtype != DType::float32) {
      // Split-K partial sums in the compute type (fp32) only: the INPLACE
      // and OUTPUT_TYPE schemes keep them in the 16-bit output type. Without
      // this mask the heuristic's first answer for one of the bf16 GEMMs of
      // the MLP at hidden 1024, batch 256 was such an algorithm (H100, CUDA
      // 13.0: bench_layers' partials16); without it two heuristic plans of
      // gemm_algorithms_gpu_test kept 16-bit partial sums and the bf16 input
      // gradients of narrow_linear_gpu_test's shapes came up to 870 times
      // further from the float64 sum than fp32 accumulation and one
      // rounding allow (2026-12-07); a candidate list reaches them more often.
      const std::uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;  // NONE (0) passes too
      MIXPREC_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          making.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes));
    }
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.d, p.d, making.pref,
                                                             timed ? kCandidates : 1, results, &found);
    MIXPREC_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0, "cuBLASLt has no algorithm for a ",
                  dtype_name(key.dtype), " GEMM m = ", key.m, ", n = ", key.n, ", k = ", key.k, " with epilogue ",
                  static_cast<int>(key.epilogue), " (", cublasGetStatusName(st), ")");
    p.algo = results[0].algo;
    p.info = nn::GemmPlanInfo{};
    p.info.dtype = key.dtype;
    p.info.m = key.m;
    p.info.n = key.n;
    p.info.k = key.k;
    p.info.epilogue = static_cast<int>(key.epilogue);
    p.info.candidates = found;
    if (timed) choose_by_time(p, key, results, found, a, b, d, stream);
    MIXPREC_CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&p.algo, CUBLASLT_ALGO_CONFIG_ID, &p.info.algo_id,
                                                             sizeof p.info.algo_id, nullptr));
    MIXPREC_CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&p.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                                                             &p.info.split_k, sizeof p.info.split_k, nullptr));
    MIXPREC_CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&p.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                                                             &p.info.reduction_scheme,
                                                             sizeof p.info.reduction_scheme, nullptr));
    Plan& stored = plans_.emplace(key, p).first->second;
    making.stored = true;
    return stored;
  }

  // Timing runs work on the stream and waits for it: not in a capture.
  static void require_not_capturing(const Key& key, stream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaError_t e = cudaStreamIsCapturing(stream, &capture);
    // The legacy stream while another stream captures globally: the same.
    const bool capturing = e == cudaErrorStreamCaptureImplicit || capture != cudaStreamCaptureStatusNone;
    if (e == cudaErrorStreamCaptureImplicit) (void)cudaGetLastError();
    if (!capturing) MIXPREC_CUDA_CHECK(e);
    MIXPREC_CHECK(!capturing, "timed GEMM algorithms: the ", dtype_name(key.dtype), " GEMM m = ", key.m,
                  ", n = ", key.n, ", k = ", key.k, " (epilogue ", static_cast<int>(key.epilogue),
                  ") is first met inside a CUDA graph capture, where its candidates cannot be timed; run one "
                  "step eagerly before capturing, or use GemmAlgorithms::heuristic");
  }

  // Times the heuristic's candidates on this call's operands (each writes
  // the same d, and the call that follows overwrites it) and keeps the
  // fastest when it beats the first by kTimedMargin. A candidate's calls
  // are queued behind a spinning kernel, so they run back to back as in a
  // graph replay (no launch gaps timed); each round visits the candidates
  // in turn (none is favoured by the clocks' warming up) and waits for the
  // stream once.
  void choose_by_time(Plan& p, const Key& key, const cublasLtMatmulHeuristicResult_t* results, int found,
                      const void* a, const void* b, void* d, stream_t stream) {
    struct Events {
      std::vector<cudaEvent_t> all;
      ~Events() {
        for (cudaEvent_t e : all) (void)cudaEventDestroy(e);
      }
      cudaEvent_t make() {
        cudaEvent_t e = nullptr;
        MIXPREC_CUDA_CHECK(cudaEventCreate(&e));
        all.push_back(e);
        return e;
      }
    } events;
    const float alpha = 1.0f, beta = 0.0f;
    const auto call = [&](int i) {
      return cublasLtMatmul(handle_, p.desc, &alpha, a, p.a, b, p.b, &beta, d, p.d, d, p.d, &results[i].algo,
                            workspace_.data(), workspace_.bytes(), stream);
    };
    // A candidate cuBLASLt cannot run here is left out; any other failure
    // is an error (it may have come from the device).
    std::vector<int> runs;
    for (int i = 0; i < found; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
      const cublasStatus_t st = call(i);  // also the warm-up
      if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE ||
          st == CUBLAS_STATUS_ARCH_MISMATCH) {
        continue;
      }
      MIXPREC_CUBLAS_CHECK(st);
      runs.push_back(i);
    }
    MIXPREC_CHECK(!runs.empty(), "timed GEMM algorithms: none of cuBLASLt's ", found, " candidates for the ",
                  dtype_name(key.dtype), " GEMM m = ", key.m, ", n = ", key.n, ", k = ", key.k, " ran");
    std::vector<cudaEvent_t> starts(runs.size()), stops(runs.size());
    for (std::size_t r = 0; r < runs.size(); ++r) {
      starts[r] = events.make();
      stops[r] = events.make();
    }
    std::vector<double> us(static_cast<std::size_t>(found), -1.0);  // -1: not timed
    for (int round = 0; round < kTimedRounds; ++round) {
      for (std::size_t r = 0; r < runs.size(); ++r) {
        nn_detail::spin_kernel<<<1, 1, 0, stream>>>(kSpinCycles);  // while the calls are queued
        MIXPREC_CUDA_CHECK_LAUNCH("spin_kernel");
        MIXPREC_CUDA_CHECK(cudaEventRecord(starts[r], stream));
        for (int c = 0; c < kTimedCalls; ++c) MIXPREC_CUBLAS_CHECK(call(runs[r]));
        MIXPREC_CUDA_CHECK(cudaEventRecord(stops[r], stream));
      }
      MIXPREC_CUDA_CHECK(cudaEventSynchronize(stops.back()));
      for (std::size_t r = 0; r < runs.size(); ++r) {
        float ms = 0.0f;
        MIXPREC_CUDA_CHECK(cudaEventElapsedTime(&ms, starts[r], stops[r]));
        double& best = us[static_cast<std::size_t>(runs[r])];
        const double per_call = 1000.0 * static_cast<double>(ms) / kTimedCalls;
        if (best < 0.0 || per_call < best) best = per_call;
      }
    }
    int fastest = runs.front();
    for (int i : runs) {
      if (us[static_cast<std::size_t>(i)] < us[static_cast<std::size_t>(fastest)]) fastest = i;
    }
    const double first = us[0], best = us[static_cast<std::size_t>(fastest)];
    // The heuristic's first stays unless beaten by the margin (or unable to run).
    const int chosen = first >= 0.0 && !(best < kTimedMargin * first) ? 0 : fastest;
    p.algo = results[chosen].algo;
    p.info.timed = static_cast<int>(runs.size());
    p.info.chosen = chosen;
    p.info.first_us = first < 0.0 ? 0.0 : first;
    p.info.fastest_us = best;
    p.info.chosen_us = us[static_cast<std::size_t>(chosen)];
  }

  static void set_pointers(Plan& p, const void* bias, const void* aux, std::int64_t aux_ld) {
    if (bias) {
      MIXPREC_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    if (aux) {
      MIXPREC_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux));
      MIXPREC_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld));
    }
  }

  void matmul(DType, const Key& key, const void* a, const void* b, void* d, const void* bias, const void* aux,
              std::int64_t aux_ld, stream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    Plan& p = plan_for(key, a, b, d, bias, aux, aux_ld, stream);
    set_pointers(p, bias, aux, aux_ld);  // this call's buffers (the plan may be shared by layers)
    const float alpha = 1.0f, beta = 0.0f;
    MIXPREC_CUBLAS_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, a, p.a, b, p.b, &beta, d, p.d, d, p.d, &p.algo,
                                        workspace_.data(), workspace_.bytes(), stream));
  }

#if MIXPREC_WITH_CUDNN
  // One convolution's descriptors and algorithms: the fastest that cuDNN's
  // heuristics rank first among the deterministic ones (so a replayed step
  // gives the eager bits) with at most kWorkspace of workspace.
  struct ConvPlan {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    cudnnConvolutionFwdAlgo_t fwd{};
    cudnnConvolutionBwdDataAlgo_t bwd_data{};
    cudnnConvolutionBwdFilterAlgo_t bwd_filter{};
    std::size_t ws = 0;
  };
  static cudnnDataType_t cudnn_type(DType d) {
    return d == DType::float16 ? CUDNN_DATA_HALF : d == DType::bfloat16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  }
  void ensure_cudnn() {
    if (!cudnn_) MIXPREC_CUDNN_CHECK(cudnnCreate(&cudnn_));
  }
  static cudnnTensorDescriptor_t tensor4d(cudnnDataType_t t, std::int64_t n, std::int64_t c, std::int64_t h,
                                          std::int64_t w) {
    cudnnTensorDescriptor_t d = nullptr;
    MIXPREC_CUDNN_CHECK(cudnnCreateTensorDescriptor(&d));
    MIXPREC_CUDNN_CHECK(cudnnSetTensor4dDescriptor(d, CUDNN_TENSOR_NCHW, t, static_cast<int>(n), static_cast<int>(c),
                                                   static_cast<int>(h), static_cast<int>(w)));
    return d;
  }
  template <class Perf>
  static const Perf* pick(const Perf* perf, int count, const char* what, const nn::ConvShape& s) {
    for (int i = 0; i < count; ++i) {
      if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC &&
          perf[i].memory <= kWorkspace) {
        return &perf[i];
      }
    }
    mixprec::detail::throw_error("cuDNN has no deterministic ", what, " algorithm for a convolution of [", s.n, ", ",
                                 s.c, ", ", s.h, ", ", s.w, "] with ", s.k, " filters of ", s.r, "x", s.s);
  }

  ConvPlan& conv_plan(DType dtype, const nn::ConvShape& s) {
    const auto key = std::make_tuple(dtype, s.n, s.c, s.h, s.w, s.k, s.r, s.stride, s.pad);
    auto it = conv_plans_.find(key);
    if (it != conv_plans_.end()) return it->second;
    ensure_cudnn();
    ConvPlan p;
    const cudnnDataType_t t = cudnn_type(dtype);
    p.x = tensor4d(t, s.n, s.c, s.h, s.w);
    p.y = tensor4d(t, s.n, s.k, s.p, s.q);
    MIXPREC_CUDNN_CHECK(cudnnCreateFilterDescriptor(&p.w));
    MIXPREC_CUDNN_CHECK(cudnnSetFilter4dDescriptor(p.w, t, CUDNN_TENSOR_NCHW, static_cast<int>(s.k),
                                                   static_cast<int>(s.c), static_cast<int>(s.r), static_cast<int>(s.s)));
    MIXPREC_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&p.conv));
    MIXPREC_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(p.conv, static_cast<int>(s.pad), static_cast<int>(s.pad),
                                                        static_cast<int>(s.stride), static_cast<int>(s.stride), 1, 1,
                                                        CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    // fp32 data: plain FMA math (no TF32), so fp32 means fp32; 16-bit
    // data: tensor cores.
    MIXPREC_CUDNN_CHECK(cudnnSetConvolutionMathType(
        p.conv, dtype == DType::float32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH));
    constexpr int kAlgos = 16;
    int count = 0;
    cudnnConvolutionFwdAlgoPerf_t fwd[kAlgos];
    MIXPREC_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(cudnn_, p.x, p.w, p.conv, p.y, kAlgos, &count, fwd));
    const auto* f = pick(fwd, count, "forward", s);
    cudnnConvolutionBwdDataAlgoPerf_t data[kAlgos];
    MIXPREC_CUDNN_CHECK(
        cudnnGetConvolutionBackwardDataAlgorithm_v7(cudnn_, p.w, p.y, p.conv, p.x, kAlgos, &count, data));
    const auto* d = pick(data, count, "backward-data", s);
    cudnnConvolutionBwdFilterAlgoPerf_t filter[kAlgos];
    MIXPREC_CUDNN_CHECK(
        cudnnGetConvolutionBackwardFilterAlgorithm_v7(cudnn_, p.x, p.y, p.conv, p.w, kAlgos, &count, filter));
    const auto* g = pick(filter, count, "backward-filter", s);
    p.fwd = f->algo;
    p.bwd_data = d->algo;
    p.bwd_filter = g->algo;
    p.ws = std::max({f->memory, d->memory, g->memory});
    return conv_plans_.emplace(key, p).first->second;
  }

  // cuDNN's workspace: scratch slot 2, grown as needed.
  void* workspace(std::size_t bytes) { return bytes == 0 ? nullptr : scratch(bytes, 2); }
#endif

  static constexpr std::size_t kWorkspace = std::size_t{32} << 20;
  cublasLtHandle_t handle_ = nullptr;
  Buffer workspace_;
  Buffer scratch_[5];
  std::vector<Buffer> retired_;  // outgrown scratch, kept for graphs that captured it
#if MIXPREC_WITH_CUDNN
  cudnnHandle_t cudnn_ = nullptr;
  using ShapeKey = std::tuple<DType, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                              std::int64_t, std::int64_t, std::int64_t>;
  std::map<ShapeKey, ConvPlan> conv_plans_;
#endif
  std::map<Key, Plan> plans_;
  std::vector<Plan> retired_plans_;  // planned under another GemmAlgorithms setting
  nn::GemmAlgorithms gemm_algorithms_ = nn::GemmAlgorithms::heuristic;
  std::atomic<bool> narrow_linear_{false};  // nn::set_narrow_linear
  mutable std::mutex mutex_;
};

}  // namespace cuda
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// Element-type conversion of device arrays, with the bits of the scalar
// mixprec::convert (round to nearest even, canonical NaN).
#pragma once

#include <cstdint>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

template <class From, class To>
__global__ void convert_kernel(const From* __restrict__ src, To* __restrict__ dst,
                               std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = mixprec::convert<To>(src[i]);
  }
}

/// dst[i] = convert<To>(src[i]) for i < n, on the current device.
/// Asynchronous on `stream`; never synchronises. Launch errors throw.
template <class From, class To>
void launch_convert(const From* src, To* dst, std::int64_t n, cudaStream_t stream = nullptr) {
  MIXPREC_CHECK(n >= 0, "launch_convert: n = ", n, ", must be >= 0");
  MIXPREC_CHECK(n == 0 || (src != nullptr && dst != nullptr), "launch_convert: src = ",
                static_cast<const void*>(src), ", dst = ", static_cast<const void*>(dst),
                " with n = ", n);
  if (n == 0) return;
  convert_kernel<From, To><<<grid_for(n), block_threads, 0, stream>>>(src, dst, n);
  MIXPREC_CUDA_CHECK_LAUNCH("convert_kernel");
}

/// Converts between two device views of the same shape (see above).
template <class From, class To>
void launch_convert(TensorView<const From> src, TensorView<To> dst, cudaStream_t stream = nullptr) {
  MIXPREC_CHECK(src.shape() == dst.shape(), "launch_convert: src shape ", src.shape(),
                " != dst shape ", dst.shape());
  MIXPREC_CHECK(src.device().is_cuda() && src.device() == dst.device(), "launch_convert: src on ",
                src.device(), ", dst on ", dst.device(), "; both must be on one CUDA device");
  mixprec::detail::DeviceGuard guard(src.device());
  launch_convert(src.data(), dst.data(), src.numel(), stream);
}

}  // namespace cuda
MIXPREC_NAMESPACE_END

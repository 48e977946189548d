// SPDX-License-Identifier: Apache-2.0
// Checked calls into the CUDA runtime, cuBLAS and cuDNN: a failure becomes a
// mixprec::Error carrying the call, the status name and file:line.
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"

#if MIXPREC_WITH_CUDA
#include <cuda_runtime_api.h>

MIXPREC_NAMESPACE_BEGIN namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file,
                                          int line) {
  throw_error(call, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
              ") at ", file, ":", line);
}

}  // namespace detail
MIXPREC_NAMESPACE_END

/// Evaluates a CUDA runtime call and throws mixprec::Error unless it returns
/// cudaSuccess.
#define MIXPREC_CUDA_CHECK(call)                                                 \
  do {                                                                           \
    const cudaError_t mixprec_status_ = (call);                                  \
    if (mixprec_status_ != cudaSuccess) {                                        \
      ::mixprec::detail::throw_cuda_error(mixprec_status_, #call, __FILE__, __LINE__); \
    }                                                                            \
  } while (false)

/// Checks the launch that just happened (configuration errors, and with
/// CUDA_LAUNCH_BLOCKING=1 execution errors too). Does not synchronise.
#define MIXPREC_CUDA_CHECK_LAUNCH(kernel_name)                                          \
  do {                                                                                  \
    const cudaError_t mixprec_status_ = cudaGetLastError();                             \
    if (mixprec_status_ != cudaSuccess) {                                               \
      ::mixprec::detail::throw_cuda_error(mixprec_status_, "launch of " kernel_name, __FILE__, \
                                          __LINE__);                                    \
    }                                                                                   \
  } while (false)

#endif  // MIXPREC_WITH_CUDA

// SPDX-License-Identifier: Apache-2.0
// Checked cuBLAS / cuBLASLt calls: a failure becomes a mixprec::Error with the
// call, the status name and file:line. Needs the mixprec::cuda target.
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"

#if MIXPREC_WITH_CUDA
#include <cublas_api.h>

MIXPREC_NAMESPACE_BEGIN namespace detail {

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call,
                                            const char* file, int line) {
  throw_error(call, " failed: ", cublasGetStatusName(status), " (", cublasGetStatusString(status),
              ") at ", file, ":", line);
}

}  // namespace detail
MIXPREC_NAMESPACE_END

#define MIXPREC_CUBLAS_CHECK(call)                                                 \
  do {                                                                             \
    const cublasStatus_t mixprec_status_ = (call);                                 \
    if (mixprec_status_ != CUBLAS_STATUS_SUCCESS) {                                \
      ::mixprec::detail::throw_cublas_error(mixprec_status_, #call, __FILE__, __LINE__); \
    }                                                                              \
  } while (false)

#endif  // MIXPREC_WITH_CUDA

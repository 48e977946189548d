// SPDX-License-Identifier: Apache-2.0
// Checked cuDNN calls: a failure becomes a mixprec::Error with the call, the
// status name and file:line. Needs the mixprec::cuda target, configured
// with cuDNN (MIXPREC_WITH_CUDNN); without it this header declares nothing.
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"

#if MIXPREC_WITH_CUDA && MIXPREC_WITH_CUDNN
#include <cudnn.h>

MIXPREC_NAMESPACE_BEGIN namespace detail {

[[noreturn]] inline void throw_cudnn_error(cudnnStatus_t status, const char* call,
                                           const char* file, int line) {
  // cudnnGetErrorString returns the enumerator's name, e.g. CUDNN_STATUS_BAD_PARAM.
  throw_error(call, " failed: ", cudnnGetErrorString(status), " at ", file, ":", line);
}

}  // namespace detail
MIXPREC_NAMESPACE_END

#define MIXPREC_CUDNN_CHECK(call)                                                 \
  do {                                                                            \
    const cudnnStatus_t mixprec_status_ = (call);                                 \
    if (mixprec_status_ != CUDNN_STATUS_SUCCESS) {                                \
      ::mixprec::detail::throw_cudnn_error(mixprec_status_, #call, __FILE__, __LINE__); \
    }                                                                             \
  } while (false)

#endif  // MIXPREC_WITH_CUDA && MIXPREC_WITH_CUDNN

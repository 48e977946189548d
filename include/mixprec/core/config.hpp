// SPDX-License-Identifier: Apache-2.0
// Build configuration shared by every mixprec header: version (from
// mixprec/version.hpp), host/device annotations and whether the host API may
// call the CUDA runtime.
#pragma once

#include "mixprec/version.hpp"

// Functions that must compile for both the host and the device (numeric
// formulas, conversions) carry MIXPREC_HOST_DEVICE. Under g++ it expands to
// nothing, so the same header serves the CPU path.
#if defined(__CUDACC__)
#define MIXPREC_HOST_DEVICE __host__ __device__
#else
#define MIXPREC_HOST_DEVICE
#endif

// MIXPREC_WITH_CUDA = 1 lets the host API (plain C++, g++ is enough) allocate
// device memory and copy through the CUDA runtime. The CMake target
// mixprec::cuda defines it; every translation unit of one program must agree
// on it, so link that target rather than defining the macro by hand.
#if !defined(MIXPREC_WITH_CUDA)
#define MIXPREC_WITH_CUDA 0
#endif

// MIXPREC_WITH_CUDNN = 1: mixprec::cuda found cuDNN, which Conv2d uses on
// a GPU (without it Conv2d throws, naming what is missing; MaxPool2d runs
// on mixprec's own kernels either way).
// Set by the target, like MIXPREC_WITH_CUDA.
#if !defined(MIXPREC_WITH_CUDNN)
#define MIXPREC_WITH_CUDNN 0
#endif

#if (MIXPREC_WITH_CUDA != 0 && MIXPREC_WITH_CUDA != 1) || (MIXPREC_WITH_CUDNN != 0 && MIXPREC_WITH_CUDNN != 1)
#error "mixprec: MIXPREC_WITH_CUDA and MIXPREC_WITH_CUDNN must be 0 or 1"
#endif

// The ABI namespace. The two macros above change the bodies of inline
// functions (a device tensor is an error without CUDA, a call to the CUDA
// runtime with it), so two translation units that disagree on them would
// break the one-definition rule: the linker keeps one body of each inline
// function, and which one is chosen silently. Every name of mixprec lives in
// an inline namespace named after the two values, `mixprec::cuda0_cudnn0`
// (the host-only target), `cuda1_cudnn0` or `cuda1_cudnn1` (mixprec::cuda):
// users still write `mixprec::AdamW`, but the mangled names differ, so such
// translation units keep apart (docs/architecture.md#the-abi-namespace).
// Every mixprec header opens its namespaces with these two macros (C++17
// cannot write `inline` in a nested namespace definition).
#define MIXPREC_ABI_CAT_(a, b, c, d) a##b##c##d
#define MIXPREC_ABI_CAT(a, b, c, d) MIXPREC_ABI_CAT_(a, b, c, d)
#define MIXPREC_ABI_NAMESPACE MIXPREC_ABI_CAT(cuda, MIXPREC_WITH_CUDA, _cudnn, MIXPREC_WITH_CUDNN)
#define MIXPREC_NAMESPACE_BEGIN \
  namespace mixprec {           \
  inline namespace MIXPREC_ABI_NAMESPACE {
#define MIXPREC_NAMESPACE_END \
  }                           \
  }

// The sub-namespaces, declared once inside the ABI namespace: a later
// `namespace mixprec::optim {` (in a test, in your code, or in a header not
// yet written with the macros) then extends these, as the standard says,
// instead of declaring a second mixprec::optim beside them.
MIXPREC_NAMESPACE_BEGIN
namespace amp {}
namespace cuda {}
namespace data {}
namespace detail {}
namespace dist {}
namespace io {}
namespace libtorch {}
namespace math {}
namespace monitor {}
namespace nn {}
namespace optim {}
namespace simd {}
MIXPREC_NAMESPACE_END

// A stream handle that exists in every build: cudaStream_t is
// `CUstream_st*`, and a forward declaration is compatible with the CUDA
// headers whether or not they are included. nullptr is the default stream.
struct CUstream_st;
MIXPREC_NAMESPACE_BEGIN
using stream_t = ::CUstream_st*;
MIXPREC_NAMESPACE_END

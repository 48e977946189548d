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

// MIXPREC_WITH_CUDNN = 1: mixprec::cuda found cuDNN, which Conv2d and
// MaxPool2d use on a GPU (without it they throw, naming what is missing).
// Set by the target, like MIXPREC_WITH_CUDA.
#if !defined(MIXPREC_WITH_CUDNN)
#define MIXPREC_WITH_CUDNN 0
#endif

// A stream handle that exists in every build: cudaStream_t is
// `CUstream_st*`, and a forward declaration is compatible with the CUDA
// headers whether or not they are included. nullptr is the default stream.
struct CUstream_st;
namespace mixprec {
using stream_t = ::CUstream_st*;
}  // namespace mixprec

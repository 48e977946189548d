// SPDX-License-Identifier: Apache-2.0
// GPU tests skip, with the reason, where no CUDA device is usable.
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#define MIXPREC_SKIP_WITHOUT_GPU()                                                      \
  do {                                                                                  \
    int mixprec_count_ = 0;                                                             \
    const cudaError_t mixprec_status_ = cudaGetDeviceCount(&mixprec_count_);            \
    if (mixprec_status_ != cudaSuccess || mixprec_count_ == 0) {                        \
      (void)cudaGetLastError();                                                         \
      GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount says "                        \
                   << (mixprec_status_ != cudaSuccess ? cudaGetErrorName(mixprec_status_) \
                                                      : "0 devices");                   \
    }                                                                                   \
  } while (false)

namespace mixprec::test {

/// A non-blocking stream for one test, destroyed at the end of its scope
/// (declare it before anything that launches on it).
struct OwnedStream {
  cudaStream_t s = nullptr;
  OwnedStream() { EXPECT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess); }
  ~OwnedStream() { EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess); }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
};

}  // namespace mixprec::test

// SPDX-License-Identifier: Apache-2.0
// This file is compiled with --use_fast_math (tests/CMakeLists.txt): nvcc
// then flushes subnormals even in the _rn intrinsics the update formulas
// use, and the kernels would no longer give the CPU path's bits. The
// backend's probe must refuse them, with the fix in the message.
#include <gtest/gtest.h>

#include "gpu_skip.hpp"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

TEST(FastMath, KernelsBuiltWithFlushToZeroAreRefused) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Tensor<half> w({16}, Device::cuda(0)), g({16}, Device::cuda(0));
  fill(w, 1.0f);
  test::expect_error([&] { optim::SGD opt({{"w", w, g}}); },
                     {"-ftz=true or --use_fast_math", "without those flags"});
}

}  // namespace
}  // namespace mixprec

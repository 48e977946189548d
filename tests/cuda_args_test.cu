// SPDX-License-Identifier: Apache-2.0
// Launchers reject bad arguments before anything reaches the device (runs in
// CI, no GPU needed).
#include <gtest/gtest.h>

#include "mixprec/cuda/convert.cuh"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

TEST(LaunchArguments, ConvertRejectsBadArguments) {
  EXPECT_THROW((cuda::launch_convert<float, half>(nullptr, nullptr, -1)), Error);
  EXPECT_THROW((cuda::launch_convert<float, half>(nullptr, nullptr, 5)), Error);
  float x = 0;
  half y;
  // Host views are refused before anything is launched.
  EXPECT_THROW((cuda::launch_convert<float, half>(TensorView<const float>(&x, {1}),
                                                  TensorView<half>(&y, {1}))),
               Error);
}

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// Launchers reject bad arguments before anything reaches the device (runs in
// CI, no GPU needed).
#include <gtest/gtest.h>

#include <string>

#include "mixprec/cuda/convert.cuh"
#include "mixprec/mixprec.hpp"

// The snippet of docs/getting-started.md ("one .cu file of its own"), kept
// here so that it keeps compiling.
void to_half(mixprec::TensorView<const float> src, mixprec::TensorView<mixprec::half> dst,
             cudaStream_t stream) {
  mixprec::cuda::launch_convert(src, dst, stream);
}

namespace mixprec {
namespace {

TEST(LaunchArguments, DocsSnippetRejectsHostViews) {
  float x[2] = {1.0f, 2.0f};
  half y[2];
  try {
    to_half(TensorView<const float>(x, {2}), TensorView<half>(y, {2}), nullptr);
    ADD_FAILURE() << "host views were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("both must be on one CUDA device"), std::string::npos)
        << e.what();
  }
}

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

// SPDX-License-Identifier: Apache-2.0
// Built only where mixprec::cuda was configured without cuDNN: the CUDA
// target still builds, and Conv2d on a GPU refuses with an error that
// names cuDNN and the fix. No device needed: the layer's device ops throw
// before any CUDA call. (MaxPool2d runs on mixprec's own kernels, with or
// without cuDNN.)
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include <mixprec/cuda/nn_ops.cuh>

namespace {

void expect_refusal(const std::function<void()>& call, const std::string& layer) {
  try {
    call();
    FAIL() << layer << ": no error";
  } catch (const mixprec::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(layer + " on a GPU needs cuDNN"), std::string::npos) << what;
    EXPECT_NE(what.find("CUDNN_ROOT"), std::string::npos) << what;
  }
}

TEST(CudnnMissing, ConvolutionRefusesNamingCudnn) {
  static_assert(!MIXPREC_WITH_CUDNN, "this test is for builds without cuDNN");
  mixprec::cuda::NnOps ops;
  const mixprec::nn::ConvShape conv{};
  const auto f16 = mixprec::DType::float16;
  const auto none = mixprec::nn::Activation::none;
  expect_refusal([&] { ops.conv2d_forward(f16, conv, nullptr, nullptr, nullptr, none, nullptr, nullptr); }, "Conv2d");
  expect_refusal(
      [&] {
        ops.conv2d_backward(f16, conv, nullptr, nullptr, nullptr, nullptr, none, nullptr, nullptr, nullptr, nullptr);
      },
      "Conv2d");
}

}  // namespace

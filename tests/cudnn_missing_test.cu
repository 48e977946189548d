// SPDX-License-Identifier: Apache-2.0
// Built only where mixprec::cuda was configured without cuDNN: the CUDA
// target still builds, and Conv2d / MaxPool2d on a GPU refuse with an error
// that names cuDNN and the fix. No device needed: the layers' device ops
// throw before any CUDA call.
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

TEST(CudnnMissing, ConvolutionAndPoolingRefuseNamingCudnn) {
  static_assert(!MIXPREC_WITH_CUDNN, "this test is for builds without cuDNN");
  mixprec::cuda::NnOps ops;
  const mixprec::nn::ConvShape conv{};
  const mixprec::nn::PoolShape pool{};
  const auto f16 = mixprec::DType::float16;
  expect_refusal([&] { ops.conv2d_forward(f16, conv, nullptr, nullptr, nullptr, nullptr, nullptr); }, "Conv2d");
  expect_refusal([&] { ops.conv2d_backward(f16, conv, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr); },
                 "Conv2d");
  expect_refusal([&] { ops.maxpool2d_forward(f16, pool, nullptr, nullptr, nullptr); }, "MaxPool2d");
  expect_refusal([&] { ops.maxpool2d_backward(f16, pool, nullptr, nullptr, nullptr, nullptr, nullptr); },
                 "MaxPool2d");
}

}  // namespace

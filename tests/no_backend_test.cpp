// SPDX-License-Identifier: Apache-2.0
// A CUDA build whose program has no .cu file including
// <mixprec/cuda/backend.cuh>: device optimizers and DeviceGradScaler refuse
// with an error that names the fix, before touching the device (so this
// runs in CI without a GPU).
#include <gtest/gtest.h>

#include <string>

#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

void expect_backend_error(const std::string& message) {
  EXPECT_NE(message.find("no CUDA kernels are linked"), std::string::npos) << message;
  EXPECT_NE(message.find("<mixprec/cuda/backend.cuh>"), std::string::npos) << message;
  EXPECT_NE(message.find("cuda:0"), std::string::npos) << message;
}

TEST(NoBackend, DeviceOptimizerNamesTheFix) {
  ASSERT_EQ(optim::device_backend(), nullptr);
  // Views over an address that is never dereferenced: the check comes first.
  auto* fake = reinterpret_cast<half*>(std::uintptr_t{1} << 20);
  TensorView<half> w(fake, Shape{4}, Device::cuda(0)), g(fake + 64, Shape{4}, Device::cuda(0));
  try {
    optim::AdamW opt({{"w", w, g}});
    ADD_FAILURE() << "a device optimizer was made without a backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("AdamW"), std::string::npos) << e.what();
    expect_backend_error(e.what());
  }
}

TEST(NoBackend, DeviceGradScalerNamesTheFix) {
  try {
    amp::DeviceGradScaler scaler;
    ADD_FAILURE() << "a DeviceGradScaler was made without a backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("DeviceGradScaler"), std::string::npos) << e.what();
    expect_backend_error(e.what());
  }
}

TEST(NoBackend, GemmAlgorithmsNamesTheFix) {
  try {
    nn::set_gemm_algorithms(nn::GemmAlgorithms::timed);
    ADD_FAILURE() << "set_gemm_algorithms succeeded without a backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("set_gemm_algorithms"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no CUDA kernels are linked"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("<mixprec/cuda/backend.cuh>"), std::string::npos) << e.what();
  }
  // A value that is none of the enum's is named, before anything else.
  try {
    nn::set_gemm_algorithms(static_cast<nn::GemmAlgorithms>(-3));
    ADD_FAILURE() << "GemmAlgorithms -3 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("how = -3"), std::string::npos) << e.what();
  }
}

TEST(NoBackend, NarrowLinearNamesTheFix) {
  try {
    nn::set_narrow_linear(false);
    ADD_FAILURE() << "set_narrow_linear succeeded without a backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("set_narrow_linear"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("<mixprec/cuda/backend.cuh>"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mixprec

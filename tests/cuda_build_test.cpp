// SPDX-License-Identifier: Apache-2.0
// Checks of a CUDA build that need no device (they run in CI): the error for
// a device that is not there.
#include <gtest/gtest.h>

#include <string>

#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

TEST(CudaBuild, MissingDeviceIsAClearError) {
  EXPECT_TRUE(built_with_cuda());
  const int count = cuda_device_count();
  try {
    Tensor<float> t({4}, Device::cuda(count));
    ADD_FAILURE() << "allocating on cuda:" << count << " did not throw";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("cuda:" + std::to_string(count)), std::string::npos) << message;
    EXPECT_NE(message.find("CUDA device(s) are usable"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace mixprec

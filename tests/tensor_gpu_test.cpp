// SPDX-License-Identifier: Apache-2.0
// Tensors on a CUDA device through the host API, compiled by g++ against
// mixprec::cuda: allocation, copies both ways, fills, seeded random values
// equal to the host's, and the errors for devices that are not there.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

template <class T>
class TensorGpu : public ::testing::Test {};
using ElementTypes = ::testing::Types<half, bfloat16, float>;
TYPED_TEST_SUITE(TensorGpu, ElementTypes);

template <class T>
void expect_same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  ASSERT_EQ(a.shape(), b.shape());
  for (std::int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(to_bits(a.at(i)), to_bits(b.at(i))) << i;
}

TYPED_TEST(TensorGpu, RoundTripThroughTheDevice) {
  MIXPREC_SKIP_WITHOUT_GPU();
  using T = TypeParam;
  for (std::int64_t n : {1, 1000, (1 << 20) + 3}) {
    Tensor<T> host({n});
    fill_normal(host, 0.0f, 1.0f, static_cast<std::uint64_t>(n));
    Tensor<T> device = host.to(Device::cuda(0));
    EXPECT_EQ(device.device(), Device::cuda(0));
    Tensor<T> device2 = device.clone();  // device to device
    Tensor<T> back({n});
    fill(back, -7.0f);  // poison
    copy(device2, back);
    expect_same_bits(host, back);
  }
}

TYPED_TEST(TensorGpu, FillOnDeviceWritesEveryElement) {
  MIXPREC_SKIP_WITHOUT_GPU();
  using T = TypeParam;
  for (std::int64_t n : {1, 2, 3, 1000, (1 << 20) + 7}) {
    for (float value : {0.0f, -0.0f, 0.3f, -65504.0f}) {
      Tensor<T> d({n}, Device::cuda(0));
      fill_uniform(d, 1.0f, 2.0f, 3);  // poison
      fill(d, value);
      Tensor<T> h = d.to(Device::cpu());
      const auto want = to_bits(from_float<T>(value));
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(to_bits(h.at(i)), want) << n << " " << i;
    }
  }
}

TYPED_TEST(TensorGpu, SeededRandomMatchesTheHost) {
  MIXPREC_SKIP_WITHOUT_GPU();
  using T = TypeParam;
  const std::int64_t n = (1 << 21) + 5;  // more than one staging chunk
  Tensor<T> host({n}), device({n}, Device::cuda(0));
  fill_normal(host, 1.0f, 0.5f, 77);
  fill_normal(device, 1.0f, 0.5f, 77);
  expect_same_bits(host, device.to(Device::cpu()));
  fill_uniform(host, -1.0f, 1.0f, 78);
  fill_uniform(device, -1.0f, 1.0f, 78);
  expect_same_bits(host, device.to(Device::cpu()));
}

TEST(TensorGpu, StreamOrderedAllocationOnAStream) {
  MIXPREC_SKIP_WITHOUT_GPU();
  cudaStream_t stream = nullptr;
  MIXPREC_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    Tensor<float> host({4096});
    fill_uniform(host, 0.0f, 1.0f, 1);
    Tensor<float> d({4096}, Device::cuda(0), stream, DeviceAllocator::stream_ordered);
    copy(host, d, stream);
    Tensor<float> back({4096});
    copy(d, back, stream);
    for (std::int64_t i = 0; i < 4096; ++i) ASSERT_EQ(back.at(i), host.at(i));
  }  // freed on the stream before it is destroyed
  MIXPREC_CUDA_CHECK(cudaStreamSynchronize(stream));
  MIXPREC_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(TensorGpu, CudaErrorsNameTheCallAndStatus) {
  MIXPREC_SKIP_WITHOUT_GPU();
  try {
    // More memory than any GPU has.
    Tensor<float> huge({std::int64_t{1} << 50}, Device::cuda(0));
    ADD_FAILURE() << "a 4 PiB allocation succeeded";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("cudaMalloc"), std::string::npos) << message;
    EXPECT_NE(message.find("cudaErrorMemoryAllocation"), std::string::npos) << message;
    EXPECT_NE(message.find("memory.hpp:"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace mixprec

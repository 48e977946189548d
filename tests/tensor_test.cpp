// SPDX-License-Identifier: Apache-2.0
// Tensor, TensorView, Shape, Device and the host operations, on the CPU;
// every error path checks that the message names the argument and value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;

template <class T>
class TensorTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<half, bfloat16, float>;
TYPED_TEST_SUITE(TensorTyped, ElementTypes);

TEST(Shape, CountsAndRejects) {
  EXPECT_EQ(Shape({}).numel(), 1);
  EXPECT_EQ(Shape({3, 0, 2}).numel(), 0);
  EXPECT_EQ(Shape({2, 3, 4}).numel(), 24);
  EXPECT_EQ(Shape({2, 3}).str(), "[2, 3]");
  expect_error([] { Shape({4, -3}); }, {"Shape", "dims[1] = -3", ">= 0"});
  expect_error([] { Shape({1LL << 40, 1LL << 40}); }, {"Shape", "2^63"});
  expect_error([] { (void)Shape({2})[1]; }, {"index = 1"});
}

TEST(Device, ParsesAndPrints) {
  EXPECT_EQ(Device::parse("cpu"), Device::cpu());
  EXPECT_EQ(Device::parse("cuda"), Device::cuda(0));
  EXPECT_EQ(Device::parse("cuda:3"), Device::cuda(3));
  EXPECT_EQ(Device::cuda(2).str(), "cuda:2");
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:1x", ""}) {
    expect_error([&] { Device::parse(bad); }, {"Device::parse", "text = \""});
  }
  expect_error([] { Device::cuda(-1); }, {"index = -1"});
}

TYPED_TEST(TensorTyped, HostStorageIsAlignedAndSized) {
  for (std::int64_t n : {1, 3, 17, 1000}) {
    Tensor<TypeParam> t({n});
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data()) % host_alignment, 0u);
    EXPECT_EQ(t.bytes(), static_cast<std::size_t>(n) * sizeof(TypeParam));
    EXPECT_EQ(t.device(), Device::cpu());
    EXPECT_EQ(t.dtype(), dtype_of<TypeParam>);
  }
  Tensor<TypeParam> empty({0, 5});
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_TRUE(empty.empty());
}

TYPED_TEST(TensorTyped, FillWritesEveryElement) {
  Tensor<TypeParam> t({7, 9});
  fill_uniform(t, -1.0f, 1.0f, 1);  // poison
  fill(t, 0.1f);
  const TypeParam want = from_float<TypeParam>(0.1f);
  for (std::int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(to_bits(t.at(i)), to_bits(want)) << i;
}

TYPED_TEST(TensorTyped, RandomFillsAreSeededAndDistributed) {
  Tensor<TypeParam> a({100000}), b({100000}), c({100000});
  fill_normal(a, 0.5f, 2.0f, 42);
  fill_normal(b, 0.5f, 2.0f, 42);
  fill_normal(c, 0.5f, 2.0f, 43);
  int differ = 0;
  double sum = 0, sum2 = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    ASSERT_EQ(to_bits(a.at(i)), to_bits(b.at(i)));
    differ += to_bits(a.at(i)) != to_bits(c.at(i));
    const double x = to_float(a.at(i));
    sum += x;
    sum2 += x * x;
  }
  EXPECT_GT(differ, 99000);
  const double n = static_cast<double>(a.numel());
  const double mean = sum / n, var = sum2 / n - mean * mean;
  // Standard error of the mean is 2/sqrt(1e5) = 0.0063: 5 sigma = 0.032.
  EXPECT_NEAR(mean, 0.5, 0.032);
  EXPECT_NEAR(std::sqrt(var), 2.0, 0.03);

  Tensor<TypeParam> u({100000});
  fill_uniform(u, -3.0f, 5.0f, 9);
  double lo = 1e9, hi = -1e9, usum = 0;
  for (std::int64_t i = 0; i < u.numel(); ++i) {
    const double x = to_float(u.at(i));
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    usum += x;
  }
  EXPECT_GE(lo, -3.0);
  EXPECT_LE(hi, 5.0);  // may round up to 5 in 16-bit types, never above
  EXPECT_LT(lo, -2.99);
  EXPECT_GT(hi, 4.9);
  EXPECT_NEAR(usum / 100000.0, 1.0, 0.04);  // sd 8/sqrt(12)/sqrt(1e5) = 0.0073
}

TYPED_TEST(TensorTyped, CopyCloneAndConvert) {
  Tensor<TypeParam> a({4, 5});
  fill_normal(a, 0.0f, 1.0f, 5);
  Tensor<TypeParam> b = a.clone();
  ASSERT_NE(a.data(), b.data());
  for (std::int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(to_bits(a.at(i)), to_bits(b.at(i)));

  Tensor<float> wide({4, 5});
  fill(wide, NAN);  // poison
  convert(a, wide);
  for (std::int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(wide.at(i), to_float(a.at(i)));

  Tensor<TypeParam> wrong({5, 4});
  expect_error([&] { copy(a, wrong); }, {"copy", "[4, 5]", "[5, 4]"});
  expect_error([&] { convert(wrong, wide); }, {"convert", "[5, 4]", "[4, 5]"});
}

TEST(TensorView, WrapsUserMemoryWithoutCopy) {
  std::vector<float> user(12);
  for (std::size_t i = 0; i < user.size(); ++i) user[i] = static_cast<float>(i);
  TensorView<float> v(user.data(), {3, 4});
  EXPECT_EQ(v.data(), user.data());
  v.matrix()(1, 2) = -1.0f;  // row-major: element 6
  EXPECT_EQ(user[6], -1.0f);
  EXPECT_EQ(v.flat().sum(), 66.0f - 6.0f - 1.0f);
  TensorView<const float> cv = v;
  EXPECT_EQ(cv.at(11), 11.0f);
  EXPECT_EQ(v.reshape({12}).shape(), Shape({12}));

  expect_error([] { TensorView<float>(nullptr, {2, 3}); }, {"TensorView", "nullptr", "[2, 3]"});
  EXPECT_NO_THROW(TensorView<float>(nullptr, {0, 3}));
  expect_error([&] { v.reshape({5}); }, {"reshape", "[5]", "12"});
  expect_error([&] { (void)v.at(12); }, {"index = 12"});
  expect_error([&] { (void)v.reshape({12}).matrix(); }, {"matrix", "rank 1"});
  expect_error([&] { v.require_aligned(4096 * 1024, "kernel"); }, {"kernel", "not aligned to 4194304"});
  TensorView<float> odd(user.data() + 1, {4});
  EXPECT_FALSE(odd.is_aligned(8));
  expect_error([&] { odd.require_aligned(8, "vector load"); }, {"vector load", "8 bytes"});
}

TEST(TensorView, DeviceViewRefusesHostAccess) {
  float x = 0;
  TensorView<float> v(&x, {1}, Device::cuda(0));
  expect_error([&] { (void)v.at(0); }, {"at", "cuda:0"});
  expect_error([&] { (void)v.flat(); }, {"flat", "cuda:0"});
}

TEST(Errors, ArgumentChecksRejectBadValues) {
  Tensor<float> t({4});
  expect_error([&] { fill_uniform(t, 1.0f, 1.0f, 0); }, {"fill_uniform", "[low, high) = [1, 1)"});
  expect_error([&] { fill_uniform(t, 0.0f, INFINITY, 0); }, {"fill_uniform", "inf"});
  expect_error([&] { fill_normal(t, 0.0f, -1.0f, 0); }, {"fill_normal", "stddev = -1"});
  expect_error([&] { fill_normal(t, NAN, 1.0f, 0); }, {"fill_normal", "mean = nan"});
}

#if !MIXPREC_WITH_CUDA
TEST(Errors, CudaTensorInBuildWithoutCuda) {
  EXPECT_FALSE(built_with_cuda());
  EXPECT_EQ(cuda_device_count(), 0);
  expect_error([] { Tensor<half>({2}, Device::cuda(0)); }, {"cuda:0", "without CUDA", "mixprec::cuda"});
  Tensor<half> host({2});
  expect_error([&] { (void)host.to(Device::cuda(1)); }, {"cuda:1", "without CUDA"});
}
#endif

}  // namespace
}  // namespace mixprec

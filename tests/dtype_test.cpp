// SPDX-License-Identifier: Apache-2.0
// dtype_traits against the format definitions (via the independent decoder)
// and against Eigen's numeric_limits; mixprec's own half and bfloat16 (no
// Eigen in the headers that use them) against Eigen's types, bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/optim/optimizers/adam.hpp"
#include "mixprec/tensor/tensor.hpp"

// Issue 20: the element types, tensors, optimizers and the scaler compile
// without Eigen (only tensor/eigen.hpp and the CPU layers include it).
#ifdef EIGEN_WORLD_VERSION
#error "core/dtype.hpp, tensor/tensor.hpp, the optimizers or the scaler included Eigen"
#endif

#include "mixprec/tensor/eigen.hpp"
#include "reference.hpp"

namespace mixprec {
namespace {

template <class T>
void expect_limits(test::Format f, std::uint16_t max_bits, std::uint16_t one_bits) {
  using traits = dtype_traits<T>;
  EXPECT_EQ(traits::bytes, sizeof(T));
  EXPECT_EQ(traits::exponent_bits, f.exponent_bits);
  EXPECT_EQ(traits::mantissa_bits, f.mantissa_bits);
  EXPECT_EQ(static_cast<double>(traits::max_finite), test::decode(max_bits, f));
  EXPECT_EQ(static_cast<double>(traits::max_finite), f.max_finite());
  EXPECT_EQ(static_cast<double>(traits::min_normal), std::ldexp(1.0, f.min_exponent()));
  EXPECT_EQ(static_cast<double>(traits::smallest_subnormal),
            std::ldexp(1.0, f.min_exponent() - f.mantissa_bits));
  EXPECT_EQ(static_cast<double>(traits::epsilon), std::ldexp(1.0, -f.mantissa_bits));
  // Eigen agrees (its types, the same bits as ours).
  using E = eigen_element_t<T>;
  EXPECT_EQ(traits::max_finite, static_cast<float>((std::numeric_limits<E>::max)()));
  EXPECT_EQ(traits::min_normal, static_cast<float>((std::numeric_limits<E>::min)()));
  EXPECT_EQ(traits::smallest_subnormal, static_cast<float>(std::numeric_limits<E>::denorm_min()));
  // Epsilon by its definition: the gap between 1 and the next value. (Eigen
  // 3.4's numeric_limits<half>::epsilon() returns 2^-13, not 2^-10, so it is
  // not a usable oracle here.)
  EXPECT_EQ(static_cast<double>(traits::epsilon),
            test::decode(static_cast<std::uint16_t>(one_bits + 1), f) - 1.0);
}

TEST(DtypeTraits, Half) {
  expect_limits<half>(test::kHalf, 0x7bff, 0x3c00);
  EXPECT_STREQ(dtype_traits<half>::name, "float16");
  EXPECT_EQ(dtype_of<half>, DType::float16);
}

TEST(DtypeTraits, Bfloat16) {
  expect_limits<bfloat16>(test::kBfloat16, 0x7f7f, 0x3f80);
  EXPECT_STREQ(dtype_traits<bfloat16>::name, "bfloat16");
  EXPECT_EQ(dtype_of<bfloat16>, DType::bfloat16);
}

// mixprec's types against Eigen's: the same bits from float (every non-NaN
// input rounds the same; NaN is canonical in mixprec, as on the GPU), the
// same float back, and the arithmetic Eigen's types do (in float, one
// rounding), over random bit patterns.
template <class T>
void expect_same_as_eigen() {
  using E = eigen_element_t<T>;
  std::mt19937 rng(20);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 200000; ++i) {
    const float x = from_bits<float>(any(rng));
    if (std::isnan(x)) continue;
    const T ours(x);
    const E theirs(x);
    ASSERT_EQ(to_bits(ours), Eigen::numext::bit_cast<std::uint16_t>(theirs)) << x;
    ASSERT_EQ(to_bits(ours), to_bits(from_float<T>(x))) << x;
    const float back = ours;  // implicit and exact
    if (!std::isnan(back)) {
      ASSERT_EQ(back, static_cast<float>(theirs)) << x;
    }
    const T y(from_bits<float>(any(rng)));
    const E ey = Eigen::numext::bit_cast<E>(to_bits(y));
    for (const auto& [got, want] : {std::pair{ours + y, theirs + ey}, std::pair{ours - y, theirs - ey},
                                    std::pair{ours * y, theirs * ey}, std::pair{ours / y, theirs / ey}}) {
      if (std::isnan(static_cast<float>(got))) {
        ASSERT_TRUE(std::isnan(static_cast<float>(want)));
      } else {
        ASSERT_EQ(to_bits(got), Eigen::numext::bit_cast<std::uint16_t>(want)) << x << " op " << float(y);
      }
    }
    ASSERT_EQ(ours < y, theirs < ey);
    ASSERT_EQ(ours == y, theirs == ey);
  }
  EXPECT_EQ(to_bits(T()), 0u);  // zero, as Eigen's default
  EXPECT_EQ(to_bits(-T(1.0f)), to_bits(T(-1.0f)));
  EXPECT_EQ(float(T(3)), 3.0f);  // from other arithmetic types, through float
  EXPECT_EQ(float(T(0.5)), 0.5f);
}

TEST(OwnTypes, HalfIsEigensHalfBitForBit) { expect_same_as_eigen<half>(); }
TEST(OwnTypes, Bfloat16IsEigensBfloat16BitForBit) { expect_same_as_eigen<bfloat16>(); }

TEST(OwnTypes, EigenMapsSeeTheSameBits) {
  Tensor<half> t({2, 3});
  for (std::int64_t i = 0; i < t.numel(); ++i) t.at(i) = half(static_cast<float>(i) * 0.5f);
  const auto m = t.matrix();  // Eigen::Map of Eigen::half
  EXPECT_EQ(static_cast<float>(m(1, 2)), 2.5f);
  EXPECT_EQ(static_cast<float>(t.flat().sum()), 7.5f);
}

TEST(DtypeTraits, Float) {
  EXPECT_EQ(dtype_traits<float>::max_finite, std::ldexp(2.0f - std::ldexp(1.0f, -23), 127));
  EXPECT_EQ(dtype_traits<float>::smallest_subnormal, std::ldexp(1.0f, -149));
  EXPECT_EQ(dtype_traits<float>::bytes, 4u);
  EXPECT_STREQ(dtype_name(DType::float32), "float32");
  EXPECT_EQ(dtype_size(DType::float16), 2u);
  EXPECT_EQ(dtype_size(DType::bfloat16), 2u);
  EXPECT_EQ(dtype_size(DType::float32), 4u);
}

}  // namespace
}  // namespace mixprec

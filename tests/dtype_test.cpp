// SPDX-License-Identifier: Apache-2.0
// dtype_traits against the format definitions (via the independent decoder)
// and against Eigen's numeric_limits.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/dtype.hpp"
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
  // Eigen agrees.
  EXPECT_EQ(traits::max_finite, to_float((std::numeric_limits<T>::max)()));
  EXPECT_EQ(traits::min_normal, to_float((std::numeric_limits<T>::min)()));
  EXPECT_EQ(traits::smallest_subnormal, to_float(std::numeric_limits<T>::denorm_min()));
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

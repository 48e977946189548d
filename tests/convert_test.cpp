// SPDX-License-Identifier: Apache-2.0
// Host conversions against the independent reference in reference.hpp: every
// 16-bit pattern, the rounding boundary cases, and 10^7 random floats, for
// the scalar functions and for the whole-array convert_n.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "reference.hpp"

namespace mixprec {
namespace {

using test::decode;
using test::Format;
using test::kBfloat16;
using test::kHalf;
using test::round_to_format;

float float_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

template <class T>
struct FormatOf;
template <>
struct FormatOf<half> {
  static constexpr Format value = kHalf;
};
template <>
struct FormatOf<bfloat16> {
  static constexpr Format value = kBfloat16;
};

// Checks one narrowing conversion against the reference: same value and same
// sign (so -0 stays -0), and the canonical NaN for NaN inputs.
template <class T>
::testing::AssertionResult narrows_correctly(float x, std::uint16_t got) {
  if (std::isnan(x)) {
    if (got == 0x7fff) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << std::hex << "NaN 0x" << bits_of(x) << " -> 0x" << got
                                         << ", want canonical 0x7fff";
  }
  const double want = round_to_format(x, FormatOf<T>::value);
  const double have = decode(got, FormatOf<T>::value);
  if (have == want && std::signbit(have) == std::signbit(want)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << std::hexfloat << x << " (0x" << std::hex << bits_of(x)
                                       << ") -> 0x" << got << " = " << std::hexfloat << have
                                       << ", want " << want;
}

template <class T>
class Narrow16 : public ::testing::Test {};
using Types16 = ::testing::Types<half, bfloat16>;
TYPED_TEST_SUITE(Narrow16, Types16);

TYPED_TEST(Narrow16, EveryPatternRoundTripsThroughFloat) {
  using T = TypeParam;
  const Format f = FormatOf<T>::value;
  for (std::uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float wide = to_float(from_bits<T>(bits));
    const double want = decode(bits, f);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(wide)) << std::hex << b;
      ASSERT_TRUE(std::isnan(to_float(from_float<T>(wide)))) << std::hex << b;
      continue;
    }
    ASSERT_EQ(static_cast<double>(wide), want) << std::hex << b;
    ASSERT_EQ(std::signbit(wide), std::signbit(want)) << std::hex << b;
    ASSERT_EQ(to_bits(from_float<T>(wide)), bits) << std::hex << b;
  }
}

TEST(Widen, NanEncodingsFollowTheDevice) {
  // half NaN widens to the canonical float NaN; bfloat16 widening is a shift.
  EXPECT_EQ(bits_of(to_float(from_bits<half>(0xfe01))), 0x7fffffffu);
  EXPECT_EQ(bits_of(to_float(from_bits<half>(0x7c01))), 0x7fffffffu);
  EXPECT_EQ(bits_of(to_float(from_bits<bfloat16>(0xffc1))), 0xffc10000u);
}

// Boundary cases, as (value, expected value) pairs from the format
// definitions: ties go to the even neighbour, overflow at the midpoint past
// the largest finite value, and the subnormal/normal seam.
TEST(NarrowHalf, BoundaryCases) {
  const double u = std::ldexp(1.0, -24);  // smallest subnormal
  const struct {
    double x, want;
  } cases[] = {
      {65504.0, 65504.0},
      {65519.0, 65504.0},                                   // below the midpoint
      {65520.0, INFINITY},                                  // midpoint, 65504 is odd
      {-65520.0, -INFINITY},
      {1.0 + std::ldexp(1.0, -11), 1.0},                    // tie, 1.0 is even
      {1.0 + 3 * std::ldexp(1.0, -11), 1.0 + std::ldexp(1.0, -9)},  // tie, odd below
      {u, u},
      {0.5 * u, 0.0},                                       // tie between 0 and u: 0
      {std::nextafter(0.5f * static_cast<float>(u), 1.0f), u},
      {1.5 * u, 2 * u},                                     // tie: 2 is even
      {2.5 * u, 2 * u},
      {std::ldexp(1.0, -14) - 0.5 * u, std::ldexp(1.0, -14)},  // rounds into the normals
      {std::ldexp(1.0, -14) - 1.5 * u, std::ldexp(1.0, -14) - 2 * u},
      {std::ldexp(1.0, -100), 0.0},
      {-std::ldexp(1.0, -100), -0.0},
      {std::ldexp(1.0, 127), INFINITY},
  };
  for (const auto& c : cases) {
    const float x = static_cast<float>(c.x);
    ASSERT_EQ(static_cast<double>(x), c.x) << "case not exact in float";
    const double got = decode(to_bits(from_float<half>(x)), kHalf);
    EXPECT_EQ(got, c.want) << std::hexfloat << c.x;
    EXPECT_EQ(std::signbit(got), std::signbit(c.want)) << std::hexfloat << c.x;
  }
}

TEST(NarrowBfloat16, BoundaryCases) {
  const double max = std::ldexp(2.0 - std::ldexp(1.0, -7), 127);
  const struct {
    float x;
    double want;
  } cases[] = {
      {float_from_bits(0x3f808000u), 1.0},                        // tie, even below
      {float_from_bits(0x3f818000u), 1.0 + std::ldexp(1.0, -6)},  // tie, odd below
      {float_from_bits(0x3f808001u), 1.0 + std::ldexp(1.0, -7)},
      {float_from_bits(0x7f7f7fffu), max},
      {float_from_bits(0x7f7f8000u), INFINITY},  // midpoint past max, max is odd
      {float_from_bits(0x00000001u), 0.0},       // float subnormal below half a step
      {float_from_bits(0x00008000u), 0.0},       // tie with 0
      {float_from_bits(0x00018000u), std::ldexp(2.0, -133)},
      {float_from_bits(0x80000000u), -0.0},
  };
  for (const auto& c : cases) {
    const double got = decode(to_bits(from_float<bfloat16>(c.x)), kBfloat16);
    EXPECT_EQ(got, c.want) << std::hexfloat << c.x;
    EXPECT_EQ(std::signbit(got), std::signbit(c.want)) << std::hexfloat << c.x;
  }
}

// 10^7 random floats: uniformly random bit patterns (every exponent, NaNs and
// infinities included) mixed with values near the 16-bit range.
std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> out(n);
  std::uniform_real_distribution<double> log_magnitude(-30.0, 17.0);
  for (std::size_t i = 0; i < n; ++i) {
    if (i % 2 == 0) {
      out[i] = float_from_bits(static_cast<std::uint32_t>(rng()));
    } else {
      const double sign = (rng() & 1) ? -1.0 : 1.0;
      out[i] = static_cast<float>(sign * std::exp2(log_magnitude(rng)));
    }
  }
  return out;
}

TYPED_TEST(Narrow16, TenMillionRandomFloatsScalar) {
  using T = TypeParam;
  const std::vector<float> xs = random_floats(10'000'000, 20261122);
  for (const float x : xs) ASSERT_TRUE(narrows_correctly<T>(x, to_bits(from_float<T>(x))));
}

TYPED_TEST(Narrow16, TenMillionRandomFloatsArray) {
  using T = TypeParam;
  const std::vector<float> xs = random_floats(10'000'000 + 13, 7);  // a ragged tail
  std::vector<T> out(xs.size(), from_bits<T>(0x5555));             // poison
  convert_n(xs.data(), xs.size(), out.data());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    ASSERT_TRUE(narrows_correctly<T>(xs[i], to_bits(out[i]))) << "at " << i;
  }
}

// The array paths (SIMD where the CPU has it) give the scalar bits for every
// 16-bit pattern when widening, and for every float whose top 16 bits vary
// when narrowing.
TYPED_TEST(Narrow16, ArrayMatchesScalarOnEveryPattern) {
  using T = TypeParam;
  std::vector<T> narrow(65536 + 7);
  for (std::size_t i = 0; i < narrow.size(); ++i) narrow[i] = from_bits<T>(static_cast<std::uint16_t>(i * 40503u));
  std::vector<float> wide(narrow.size(), float_from_bits(0x7f812345u));
  convert_n(narrow.data(), narrow.size(), wide.data());
  for (std::size_t i = 0; i < narrow.size(); ++i) {
    ASSERT_EQ(bits_of(wide[i]), bits_of(to_float(narrow[i]))) << std::hex << to_bits(narrow[i]);
  }
  // Narrowing: every high half with a few low halves (ties, just above/below).
  std::vector<float> xs;
  for (std::uint32_t hi = 0; hi <= 0xffff; ++hi) {
    for (std::uint32_t lo : {0x0000u, 0x0fffu, 0x1000u, 0x1001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      xs.push_back(float_from_bits(hi << 16 | lo));
    }
  }
  std::vector<T> out(xs.size(), from_bits<T>(0x5555));
  convert_n(xs.data(), xs.size(), out.data());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    ASSERT_EQ(to_bits(out[i]), to_bits(from_float<T>(xs[i]))) << std::hex << bits_of(xs[i]);
  }
}

TEST(ConvertN, BetweenSixteenBitTypesRoundsOnce) {
  std::vector<half> h(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) h[i] = from_bits<half>(static_cast<std::uint16_t>(i));
  std::vector<bfloat16> b(h.size());
  convert_n(h.data(), h.size(), b.data());
  for (std::uint32_t i = 0; i < 65536; ++i) {
    ASSERT_TRUE(narrows_correctly<bfloat16>(to_float(h[i]), to_bits(b[i]))) << std::hex << i;
  }
}

}  // namespace
}  // namespace mixprec

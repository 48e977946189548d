// SPDX-License-Identifier: Apache-2.0
// Independent reference for the 16-bit formats, written from the IEEE 754
// definitions with double arithmetic and no bit tricks, so it shares nothing
// with core/convert.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace mixprec::test {

struct Format {
  int exponent_bits;
  int mantissa_bits;
  int bias() const { return (1 << (exponent_bits - 1)) - 1; }
  int min_exponent() const { return 1 - bias(); }  // exponent of the smallest normal
  double max_finite() const {
    return std::ldexp(2.0 - std::ldexp(1.0, -mantissa_bits), bias());
  }
};

inline constexpr Format kHalf{5, 10};
inline constexpr Format kBfloat16{8, 7};

/// The value a 16-bit pattern encodes (NaN for every NaN pattern).
inline double decode(std::uint16_t bits, Format f) {
  const int m = f.mantissa_bits;
  const bool negative = (bits >> 15) & 1;
  const int exponent = (bits >> m) & ((1 << f.exponent_bits) - 1);
  const int fraction = bits & ((1 << m) - 1);
  double value;
  if (exponent == (1 << f.exponent_bits) - 1) {
    value = fraction ? std::numeric_limits<double>::quiet_NaN()
                     : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    value = std::ldexp(static_cast<double>(fraction), f.min_exponent() - m);
  } else {
    value = std::ldexp(1.0 + std::ldexp(static_cast<double>(fraction), -m), exponent - f.bias());
  }
  return negative ? -value : value;
}

/// x rounded to nearest, ties to even, in format f (an infinity when it rounds
/// past the largest finite value). x must not be NaN. The sign of zero is
/// kept.
inline double round_to_format(double x, Format f) {
  if (std::isinf(x) || x == 0.0) return x;
  const double a = std::fabs(x);
  int e = 0;
  std::frexp(a, &e);  // a = r * 2^e with r in [0.5, 1): leading bit is 2^(e-1)
  int lead = e - 1;
  if (lead < f.min_exponent()) lead = f.min_exponent();  // subnormal spacing
  const double quantum = std::ldexp(1.0, lead - f.mantissa_bits);
  const double k = a / quantum;  // exact: a has 24 significant bits
  double n = std::floor(k);
  const double rest = k - n;
  if (rest > 0.5 || (rest == 0.5 && std::fmod(n, 2.0) != 0.0)) n += 1.0;
  double r = n * quantum;
  // Past the largest finite value the next step would be 2^(bias+1), which
  // does not exist: anything rounding there is infinity.
  if (r > f.max_finite()) r = std::numeric_limits<double>::infinity();
  return std::copysign(r, x);
}

}  // namespace mixprec::test

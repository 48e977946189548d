// SPDX-License-Identifier: Apache-2.0
// Counter-based random numbers: element i of a seeded fill depends only on
// (seed, i), so the host and the device (and any thread split) draw the same
// values.
#pragma once

#include <cmath>
#include <cstdint>

#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace detail {

// SplitMix64's finaliser (Steele, Lea, Flood, "Fast splittable pseudorandom
// number generators", OOPSLA 2014): a bijective mix with full avalanche, so
// consecutive counters give independent-looking 64-bit words.
MIXPREC_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// 64 random bits for counter `i` of stream `seed`.
MIXPREC_HOST_DEVICE inline std::uint64_t random_bits(std::uint64_t seed, std::uint64_t i) {
  // Golden-ratio increments keep different seeds' counter sequences apart.
  return mix64(mix64(seed + 0x9e3779b97f4a7c15ull) + (i + 1) * 0x9e3779b97f4a7c15ull);
}

/// Uniform in [0, 1) with 24 random bits (every value exactly a float).
MIXPREC_HOST_DEVICE inline float uniform01(std::uint64_t bits) {
  return static_cast<float>(bits >> 40) * 5.9604644775390625e-08f;  // 2^-24
}

/// Standard normal from one counter by Box-Muller, computed in double so the
/// host and the device agree to the last float bit except where the two libm
/// implementations differ (both are within 1 ulp in double, far below the
/// final float rounding).
MIXPREC_HOST_DEVICE inline float standard_normal(std::uint64_t bits) {
  // u1 in (0, 1]: never 0, so the log is finite.
  const double u1 = (static_cast<double>(bits >> 32) + 1.0) * 2.3283064365386963e-10;  // 2^-32
  const double u2 = static_cast<double>(bits & 0xffffffffull) * 2.3283064365386963e-10;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

}  // namespace detail
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// The precursors of instability that the update pass sums per parameter
// (Optimizer::set_precursors): one element's terms, the same function on the
// host and the device.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// Sums per parameter: [0] g^2 / max(v-hat, eps^2), [1] count of v-hat <
/// eps^2, [2] (m' - m)^2, [3] m^2, [4] count of |m' - m| < ulp(w) / 2.
inline constexpr std::size_t kPrecursorSums = 5;

/// The factor that bias-corrects a second moment at a step: float(1 / (1 -
/// beta2^step)), 1 without correction (beta2 = 0) or where it is not
/// positive. One definition for the eps share and the precursors, on the
/// host and the device.
MIXPREC_HOST_DEVICE inline float v_hat_scale(double beta2, double step) {
  if (!(beta2 > 0.0)) return 1.0f;
  const double bc = 1.0 - ::pow(beta2, step);
  return bc > 0.0 ? static_cast<float>(1.0 / bc) : 1.0f;
}

/// The spacing of T's values just above |x| rounded to T, in float (exact:
/// the spacing is a power of two, float's smallest 2^-149); inf where that
/// rounding is T's largest finite value, NaN where it is not finite.
template <class T>
MIXPREC_HOST_DEVICE inline float ulp_above(float x) {
  if constexpr (std::is_same_v<T, float>) {
    const float a = ::fabsf(x);
    return ::nextafterf(a, 3.4028235e38f * 2.0f) - a;
  } else {
    const T r = from_float<T>(x);
    const T next = from_bits<T>(static_cast<std::uint16_t>((to_bits(r) & 0x7fffu) + 1u));
    return to_float(next) - ::fabsf(to_float(r));
  }
}

/// One element's terms, in float: `before` and `after` its master around
/// the step, `g` the gradient the update used, `v` its second moment after
/// the update (has_v false: none), v_scale the bias correction's 1 / (1 -
/// beta2^t), T the model weight's type. Float, not double: the update pass
/// computes them for every element of a logged step, and in double (a
/// division, five conversions and adds an element) they were most of what
/// the monitor cost a step on the GPU; a float term is within a few float
/// roundings (about 1e-7 relative) of the double one, and the counts are
/// the same but where |m' - m| falls within float rounding of half an ulp.
/// g^2 / v is formed as (g / v) * g: with v the updated second moment (v >=
/// (1 - beta2) g^2) it cannot overflow. The squares of the update and the
/// master are float too: to float rounding from about 1e-19 to 1.8e19 (0
/// below about 2.6e-23, inf above).
template <class T>
MIXPREC_HOST_DEVICE inline void precursor_terms(float (&t)[kPrecursorSums], float before, float after, float g,
                                                bool has_v, float v, float v_scale, float eps2) {
  t[0] = 0.0f;
  t[1] = 0.0f;
  if (has_v) {
    const float vhat = v * v_scale;
    t[0] = (g / (vhat > eps2 ? vhat : eps2)) * g;
    t[1] = vhat < eps2 ? 1.0f : 0.0f;
  }
  const float d = after - before;
  t[2] = d * d;
  t[3] = before * before;
  // |d| < ulp / 2 as 2 |d| < ulp: both sides exact (half of float's
  // smallest spacing would round to 0).
  t[4] = 2.0f * ::fabsf(d) < ulp_above<T>(before) ? 1.0f : 0.0f;
}

/// Adds one element's terms (precursor_terms) to the sums.
template <class T>
MIXPREC_HOST_DEVICE inline void add_precursor_terms(double (&acc)[kPrecursorSums], float before, float after, float g,
                                                    bool has_v, float v, float v_scale, float eps2) {
  float t[kPrecursorSums];
  precursor_terms<T>(t, before, after, g, has_v, v, v_scale, eps2);
  for (std::size_t j = 0; j < kPrecursorSums; ++j) acc[j] += static_cast<double>(t[j]);
}

}  // namespace optim
MIXPREC_NAMESPACE_END

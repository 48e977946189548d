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

/// The spacing of T's values just above |x| rounded to T.
template <class T>
MIXPREC_HOST_DEVICE inline double ulp_above(float x) {
  if constexpr (std::is_same_v<T, float>) {
    const float a = ::fabsf(x);
    return static_cast<double>(::nextafterf(a, 3.4028235e38f * 2.0f)) - a;
  } else {
    const T r = from_float<T>(x);
    const T next = from_bits<T>(static_cast<std::uint16_t>((to_bits(r) & 0x7fffu) + 1u));
    return static_cast<double>(to_float(next)) - ::fabs(static_cast<double>(to_float(r)));
  }
}

/// Adds one element's terms: `before` and `after` its master around the
/// step, `g` the gradient the update used, `v` its second moment after the
/// update (has_v false: none), v_scale the bias correction's 1 / (1 -
/// beta2^t), T the model weight's type.
template <class T>
MIXPREC_HOST_DEVICE inline void add_precursor_terms(double (&acc)[kPrecursorSums], float before, float after, float g,
                                                    bool has_v, float v, float v_scale, float eps2) {
  if (has_v) {
    const float vhat = v * v_scale;
    const double gd = g;
    acc[0] += gd * gd / static_cast<double>(vhat > eps2 ? vhat : eps2);
    acc[1] += vhat < eps2 ? 1.0 : 0.0;
  }
  const double d = static_cast<double>(after) - static_cast<double>(before);
  acc[2] += d * d;
  acc[3] += static_cast<double>(before) * before;
  acc[4] += ::fabs(d) < 0.5 * ulp_above<T>(before) ? 1.0 : 0.0;
}

}  // namespace optim
MIXPREC_NAMESPACE_END

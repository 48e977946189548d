// SPDX-License-Identifier: Apache-2.0
// Counters that never wrap: the step counts of the optimizers and the
// scaler's counts, on the host and in device kernels.
#pragma once

#include <limits>

#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

/// n + 1, or n where that would overflow: for counters that must never wrap.
template <class Int>
MIXPREC_HOST_DEVICE inline Int saturating_increment(Int n) {
  return n < std::numeric_limits<Int>::max() ? static_cast<Int>(n + 1) : n;
}

MIXPREC_NAMESPACE_END  // namespace mixprec

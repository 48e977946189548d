// SPDX-License-Identifier: Apache-2.0
// The loss-scale update rule, once, for the host and for the one-thread
// device kernel: torch.amp.GradScaler's growth and backoff, plus hysteresis,
// min_scale and max_scale.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "mixprec/core/config.hpp"
#include "mixprec/core/saturating.hpp"

MIXPREC_NAMESPACE_BEGIN namespace amp {

/// The scaler's mutable state, plain data so it can live in device memory.
/// Every counter stays in range forever: the trackers are below their
/// option (growth_interval, hysteresis, both < 2^31) and the two counts
/// saturate at INT32_MAX / INT64_MAX instead of wrapping.
struct ScalerState {
  float scale = 65536.0f;
  std::int32_t growth_tracker = 0;      // consecutive finite steps since the last change
  std::int32_t hysteresis_tracker = 0;  // consecutive non-finite steps not yet acted on
  std::int32_t min_scale_hits = 0;      // times a backoff was clamped at min_scale (saturates)
  std::int64_t skip_streak = 0;         // consecutive non-finite steps, up to now (saturates)
};

using mixprec::saturating_increment;

/// A scaler's state when it lives in device memory (amp::DeviceGradScaler):
/// the scale and trackers, the iteration's found-inf flag and the counters.
struct DeviceScalerState {
  ScalerState state;
  int any_inf = 0;           // or of the iteration's optimizers' found-inf; the update resets it
  std::int64_t applied = 0;  // iterations without a non-finite gradient
  std::int64_t skipped = 0;  // iterations with one
  /// Times skip_streak reached ScalePolicy::max_consecutive_skips: only
  /// rises, so a host that reads it late still sees every streak.
  std::int64_t streak_limit_hits = 0;
};

/// The dynamic policy. Factors are double: PyTorch multiplies the float scale
/// by a double factor and rounds the product to float.
struct ScalePolicy {
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int32_t growth_interval = 2000;
  std::int32_t hysteresis = 1;
  float min_scale = 1.17549435e-38f;  // FLT_MIN: the scale never reaches 0 or a subnormal
  float max_scale = INFINITY;
  std::int64_t max_consecutive_skips = 0;  // 0: never give up (GradScalerOptions)
};

/// One update after a step whose gradients were (found_inf) or were not all
/// finite. With hysteresis = 1, min_scale not reached and max_scale = inf this
/// is exactly torch's _amp_update_scale_:
///  * non-finite: growth_tracker = 0; after `hysteresis` consecutive
///    non-finite steps, scale = max(scale * backoff_factor, min_scale).
///  * finite: the hysteresis count restarts; after growth_interval
///    consecutive finite steps, scale = min(scale * growth_factor, max_scale)
///    unless that is not finite (the scale never becomes inf), and
///    growth_tracker = 0.
MIXPREC_HOST_DEVICE inline void update_scale(ScalerState& s, bool found_inf, const ScalePolicy& p) {
  s.skip_streak = found_inf ? saturating_increment(s.skip_streak) : 0;
  if (found_inf) {
    s.growth_tracker = 0;
    s.hysteresis_tracker += 1;
    if (s.hysteresis_tracker >= p.hysteresis) {
      s.hysteresis_tracker = 0;
      float next = static_cast<float>(static_cast<double>(s.scale) * p.backoff_factor);
      if (next < p.min_scale) {
        next = p.min_scale;
        s.min_scale_hits = saturating_increment(s.min_scale_hits);
      }
      s.scale = next;
    }
    return;
  }
  s.hysteresis_tracker = 0;
  const std::int32_t successful = s.growth_tracker + 1;
  if (successful == p.growth_interval) {
    float next = static_cast<float>(static_cast<double>(s.scale) * p.growth_factor);
    if (next > p.max_scale) next = p.max_scale;
    if (next <= 3.40282347e+38f) s.scale = next;  // finite (next > 0 is never NaN)
    s.growth_tracker = 0;
  } else {
    s.growth_tracker = successful;
  }
}

/// The end of one iteration of a scaler whose state is in device memory
/// (amp::DeviceGradScaler::update): counts it as applied or skipped by
/// any_inf, updates the scale when `dynamic` (a static or disabled scale
/// only tracks the skip streak), counts a streak that reached
/// max_consecutive_skips, and resets any_inf for the next iteration. One
/// thread runs it: the scaler's own update kernel, or a kernel that fuses
/// other end-of-iteration work with it (amp::FusedUpdate; the monitor's
/// record), which then reads the scale and any_inf before this changes them.
MIXPREC_HOST_DEVICE inline void end_iteration(DeviceScalerState& s, const ScalePolicy& p, bool dynamic) {
  const bool skip = s.any_inf != 0;
  std::int64_t& count = skip ? s.skipped : s.applied;
  count = saturating_increment(count);
  if (dynamic) {
    update_scale(s.state, skip, p);
  } else {
    s.state.skip_streak = skip ? saturating_increment(s.state.skip_streak) : 0;
  }
  if (p.max_consecutive_skips > 0 && s.state.skip_streak == p.max_consecutive_skips) {
    s.streak_limit_hits = saturating_increment(s.streak_limit_hits);
  }
  s.any_inf = 0;
}

}  // namespace amp
MIXPREC_NAMESPACE_END

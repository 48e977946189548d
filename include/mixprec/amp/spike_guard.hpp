// SPDX-License-Identifier: Apache-2.0
// The spike guard: skips a step whose loss or global gradient norm is an
// outlier against a window of recent steps (a one-sided z-score), decided by
// one host-device rule so that GradScaler decides on the host and
// DeviceGradScaler on the device, with no synchronisation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/saturating.hpp"
#include "mixprec/core/simd.hpp"

MIXPREC_NAMESPACE_BEGIN namespace amp {

/// Options of the spike guard (GradScalerOptions::spike_guard). Off by
/// default. The rule (after llm.c's -sl / -sg flags and OLMo-core's
/// SkipStepOptimizer, both of which decide on the host after a copy):
///
///  * a step whose gradients are not all finite is the scaler's skip: the
///    guard neither judges it nor remembers it;
///  * otherwise, once the window holds `warmup` steps, the step is skipped
///    when z = (x - mean) / sd > threshold for its loss or its gradient
///    norm, mean and sd (sample standard deviation) over the window, which
///    does not include x, sd no less than 1e-3 |mean| (the monitor's
///    loss_spike detector's floor: a window flatter than that would turn
///    rounding noise into outliers). One-sided: a loss or norm far BELOW its
///    recent values harms nothing. A window of zeros judges nothing;
///  * a non-finite loss or norm (gradients finite) is always skipped;
///  * the loss and norm of an applied step enter the window (the oldest
///    leaves). Those of a skipped step stay out, so that a spike does not
///    inflate sd and blind the guard to the next one, except from the
///    `admit_after`-th skip in a row on: a lasting change of level (a new
///    data mix, an lr change) is then learned within a few steps instead of
///    skipping every step from then on.
///
/// The scale does not back off for a guard skip (its gradients were finite
/// at that scale): the scaler's state evolves exactly as without the guard.
struct SpikeGuardOptions {
  bool enabled = false;
  /// z-score above which a step's loss is an outlier. +inf: the loss is
  /// not judged (and need not be given).
  double loss_threshold = 6.0;
  /// z-score above which the global gradient norm (unscaled, after the
  /// data-parallel reduction) is an outlier. +inf: not judged.
  double grad_norm_threshold = 6.0;
  /// Steps in the window (both references use 128).
  std::int64_t window = 128;
  /// Steps the window must hold before the z-tests act: 64 gives the
  /// sample sd within about 9% (1 / sqrt(2n)) of its value, far inside a
  /// threshold of 6; OLMo-core waits for max(20, window / 2) too.
  std::int64_t warmup = 64;
  /// The k-th consecutive guard skip, for k >= admit_after, enters the
  /// window (llm.c admits the third). 1: every value enters (OLMo-core).
  std::int64_t admit_after = 3;

  bool judges_loss() const { return loss_threshold <= std::numeric_limits<double>::max(); }
  bool judges_grad_norm() const { return grad_norm_threshold <= std::numeric_limits<double>::max(); }
};

/// Most steps a window may hold (the device keeps 2 x window doubles and
/// one thread sums them every step).
inline constexpr std::int64_t kMaxSpikeGuardWindow = 4096;

/// Throws, naming the option and its value, unless `o` is usable (checked
/// even when disabled: a bad option is a bug either way). `who` prefixes
/// the message ("GradScaler").
inline void validate(const SpikeGuardOptions& o, const char* who = "GradScaler") {
  MIXPREC_CHECK(o.loss_threshold > 0.0, who, ": spike_guard.loss_threshold = ", o.loss_threshold,
                ", must be > 0 (+inf: the loss is not judged)");
  MIXPREC_CHECK(o.grad_norm_threshold > 0.0, who, ": spike_guard.grad_norm_threshold = ", o.grad_norm_threshold,
                ", must be > 0 (+inf: the gradient norm is not judged)");
  MIXPREC_CHECK(o.window >= 2 && o.window <= kMaxSpikeGuardWindow, who, ": spike_guard.window = ", o.window,
                ", must be in [2, ", kMaxSpikeGuardWindow, "]");
  MIXPREC_CHECK(o.warmup >= 2 && o.warmup <= o.window, who, ": spike_guard.warmup = ", o.warmup,
                ", must be in [2, window = ", o.window, "] (a standard deviation needs 2 values)");
  MIXPREC_CHECK(o.admit_after >= 1, who, ": spike_guard.admit_after = ", o.admit_after,
                ", must be >= 1 (1: every skipped value enters the window)");
  MIXPREC_CHECK(!o.enabled || o.judges_loss() || o.judges_grad_norm(), who,
                ": spike_guard is enabled but loss_threshold and grad_norm_threshold are both +inf (nothing to judge)");
}

/// The options as the rule takes them (plain data: a kernel argument).
struct SpikeGuardPolicy {
  double loss_threshold = 6.0;
  double grad_norm_threshold = 6.0;
  std::int32_t window = 128;
  std::int32_t warmup = 64;
  std::int64_t admit_after = 3;
  std::int32_t judge_loss = 1;
  std::int32_t judge_grad_norm = 1;
};

inline SpikeGuardPolicy policy(const SpikeGuardOptions& o) {
  SpikeGuardPolicy p;
  p.loss_threshold = o.loss_threshold;
  p.grad_norm_threshold = o.grad_norm_threshold;
  p.window = static_cast<std::int32_t>(o.window);
  p.warmup = static_cast<std::int32_t>(o.warmup);
  p.admit_after = o.admit_after;
  p.judge_loss = o.judges_loss() ? 1 : 0;
  p.judge_grad_norm = o.judges_grad_norm() ? 1 : 0;
  return p;
}

/// Why the guard skipped a step (SpikeGuardState::reasons, bits).
enum SpikeGuardReason : std::int32_t {
  guard_loss = 1,       // the loss's z-score was above loss_threshold, or the loss was not finite
  guard_grad_norm = 2,  // the same for the gradient norm
};

/// The guard's state, plain data so that it can live in device memory. The
/// window itself is 2 x window doubles beside it: losses in [0, window),
/// norms in [window, 2 window), slot k of both from the same step.
struct SpikeGuardState {
  std::int32_t count = 0;   // steps in the window (<= window)
  std::int32_t next = 0;    // the slot the next step's values go to
  std::int64_t streak = 0;  // consecutive guard skips (steps the scaler skipped leave it as it is)
  std::int64_t skipped = 0; // guard skips in all (saturates)
  // The last judged step (NaN: not judged: warm-up, a scaler skip, a value
  // not judged or not finite). Not part of a checkpoint.
  double loss_z = std::numeric_limits<double>::quiet_NaN();
  double grad_norm_z = std::numeric_limits<double>::quiet_NaN();
  std::int32_t skip = 0;     // the last decision: 1 = skipped by the guard
  std::int32_t reasons = 0;  // SpikeGuardReason bits of that decision
};

namespace detail {

// One IEEE operation each, never fused into an FMA (host: math::mul's
// barrier; device: the _rn intrinsics), so host and device give the same
// z-scores bit for bit.
MIXPREC_HOST_DEVICE inline double guard_mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return math::mul(a, b);
#endif
}
MIXPREC_HOST_DEVICE inline double guard_add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MIXPREC_HOST_DEVICE inline bool guard_finite(double x) { return x - x == 0.0; }  // false for inf and NaN

// (x - mean) / sd over w[0, n), n >= 2: the mean in slot order, then the
// sum of squared deviations (two passes: no cancellation, no drift, unlike
// running sums). sd is at least 1e-3 |mean|, so that a near-constant window
// does not make rounding noise an outlier; 0 when that is still 0 (a window
// of zeros says nothing about spread).
MIXPREC_HOST_DEVICE inline double window_z(const double* w, std::int32_t n, double x) {
  double sum = 0.0;
  for (std::int32_t i = 0; i < n; ++i) sum = guard_add(sum, w[i]);
  const double mean = sum / n;
  double squares = 0.0;
  for (std::int32_t i = 0; i < n; ++i) {
    const double d = w[i] - mean;
    squares = guard_add(squares, guard_mul(d, d));
  }
#ifdef __CUDA_ARCH__
  const double sd = ::sqrt(squares / (n - 1));
#else
  const double sd = std::sqrt(squares / (n - 1));
#endif
  const double floor = guard_mul(1e-3, mean < 0.0 ? -mean : mean);
  const double spread = sd > floor ? sd : floor;
  if (!(spread > 0.0)) return 0.0;
  return (x - mean) / spread;
}

}  // namespace detail

/// One step of the guard: judges `loss` and `grad_norm` (ignored where the
/// policy does not judge them) unless `found_inf`, updates the window and
/// counters, and returns whether the guard skips the step. The same
/// function runs on the host (GradScaler) and in a one-thread kernel
/// (DeviceGradScaler). `window` holds 2 x p.window doubles.
MIXPREC_HOST_DEVICE inline bool spike_guard_step(SpikeGuardState& s, double* window, const SpikeGuardPolicy& p,
                                                 double loss, double grad_norm, bool found_inf) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  s.loss_z = nan;
  s.grad_norm_z = nan;
  s.skip = 0;
  s.reasons = 0;
  if (found_inf) return false;  // the scaler's skip, not the guard's
  const bool judge_loss = p.judge_loss != 0;
  const bool judge_norm = p.judge_grad_norm != 0;
  const bool loss_ok = !judge_loss || detail::guard_finite(loss);
  const bool norm_ok = !judge_norm || detail::guard_finite(grad_norm);
  std::int32_t reasons = (loss_ok ? 0 : guard_loss) | (norm_ok ? 0 : guard_grad_norm);
  if (s.count >= p.warmup) {
    if (judge_loss && loss_ok) {
      s.loss_z = detail::window_z(window, s.count, loss);
      if (s.loss_z > p.loss_threshold) reasons |= guard_loss;
    }
    if (judge_norm && norm_ok) {
      s.grad_norm_z = detail::window_z(window + p.window, s.count, grad_norm);
      if (s.grad_norm_z > p.grad_norm_threshold) reasons |= guard_grad_norm;
    }
  }
  const bool skip = reasons != 0;
  s.reasons = reasons;
  s.skip = skip ? 1 : 0;
  if (skip) {
    s.skipped = saturating_increment(s.skipped);
    s.streak = saturating_increment(s.streak);
  } else {
    s.streak = 0;
  }
  if (loss_ok && norm_ok && (!skip || s.streak >= p.admit_after)) {
    window[s.next] = judge_loss ? loss : 0.0;
    window[p.window + s.next] = judge_norm ? grad_norm : 0.0;
    s.next = s.next + 1 == p.window ? 0 : s.next + 1;
    if (s.count < p.window) s.count += 1;
  }
  return skip;
}

/// The part of a guard that a checkpoint keeps: the window (oldest first
/// is not implied: slot order, with state.next the next slot) and counters.
struct SpikeGuardSnapshot {
  SpikeGuardState state;
  std::vector<double> loss;       // window values, slot order (size: window)
  std::vector<double> grad_norm;  // the same
};

/// Throws, naming the field and its value, unless a guard with options `o`
/// could be in `snap`: window arrays of o.window values, count in [0,
/// window], next = count while the window fills (in [0, window) once full),
/// 0 <= streak <= skipped, the count's values finite.
inline void check_snapshot(const SpikeGuardOptions& o, const SpikeGuardSnapshot& snap, const char* who) {
  const SpikeGuardState& s = snap.state;
  MIXPREC_CHECK(snap.loss.size() == static_cast<std::size_t>(o.window) &&
                    snap.grad_norm.size() == static_cast<std::size_t>(o.window),
                who, ": the spike guard's window holds ", snap.loss.size(), " losses and ", snap.grad_norm.size(),
                " norms, spike_guard.window = ", o.window);
  MIXPREC_CHECK(s.count >= 0 && s.count <= o.window, who, ": spike guard count = ", s.count, ", must be in [0, window = ",
                o.window, "]");
  if (s.count < o.window) {
    MIXPREC_CHECK(s.next == s.count, who, ": spike guard next = ", s.next, ", must equal count = ", s.count,
                  " while the window fills");
  } else {
    MIXPREC_CHECK(s.next >= 0 && s.next < o.window, who, ": spike guard next = ", s.next, ", must be in [0, window = ",
                  o.window, ")");
  }
  MIXPREC_CHECK(s.skipped >= 0 && s.streak >= 0 && s.streak <= s.skipped, who, ": spike guard streak = ", s.streak,
                ", skipped = ", s.skipped, "; must be 0 <= streak <= skipped");
  for (std::int32_t i = 0; i < s.count; ++i) {
    MIXPREC_CHECK(std::isfinite(snap.loss[i]) && std::isfinite(snap.grad_norm[i]), who, ": spike guard window slot ",
                  i, " holds loss = ", snap.loss[i], ", grad_norm = ", snap.grad_norm[i], "; must be finite");
  }
}

/// The guard on the host: its state and window (GradScaler holds one).
class SpikeGuard {
 public:
  /// Validates `o` first (errors name `who`).
  explicit SpikeGuard(const SpikeGuardOptions& o = {}, const char* who = "GradScaler")
      : options_((amp::validate(o, who), o)),
        policy_(amp::policy(o)),
        window_(2 * static_cast<std::size_t>(o.window), 0.0) {}

  const SpikeGuardOptions& options() const { return options_; }
  bool enabled() const { return options_.enabled; }

  /// One step (spike_guard_step); returns whether the guard skips it.
  bool step(double loss, double grad_norm, bool found_inf) {
    return spike_guard_step(state_, window_.data(), policy_, loss, grad_norm, found_inf);
  }

  const SpikeGuardState& state() const { return state_; }
  std::int64_t skipped_steps() const { return state_.skipped; }

  SpikeGuardSnapshot snapshot() const {
    SpikeGuardSnapshot s;
    s.state = state_;
    const auto w = static_cast<std::ptrdiff_t>(options_.window);
    s.loss.assign(window_.begin(), window_.begin() + w);
    s.grad_norm.assign(window_.begin() + w, window_.end());
    return s;
  }
  /// Restores a snapshot, checked first (nothing changes if it fails); the
  /// last decision's fields start afresh.
  void load(const SpikeGuardSnapshot& snap, const char* who) {
    check_snapshot(options_, snap, who);
    state_ = SpikeGuardState{};
    state_.count = snap.state.count;
    state_.next = snap.state.next;
    state_.streak = snap.state.streak;
    state_.skipped = snap.state.skipped;
    std::copy(snap.loss.begin(), snap.loss.end(), window_.begin());
    std::copy(snap.grad_norm.begin(), snap.grad_norm.end(), window_.begin() + options_.window);
  }

 private:
  SpikeGuardOptions options_;
  SpikeGuardPolicy policy_;
  SpikeGuardState state_;
  std::vector<double> window_;
};

}  // namespace amp
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// The instability monitor's detectors and forecasts: plain host logic that
// turns the log records of a run into events (each with a suggestion) and a
// look ahead at the loss scale, the fp16 underflow share and the loss.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <locale>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/core/error.hpp"
#include "mixprec/monitor/record.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {

/// The detectors' thresholds and windows. A window counts steps unless it
/// says otherwise. A statistic over a window needs `min_samples` values
/// before it may fire, so the first steps of a run raise no false alarms.
struct DetectorOptions {
  /// loss_spike: the loss lies more than `loss_z` standard deviations above
  /// the mean of the last `loss_window` finite losses of applied steps. The
  /// deviation is floored at 1e-3 |mean| + 1e-12, so a flat loss does not
  /// fire on rounding noise (at z = 6 a spike must be 0.6% above the mean).
  std::int64_t loss_window = 100;
  double loss_z = 6.0;
  /// grad_norm_explosion: the gradient norm exceeds `grad_norm_factor` times
  /// the median of the last `grad_norm_window` finite norms.
  double grad_norm_factor = 10.0;
  std::int64_t grad_norm_window = 100;
  /// What the loss spike, the gradient-norm explosion and the divergence
  /// forecast need in their windows before they say anything.
  std::int64_t min_samples = 20;
  /// scale_collapse (dynamic scaling): the scale is under `collapse_scale`
  /// (the gradients overflow fp16 even unscaled), or it backed off (fell
  /// below the previous step's scale) to under the settled scale
  /// `backoff_count` times within `backoff_window` steps. The settled scale
  /// is the one that last held for `settle_steps` consecutive applied steps
  /// at that scale; before any scale has held, init_scale /
  /// 2^`probe_backoffs` stands in for it.
  /// A dynamic scaler probes: it starts high and halves until a scale
  /// holds, and after each growth it tries a scale twice the settled one.
  /// Those backoffs stay at or above the settled scale (or, at the start,
  /// within 2^probe_backoffs of init_scale), so they are not counted;
  /// further down, something is driving the scale, not a probe. Measured
  /// with benchmarks/instability (docs/monitor.md): a healthy MLP run on
  /// CPU (fp16, AdamW lr 1e-2) backs off 3 times in its first 6 steps, with
  /// one clean step between, and got repeated_overflow ("train in bf16")
  /// before this rule.
  double collapse_scale = 1.0;
  std::int64_t backoff_count = 5;
  std::int64_t backoff_window = 200;
  std::int64_t settle_steps = 20;
  std::int64_t probe_backoffs = 4;
  /// underflow: at a logged step, at least this share of the float16
  /// gradients' elements is lost in fp16 (zero or under 2^-24), over all
  /// float16 parameters or in one of at least `underflow_min_numel` elements
  /// (a small bias, mostly zeros, would otherwise dominate the events), and
  /// the share has risen by `underflow_rise` above the lowest it had in this
  /// run, and at least `underflow_subnormal` of the values fp16 still holds
  /// (the nonzero ones, from 2^-24 up) are subnormal (under 2^-14).
  /// An fp16 gradient cannot tell an underflowed value from a true zero
  /// (a ReLU that never fires, an input pixel that is always 0): a layer
  /// whose gradient is 40% exact zeros from the first step on is not
  /// underflowing, one whose lost share climbs may be. Zeros also climb
  /// when ReLU units die, and those stay zeros while the unit's other
  /// gradients stay far above fp16's range floor. Values that underflow got
  /// there by shrinking through the 10 binades of subnormals above 2^-24,
  /// so a gradient that is losing them has most of what it keeps in that
  /// band: the median kept magnitude is under 2^-14. A gradient with no
  /// value kept at all counts as underflowing. Measured with
  /// benchmarks/instability (docs/monitor.md), at the records where share
  /// and rise held: the healthy fp16 runs' subnormal share of kept values
  /// was at most 0.375 (the MLP at AdamW lr 1e-2, whose weight gradients
  /// fill with zeros of dead units: 1.weight 84% zeros and 0.7% subnormal
  /// at step 50), the static-scale underflow of scenario (c) at least 0.91.
  double underflow_share = 0.25;
  double underflow_rise = 0.15;
  double underflow_subnormal = 0.5;
  std::int64_t underflow_min_numel = 1024;
  /// stalled_updates: a parameter's update ratio is under `stall_ratio` on
  /// `stall_records` consecutive applied logged steps, once the first
  /// `stall_warmup_records` logging intervals (stall_warmup_records * every
  /// steps) are past (so an lr schedule's last steps, decaying to 0, are not
  /// a stall).
  double stall_ratio = 1e-7;
  std::int64_t stall_records = 5;
  std::int64_t stall_warmup_records = 10;
  /// moment_lag: at a logged applied step, a parameter's RMS of g^2 / v
  /// (ParamSample::v_ratio_rms) is above `moment_lag_rms`: its second
  /// moment underestimates the squared gradients the update divides, the
  /// precursor that Wortsman et al. 2023 find 1-8 steps before loss spikes
  /// (they clip updates above 1). Noise alone keeps it near 1 (v estimates
  /// E[g^2]); the default leaves room for heavy-tailed gradients and waits
  /// `moment_lag_warmup_records` logging intervals (Adam's first steps
  /// divide by a v made of a few samples). Measured so far on one healthy
  /// run only (the MLP example on CPU, fp16, AdamW: 0.40-1.45 over 46
  /// records); the induced failures of benchmarks/instability are to set it.
  double moment_lag_rms = 4.0;
  std::int64_t moment_lag_warmup_records = 2;
  /// update_jump: at a logged applied step, a parameter's update ratio
  /// (ParamSample::update_ratio) is more than `update_jump_factor` times the
  /// median of its last `update_jump_records` ratios at logged applied
  /// steps, once `update_jump_warmup_records` logging intervals are past
  /// (Adam's first updates are large and shrink). The update is where a
  /// lagging second moment shows for longer than in g^2 / v itself: a
  /// gradient burst on elements whose v had decayed divides by that small v
  /// (Wortsman et al. 2023's precursor), and the first moment carries the
  /// large update on for ~1 / (1 - beta1) steps, so a logged step every 10
  /// still sees it where v_ratio_rms, a one-step figure, is back near 1.
  /// Measured with benchmarks/instability (docs/monitor.md, every = 10,
  /// records after step 200): the healthy MLP runs' ratio to that median
  /// stayed at or under 2.01 (weights: 1.54); before scenario (d)'s late
  /// loss spike (Adam lr 0.02, seed 1, step 3230) it was 7.2-8.3 thirty
  /// steps ahead, but jumps of 4-7x also came and went without a failure.
  double update_jump_factor = 4.0;
  std::int64_t update_jump_records = 10;
  std::int64_t update_jump_warmup_records = 20;
  /// repeated_overflow: one parameter's gradient was not finite on
  /// `overflow_repeats` of the last `overflow_window` steps. Under dynamic
  /// scaling only the steps whose scale was at or under the settled scale
  /// (see scale_collapse; before any has held: under init_scale /
  /// 2^probe_backoffs), or under collapse_scale, count: an overflow above
  /// those is the scaler probing, not the layer.
  std::int64_t overflow_repeats = 3;
  std::int64_t overflow_window = 200;
  /// Forecasts: the scale and loss trends are fitted over the last
  /// `trend_window` steps, the underflow trend over the last
  /// `underflow_trend_records` logged records.
  std::int64_t trend_window = 200;
  std::int64_t underflow_trend_records = 10;
  /// The loss is diverging when its fitted rise over the trend window is
  /// more than `diverge_sigmas` residual deviations and more than
  /// `diverge_rise` times its mean magnitude (see Detectors::forecast()).
  double diverge_sigmas = 3.0;
  double diverge_rise = 0.1;
  /// At most one event per (kind, parameter) in this many steps; one fires
  /// again after that while its condition holds.
  std::int64_t repeat_interval = 1000;

  /// Throws mixprec::Error naming the first bad field and its value.
  void validate() const {
    const auto positive_finite = [](double x) { return std::isfinite(x) && x > 0.0; };
    MIXPREC_CHECK(min_samples >= 3, "DetectorOptions: min_samples = ", min_samples, ", must be >= 3");
    MIXPREC_CHECK(loss_window >= min_samples, "DetectorOptions: loss_window = ", loss_window,
                  ", must be >= min_samples = ", min_samples);
    MIXPREC_CHECK(positive_finite(loss_z), "DetectorOptions: loss_z = ", loss_z, ", must be finite and > 0");
    MIXPREC_CHECK(std::isfinite(grad_norm_factor) && grad_norm_factor > 1.0, "DetectorOptions: grad_norm_factor = ",
                  grad_norm_factor, ", must be finite and > 1");
    MIXPREC_CHECK(grad_norm_window >= min_samples, "DetectorOptions: grad_norm_window = ", grad_norm_window,
                  ", must be >= min_samples = ", min_samples);
    MIXPREC_CHECK(std::isfinite(collapse_scale) && collapse_scale >= 0.0, "DetectorOptions: collapse_scale = ",
                  collapse_scale, ", must be finite and >= 0");
    MIXPREC_CHECK(backoff_count >= 1, "DetectorOptions: backoff_count = ", backoff_count, ", must be >= 1");
    MIXPREC_CHECK(backoff_window >= 1, "DetectorOptions: backoff_window = ", backoff_window, ", must be >= 1");
    MIXPREC_CHECK(settle_steps >= 1, "DetectorOptions: settle_steps = ", settle_steps, ", must be >= 1");
    MIXPREC_CHECK(probe_backoffs >= 0 && probe_backoffs <= 64, "DetectorOptions: probe_backoffs = ", probe_backoffs,
                  ", must be in [0, 64]");
    MIXPREC_CHECK(underflow_share > 0.0 && underflow_share <= 1.0, "DetectorOptions: underflow_share = ",
                  underflow_share, ", must be in (0, 1]");
    MIXPREC_CHECK(underflow_rise >= 0.0 && underflow_rise <= 1.0, "DetectorOptions: underflow_rise = ",
                  underflow_rise, ", must be in [0, 1]");
    MIXPREC_CHECK(underflow_subnormal >= 0.0 && underflow_subnormal <= 1.0, "DetectorOptions: underflow_subnormal = ",
                  underflow_subnormal, ", must be in [0, 1]");
    MIXPREC_CHECK(stall_records >= 1, "DetectorOptions: stall_records = ", stall_records, ", must be >= 1");
    MIXPREC_CHECK(underflow_min_numel >= 0, "DetectorOptions: underflow_min_numel = ", underflow_min_numel,
                  ", must be >= 0");
    MIXPREC_CHECK(std::isfinite(stall_ratio) && stall_ratio >= 0.0, "DetectorOptions: stall_ratio = ", stall_ratio,
                  ", must be finite and >= 0 (0 turns the detector off)");
    MIXPREC_CHECK(stall_warmup_records >= 0, "DetectorOptions: stall_warmup_records = ", stall_warmup_records,
                  ", must be >= 0");
    MIXPREC_CHECK(moment_lag_rms > 0.0, "DetectorOptions: moment_lag_rms = ", moment_lag_rms,
                  ", must be > 0 (inf turns the detector off)");
    MIXPREC_CHECK(moment_lag_warmup_records >= 0, "DetectorOptions: moment_lag_warmup_records = ",
                  moment_lag_warmup_records, ", must be >= 0");
    MIXPREC_CHECK(update_jump_factor > 1.0, "DetectorOptions: update_jump_factor = ", update_jump_factor,
                  ", must be > 1 (inf turns the detector off)");
    MIXPREC_CHECK(update_jump_records >= 3, "DetectorOptions: update_jump_records = ", update_jump_records,
                  ", must be >= 3");
    MIXPREC_CHECK(update_jump_warmup_records >= 0, "DetectorOptions: update_jump_warmup_records = ",
                  update_jump_warmup_records, ", must be >= 0");
    MIXPREC_CHECK(overflow_repeats >= 1, "DetectorOptions: overflow_repeats = ", overflow_repeats, ", must be >= 1");
    MIXPREC_CHECK(overflow_window >= 1, "DetectorOptions: overflow_window = ", overflow_window, ", must be >= 1");
    MIXPREC_CHECK(trend_window >= min_samples, "DetectorOptions: trend_window = ", trend_window,
                  ", must be >= min_samples = ", min_samples);
    MIXPREC_CHECK(underflow_trend_records >= 2, "DetectorOptions: underflow_trend_records = ",
                  underflow_trend_records, ", must be >= 2");
    MIXPREC_CHECK(std::isfinite(diverge_sigmas) && diverge_sigmas >= 0.0, "DetectorOptions: diverge_sigmas = ",
                  diverge_sigmas, ", must be finite and >= 0");
    MIXPREC_CHECK(std::isfinite(diverge_rise) && diverge_rise >= 0.0, "DetectorOptions: diverge_rise = ",
                  diverge_rise, ", must be finite and >= 0");
    MIXPREC_CHECK(repeat_interval >= 1, "DetectorOptions: repeat_interval = ", repeat_interval, ", must be >= 1");
  }
};

namespace detail {

/// A least-squares line y = mean_y + slope * (x - mean_x). slope is NaN with
/// fewer than two distinct x; residual_std (SSR / (n - 2)) is 0 below three
/// points.
struct LineFit {
  std::size_t n = 0;
  double slope = std::numeric_limits<double>::quiet_NaN();
  double mean_x = 0, mean_y = 0;
  double residual_std = 0;
};

/// Fits x and y (same length) in double. x (step numbers, up to ~1e9) and y
/// are centred first, so the sums do not cancel.
inline LineFit fit_line(const std::vector<double>& x, const std::vector<double>& y) {
  LineFit f;
  f.n = x.size();
  if (f.n == 0) return f;
  for (std::size_t i = 0; i < f.n; ++i) {
    f.mean_x += x[i];
    f.mean_y += y[i];
  }
  f.mean_x /= static_cast<double>(f.n);
  f.mean_y /= static_cast<double>(f.n);
  double sxx = 0, sxy = 0;
  for (std::size_t i = 0; i < f.n; ++i) {
    sxx += (x[i] - f.mean_x) * (x[i] - f.mean_x);
    sxy += (x[i] - f.mean_x) * (y[i] - f.mean_y);
  }
  if (!(sxx > 0)) return f;
  f.slope = sxy / sxx;
  if (f.n > 2) {
    double ssr = 0;
    for (std::size_t i = 0; i < f.n; ++i) {
      const double r = (y[i] - f.mean_y) - f.slope * (x[i] - f.mean_x);
      ssr += r * r;
    }
    f.residual_std = std::sqrt(ssr / static_cast<double>(f.n - 2));
  }
  return f;
}

/// x with three significant digits, for messages ("0.312", "6.55e+04",
/// "nan"); the classic locale, whatever the program's global one is.
/// log2 of the q-quantile of the magnitudes a histogram counts (infs and
/// NaNs left out), interpolated log-uniformly within its bin; -inf when it
/// falls among the zeros, NaN for an empty histogram.
inline double quantile_exponent(const Histogram& h, double q) {
  std::uint64_t total = 0;
  for (int b = 0; b < Bins::nonfinite; ++b) total += h[static_cast<std::size_t>(b)];
  if (total == 0) return std::numeric_limits<double>::quiet_NaN();
  const double want = q * static_cast<double>(total);
  double below = 0;
  for (int b = 0; b < Bins::nonfinite; ++b) {
    const double n = static_cast<double>(h[static_cast<std::size_t>(b)]);
    if (n > 0 && below + n >= want) {
      if (b == Bins::zero) return -std::numeric_limits<double>::infinity();
      return Bins::lower_exponent(b) + (want - below) / n;
    }
    below += n;
  }
  return Bins::max_exponent + 1.0;
}

/// The median of `values` (the mean of the middle two for an even count),
/// sorted partly in `scratch`; NaN when empty.
template <class C>
double median_of(const C& values, std::vector<double>& scratch) {
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  scratch.assign(values.begin(), values.end());
  const std::size_t mid = scratch.size() / 2;
  std::nth_element(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(mid), scratch.end());
  const double upper = scratch[mid];
  if (scratch.size() % 2 == 1) return upper;
  const double lower = *std::max_element(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(mid));
  return 0.5 * (lower + upper);
}

inline std::string short_number(double x) {
  std::ostringstream out;
  out.imbue(std::locale::classic());
  out.precision(3);
  out << x;
  return out.str();
}

}  // namespace detail

/// A double in a monitor state (Detectors::state, Monitor::save_state):
/// exact for finite values (nlohmann writes the shortest round-trip form),
/// "nan", "inf" or "-inf" otherwise; and back, throwing on anything else.
inline nlohmann::json state_number(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  return x;
}
inline double state_number(const nlohmann::json& j) {
  if (j.is_string()) {
    const std::string s = j.get<std::string>();
    if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-inf") return -std::numeric_limits<double>::infinity();
    mixprec::detail::throw_error("not a number: \"", s, "\"");
  }
  return j.get<double>();
}

/// The instability detectors of one run. observe() takes each log record
/// in order and returns the events it raised; forecast() is the look ahead
/// made at the last record. The history kept is bounded by the windows (plus
/// one deque of step numbers per parameter, bounded by overflow_window); only
/// events() grows, by at most one event per (kind, parameter) per
/// repeat_interval steps.
///
/// Underflow concerns float16 gradients only: the underflow detector and
/// forecast read the parameters whose dtype is "float16" (bfloat16 and
/// float32 have fp32's range), and are silent when there are none.
class Detectors {
 public:
  /// Throws mixprec::Error on bad options, or on a RunInfo whose `every` is
  /// under 1, whose min_scale is negative or not finite, whose scaling is
  /// not "dynamic", "static" or "disabled", or whose parameters lack a name
  /// or have a dtype other than "float16", "bfloat16" or "float32".
  explicit Detectors(RunInfo info, DetectorOptions options = {}) : info_(std::move(info)), opt_(options) {
    opt_.validate();
    MIXPREC_CHECK(info_.every >= 1, "Detectors: info.every = ", info_.every, ", must be >= 1");
    MIXPREC_CHECK(std::isfinite(info_.min_scale) && info_.min_scale >= 0.0, "Detectors: info.min_scale = ",
                  info_.min_scale, ", must be finite and >= 0");
    MIXPREC_CHECK(info_.scaling == "dynamic" || info_.scaling == "static" || info_.scaling == "disabled",
                  "Detectors: info.scaling = \"", info_.scaling, "\", must be \"dynamic\", \"static\" or \"disabled\"");
    for (std::size_t i = 0; i < info_.params.size(); ++i) {
      const ParamInfo& p = info_.params[i];
      MIXPREC_CHECK(!p.name.empty(), "Detectors: info.params[", i, "].name is empty (an event without a name ",
                    "means the whole model)");
      MIXPREC_CHECK(p.dtype == "float16" || p.dtype == "bfloat16" || p.dtype == "float32", "Detectors: info.params[",
                    i, "].dtype = \"", p.dtype, "\" (", p.name, "), must be \"float16\", \"bfloat16\" or \"float32\"");
      MIXPREC_CHECK(p.numel >= 0, "Detectors: info.params[", i, "].numel = ", p.numel, " (", p.name,
                    "), must be >= 0");
      if (p.dtype == "float16") fp16_params_.push_back(i);
    }
    overflow_steps_.resize(info_.params.size());
    lowest_share_.assign(info_.params.size(), 2.0);
    stalled_.assign(info_.params.size(), 0);
    update_history_.resize(info_.params.size());
    forecast_.step = 0;
  }

  /// Runs every detector over the record's steps, then the logged-step
  /// detectors (underflow, stalled updates) over its parameters, and updates
  /// the forecast. Returns the events raised (also appended to events()).
  /// Throws mixprec::Error, before any state changes, when the record has no
  /// steps, its step numbers do not increase (within it and across records),
  /// it does not hold one ParamSample per parameter, or it names a parameter
  /// index out of range.
  std::vector<Event> observe(const LogRecord& r) {
    check_record(r);
    std::vector<Event> found;
    for (const StepSample& s : r.steps) observe_step(s, found);
    observe_logged(r, found);
    update_forecast(r);
    return found;
  }

  /// The look ahead made at the last observed record (all absent before
  /// the first):
  /// - steps_to_min_scale (dynamic scaling only): the least-squares slope b
  ///   of log2(scale) over the last trend_window steps; when b < 0,
  ///   (log2(scale now) - log2(min_scale)) / -b, 0 once the scale is at
  ///   min_scale. A backoff staircase fits a shallower slope than the mean
  ///   rate while the window holds few stairs, so this errs late.
  /// - steps_to_underflow: 0 when the float16 underflow share has reached
  ///   the threshold; else the least-squares slope (per step) over the last
  ///   underflow_trend_records records extrapolated to the threshold when it
  ///   is rising.
  /// - loss_slope: the least-squares slope of the finite losses of the last
  ///   trend_window steps, skipped steps included (their loss is a genuine
  ///   measurement at unchanged weights).
  /// - diverging: the last loss is not finite; or, with min_samples finite
  ///   losses in the window, the fitted rise slope * (last step - first
  ///   step) is positive, above diverge_sigmas residual standard deviations
  ///   (the rise stands out of the batch-to-batch scatter: a line through
  ///   noise does not qualify) and above diverge_rise * |mean loss| (it is
  ///   large enough to matter: a plateau creeping up by 1% does not). Both
  ///   tests are deliberately stricter than a t-test on the slope, whose
  ///   independence assumption minibatch losses do not meet.
  Forecast forecast() const { return forecast_; }

  /// Every event raised so far, oldest first.
  const std::vector<Event>& events() const { return events_; }

  /// A short status for a progress bar (under 60 characters): "monitor ok",
  /// or the count of events and the latest, e.g.
  /// "monitor: 2 events (underflow fc1.weight)".
  std::string status_line() const {
    if (events_.empty()) return "monitor ok";
    const std::size_t n = events_.size();
    const std::string head = "monitor: " + std::to_string(n) + (n == 1 ? " event (" : " events (");
    const Event& e = events_.back();
    std::string what = to_string(e.kind);
    if (!e.param.empty()) what += " " + e.param;
    constexpr std::size_t limit = 59;  // characters, ")" included
    if (head.size() + what.size() + 1 > limit) {
      std::size_t keep = limit > head.size() + 4 ? limit - head.size() - 4 : 0;
      // Cut before a UTF-8 continuation byte, never inside a character.
      while (keep > 0 && (static_cast<unsigned char>(what[keep]) & 0xC0) == 0x80) --keep;
      what = what.substr(0, keep) + "...";
    }
    return head + what + ")";
  }

  /// Appends an event raised outside the detectors (the precision
  /// fallback's) to events(), so that it is counted, rate-limit free, and
  /// kept in state(). Its kind must be a known EventKind.
  void record_event(const Event& e) {
    MIXPREC_CHECK(std::string(to_string(e.kind)) != "unknown", "Detectors::record_event: kind = ",
                  static_cast<int>(e.kind), ", not an EventKind");
    events_.push_back(e);
  }
  /// Parameter i's gradient dtype changed (a layer moved to another
  /// precision): the underflow detector and forecast read float16
  /// parameters only, from the next record on.
  void set_param_dtype(std::size_t i, const std::string& dtype) {
    MIXPREC_CHECK(i < info_.params.size(), "Detectors::set_param_dtype: parameter ", i, ", the run has ",
                  info_.params.size());
    MIXPREC_CHECK(dtype == "float16" || dtype == "bfloat16" || dtype == "float32",
                  "Detectors::set_param_dtype: dtype = \"", dtype, "\" (", info_.params[i].name,
                  "), must be \"float16\", \"bfloat16\" or \"float32\"");
    info_.params[i].dtype = dtype;
    fp16_params_.clear();
    for (std::size_t k = 0; k < info_.params.size(); ++k) {
      if (info_.params[k].dtype == "float16") fp16_params_.push_back(k);
    }
  }

  const RunInfo& info() const { return info_; }
  const DetectorOptions& options() const { return opt_; }
  /// The last step observed (0 before the first record).
  std::int64_t last_step() const { return last_step_; }

  /// Everything the detectors remember (windows, trends, rate limits,
  /// events, the forecast), for a checkpoint: restore() into detectors
  /// built with the same RunInfo and options continues exactly where these
  /// are. Doubles round-trip exactly; non-finite ones as "nan", "inf",
  /// "-inf".
  nlohmann::json state() const {
    using nlohmann::json;
    json j;
    j["last_step"] = last_step_;
    j["losses"] = doubles(losses_);
    j["norms"] = doubles(norms_);
    j["prev_scale"] = num(prev_scale_);
    j["backoffs"] = std::vector<std::int64_t>(backoffs_.begin(), backoffs_.end());
    j["settled_scale"] = num(settled_scale_);
    j["clean_streak"] = clean_streak_;
    j["streak_scale"] = num(streak_scale_);
    j["divergence_step"] = divergence_step_;
    j["divergence_why"] = divergence_why_;
    json overflow = json::array();
    for (const auto& d : overflow_steps_) overflow.push_back(std::vector<std::int64_t>(d.begin(), d.end()));
    j["overflow_steps"] = overflow;
    json trend = json::array();
    for (const TrendPoint& t : trend_) trend.push_back({t.step, num(t.scale), num(t.loss)});
    j["trend"] = trend;
    json shares = json::array();
    for (const SharePoint& p : underflow_trend_) {
      shares.push_back({p.step, num(p.share), std::vector<std::uint64_t>(p.hist.begin(), p.hist.end())});
    }
    j["underflow_trend"] = shares;
    j["lowest_share"] = doubles(lowest_share_);
    j["lowest_overall"] = num(lowest_overall_);
    j["stalled"] = stalled_;
    json updates = json::array();
    for (const auto& d : update_history_) updates.push_back(doubles(d));
    j["update_history"] = updates;
    json fired = json::array();
    for (const auto& kv : last_fired_) fired.push_back({kv.first.first, kv.first.second, kv.second});
    j["last_fired"] = fired;
    json events = json::array();
    for (const Event& e : events_) {
      events.push_back({static_cast<int>(e.kind), e.step, e.param, num(e.value), num(e.threshold), e.message,
                        e.suggestion});
    }
    j["events"] = events;
    j["forecast"] = {forecast_.step, num(forecast_.steps_to_min_scale), num(forecast_.steps_to_underflow),
                     num(forecast_.loss_slope), forecast_.diverging};
    return j;
  }

  /// Takes a state() back. Throws mixprec::Error, changing nothing, when it
  /// does not fit these detectors (another number of parameters, a
  /// malformed field).
  void restore(const nlohmann::json& j) {
    Detectors d = *this;  // filled, then swapped in: nothing changes on an error
    try {
      const std::size_t np = info_.params.size();
      d.last_step_ = j.at("last_step").get<std::int64_t>();
      d.losses_ = to_deque(j.at("losses"));
      d.norms_ = to_deque(j.at("norms"));
      d.prev_scale_ = from(j.at("prev_scale"));
      const auto backoffs = j.at("backoffs").get<std::vector<std::int64_t>>();
      d.backoffs_.assign(backoffs.begin(), backoffs.end());
      // States saved before these three existed restore as a fresh run's.
      d.settled_scale_ = j.contains("settled_scale") ? from(j.at("settled_scale"))
                                                     : std::numeric_limits<double>::quiet_NaN();
      d.clean_streak_ = j.value("clean_streak", std::int64_t{0});
      d.streak_scale_ = j.contains("streak_scale") ? from(j.at("streak_scale")) : std::numeric_limits<double>::quiet_NaN();
      d.divergence_step_ = j.value("divergence_step", std::numeric_limits<std::int64_t>::min() / 2);
      d.divergence_why_ = j.value("divergence_why", std::string());
      const auto& overflow = j.at("overflow_steps");
      MIXPREC_CHECK(overflow.size() == np, "overflow_steps has ", overflow.size(), " parameters, the run ", np);
      for (std::size_t i = 0; i < np; ++i) {
        const auto v = overflow[i].get<std::vector<std::int64_t>>();
        d.overflow_steps_[i].assign(v.begin(), v.end());
      }
      d.trend_.clear();
      for (const auto& t : j.at("trend")) d.trend_.push_back({t.at(0).get<std::int64_t>(), from(t.at(1)), from(t.at(2))});
      d.underflow_trend_.clear();
      for (const auto& p : j.at("underflow_trend")) {
        SharePoint sp{p.at(0).get<std::int64_t>(), from(p.at(1)), Histogram{}};
        const auto h = p.at(2).get<std::vector<std::uint64_t>>();
        MIXPREC_CHECK(h.size() == sp.hist.size(), "a histogram of ", h.size(), " bins, not ", sp.hist.size());
        std::copy(h.begin(), h.end(), sp.hist.begin());
        d.underflow_trend_.push_back(sp);
      }
      const std::deque<double> lowest = to_deque(j.at("lowest_share"));
      MIXPREC_CHECK(lowest.size() == d.lowest_share_.size(), "lowest_share has ", lowest.size(), " values, not ",
                    d.lowest_share_.size());
      d.lowest_share_.assign(lowest.begin(), lowest.end());
      d.lowest_overall_ = from(j.at("lowest_overall"));
      d.stalled_ = j.at("stalled").get<std::vector<std::int64_t>>();
      MIXPREC_CHECK(d.stalled_.size() == np, "stalled has ", d.stalled_.size(), " parameters, the run ", np);
      // States saved before update_jump existed restore with no history.
      for (auto& h : d.update_history_) h.clear();
      if (j.contains("update_history")) {
        const auto& updates = j.at("update_history");
        MIXPREC_CHECK(updates.size() == np, "update_history has ", updates.size(), " parameters, the run ", np);
        for (std::size_t i = 0; i < np; ++i) d.update_history_[i] = to_deque(updates[i]);
      }
      d.last_fired_.clear();
      for (const auto& f : j.at("last_fired")) {
        d.last_fired_[{f.at(0).get<int>(), f.at(1).get<std::string>()}] = f.at(2).get<std::int64_t>();
      }
      d.events_.clear();
      for (const auto& e : j.at("events")) {
        Event ev;
        ev.kind = static_cast<EventKind>(e.at(0).get<int>());
        ev.step = e.at(1).get<std::int64_t>();
        ev.param = e.at(2).get<std::string>();
        ev.value = from(e.at(3));
        ev.threshold = from(e.at(4));
        ev.message = e.at(5).get<std::string>();
        ev.suggestion = e.at(6).get<std::string>();
        d.events_.push_back(ev);
      }
      const auto& f = j.at("forecast");
      d.forecast_.step = f.at(0).get<std::int64_t>();
      d.forecast_.steps_to_min_scale = from(f.at(1));
      d.forecast_.steps_to_underflow = from(f.at(2));
      d.forecast_.loss_slope = from(f.at(3));
      d.forecast_.diverging = f.at(4).get<bool>();
    } catch (const nlohmann::json::exception& e) {
      mixprec::detail::throw_error("Detectors::restore: a malformed state: ", e.what());
    } catch (const Error& e) {
      mixprec::detail::throw_error("Detectors::restore: a state that does not fit this run: ", e.what());
    }
    *this = std::move(d);
  }

 private:
  static nlohmann::json num(double x) { return state_number(x); }
  static double from(const nlohmann::json& j) { return state_number(j); }
  template <class C>
  static nlohmann::json doubles(const C& c) {
    nlohmann::json a = nlohmann::json::array();
    for (double x : c) a.push_back(num(x));
    return a;
  }
  static std::deque<double> to_deque(const nlohmann::json& a) {
    std::deque<double> d;
    for (const auto& x : a) d.push_back(from(x));
    return d;
  }

  struct TrendPoint {
    std::int64_t step;
    double scale, loss;
  };
  struct SharePoint {
    std::int64_t step;
    double share;
    Histogram hist;  // of the float16 gradients
  };

  void check_record(const LogRecord& r) const {
    MIXPREC_CHECK(!r.steps.empty(), "Detectors::observe: the record has no steps");
    MIXPREC_CHECK(r.params.size() == info_.params.size(), "Detectors::observe: the record has ", r.params.size(),
                  " parameter samples, the run has ", info_.params.size(), " parameters");
    std::int64_t previous = last_step_;
    for (std::size_t k = 0; k < r.steps.size(); ++k) {
      const StepSample& s = r.steps[k];
      MIXPREC_CHECK(s.step > previous, "Detectors::observe: steps[", k, "].step = ", s.step, ", must be > ", previous,
                    " (step numbers increase, within a record and across records)");
      previous = s.step;
      for (int idx : s.nonfinite_params) {
        MIXPREC_CHECK(idx >= 0 && static_cast<std::size_t>(idx) < info_.params.size(), "Detectors::observe: steps[",
                      k, "].nonfinite_params holds ", idx, ", must be in [0, ", info_.params.size(), ")");
      }
    }
  }

  // Marks (kind, param) as fired at `step` unless it fired within the last
  // repeat_interval steps.
  bool may_fire(EventKind kind, const std::string& param, std::int64_t step) {
    const auto key = std::make_pair(static_cast<int>(kind), param);
    const auto it = last_fired_.find(key);
    if (it != last_fired_.end() && step - it->second < opt_.repeat_interval) return false;
    last_fired_[key] = step;
    return true;
  }

  void add(std::vector<Event>& found, EventKind kind, std::int64_t step, std::string param, double value,
           double threshold, std::string message, std::string suggestion) {
    Event e;
    e.kind = kind;
    e.step = step;
    e.param = std::move(param);
    e.value = value;
    e.threshold = threshold;
    e.message = std::move(message);
    e.suggestion = std::move(suggestion);
    found.push_back(e);
    events_.push_back(std::move(e));
  }

  double median_norm() { return detail::median_of(norms_, scratch_); }

  void observe_step(const StepSample& s, std::vector<Event>& found) {
    using detail::short_number;
    last_step_ = s.step;

    // The loss: not finite, or a spike over the previous applied steps.
    if (!std::isfinite(s.loss)) {
      divergence_step_ = s.step;
      divergence_why_ = "the loss was " + short_number(s.loss) + " at step " + std::to_string(s.step);
      if (may_fire(EventKind::nonfinite_loss, "", s.step)) {
        add(found, EventKind::nonfinite_loss, s.step, "", s.loss, std::numeric_limits<double>::quiet_NaN(),
            "the loss is " + short_number(s.loss) + " at step " + std::to_string(s.step),
            "compute the loss (softmax, log, exp) in fp32, check the batch's inputs and labels for inf/NaN, "
            "and lower the lr if the weights are diverging");
      }
    } else {
      if (static_cast<std::int64_t>(losses_.size()) >= opt_.min_samples) {
        double mean = 0;
        for (double l : losses_) mean += l;
        mean /= static_cast<double>(losses_.size());
        double ss = 0;
        for (double l : losses_) ss += (l - mean) * (l - mean);
        const double sd = std::max(std::sqrt(ss / static_cast<double>(losses_.size() - 1)),
                                   1e-3 * std::fabs(mean) + 1e-12);
        const double limit = mean + opt_.loss_z * sd;
        if (s.loss > limit) {
          divergence_step_ = s.step;
          divergence_why_ = "the loss rose to " + short_number(s.loss) + " at step " + std::to_string(s.step) +
                            " (its recent mean: " + short_number(mean) + ")";
        }
        if (s.loss > limit && may_fire(EventKind::loss_spike, "", s.step)) {
          add(found, EventKind::loss_spike, s.step, "", s.loss, limit,
              "the loss " + short_number(s.loss) + " is " + short_number((s.loss - mean) / sd) +
                  " standard deviations above its mean " + short_number(mean) + " over the last " +
                  std::to_string(losses_.size()) + " applied steps",
              "lower the lr (or lengthen its warmup), clip the gradient norm (scaler.step(opt, max_norm)), "
              "and check this step's batch for bad data");
        }
      }
      if (!s.skipped) {
        losses_.push_back(s.loss);
        if (static_cast<std::int64_t>(losses_.size()) > opt_.loss_window) losses_.pop_front();
      }
    }

    // The gradient norm against the median of the recent finite norms (a
    // median, so that one earlier explosion does not mask the next).
    if (std::isfinite(s.grad_norm)) {
      if (static_cast<std::int64_t>(norms_.size()) >= opt_.min_samples) {
        const double median = median_norm();
        const double limit = opt_.grad_norm_factor * median;
        if (median > 0 && s.grad_norm > limit) {
          divergence_step_ = s.step;
          divergence_why_ = "the gradient norm rose to " + short_number(s.grad_norm / median) +
                            "x its median at step " + std::to_string(s.step);
        }
        if (median > 0 && s.grad_norm > limit && may_fire(EventKind::grad_norm_explosion, "", s.step)) {
          add(found, EventKind::grad_norm_explosion, s.step, "", s.grad_norm, limit,
              "the gradient norm " + short_number(s.grad_norm) + " is " + short_number(s.grad_norm / median) +
                  "x its median " + short_number(median) + " over the last " + std::to_string(norms_.size()) +
                  " steps",
              "clip the gradient norm (scaler.step(opt, max_norm)) or lower the lr");
        }
      }
      norms_.push_back(s.grad_norm);
      if (static_cast<std::int64_t>(norms_.size()) > opt_.grad_norm_window) norms_.pop_front();
    }

    // The scale: under the floor, or backing off under the settled scale
    // often. A scale settles once it has held settle_steps applied steps.
    const double probe_floor = info_.init_scale * std::ldexp(1.0, -static_cast<int>(opt_.probe_backoffs));
    const bool settled = !std::isnan(settled_scale_);
    const bool under = settled ? s.scale < settled_scale_ : s.scale < probe_floor;
    if (s.scale < prev_scale_ && under) backoffs_.push_back(s.step);  // false while prev_scale_ is NaN
    prev_scale_ = s.scale;
    if (s.scale != streak_scale_) {  // a new scale (a growth or a backoff) starts its own streak
      clean_streak_ = 0;
      streak_scale_ = s.scale;
    }
    clean_streak_ = s.skipped ? 0 : clean_streak_ + 1;
    if (clean_streak_ >= opt_.settle_steps) settled_scale_ = s.scale;
    while (!backoffs_.empty() && backoffs_.front() <= s.step - opt_.backoff_window) backoffs_.pop_front();
    if (info_.scaling == "dynamic" && s.scale < opt_.collapse_scale) {  // a static scale is the user's choice
      if (may_fire(EventKind::scale_collapse, "", s.step)) {
        add(found, EventKind::scale_collapse, s.step, "", s.scale, opt_.collapse_scale,
            "the loss scale fell to " + short_number(s.scale) + ", under " + short_number(opt_.collapse_scale) +
                ": the gradients were not finite even unscaled (an fp16 overflow, or a NaN)",
            overflow_hint(s.step, ""));
      }
    } else if (static_cast<std::int64_t>(backoffs_.size()) >= opt_.backoff_count &&
               may_fire(EventKind::scale_collapse, "", s.step)) {
      add(found, EventKind::scale_collapse, s.step, "", static_cast<double>(backoffs_.size()),
          static_cast<double>(opt_.backoff_count),
          "the loss scale backed off under " +
              (settled ? "the scale that had held (" + short_number(settled_scale_) + ") "
                       : "init_scale / 2^" + std::to_string(opt_.probe_backoffs) + " (no scale has held yet) ") +
              std::to_string(backoffs_.size()) + " times in the last " + std::to_string(opt_.backoff_window) +
              " steps, to " + short_number(s.scale),
          overflow_hint(s.step, ""));
    }

    // Parameters whose gradient keeps overflowing. The condition can only
    // become true when a step is added, so only those are checked. Under
    // dynamic scaling an overflow at a scale above the settled one is the
    // scaler probing (its first steps, a growth), not the layer.
    const bool counts = info_.scaling != "dynamic" || (settled ? s.scale <= settled_scale_ : s.scale < probe_floor) ||
                        s.scale < opt_.collapse_scale;
    for (int idx : s.nonfinite_params) {
      if (!counts) break;
      const auto i = static_cast<std::size_t>(idx);
      std::deque<std::int64_t>& d = overflow_steps_[i];
      if (!d.empty() && d.back() == s.step) continue;  // listed twice in one step
      d.push_back(s.step);
      while (d.front() <= s.step - opt_.overflow_window) d.pop_front();
      const std::string& name = info_.params[i].name;
      if (static_cast<std::int64_t>(d.size()) >= opt_.overflow_repeats &&
          may_fire(EventKind::repeated_overflow, name, s.step)) {
        add(found, EventKind::repeated_overflow, s.step, name, static_cast<double>(d.size()),
            static_cast<double>(opt_.overflow_repeats),
            name + "'s gradient was not finite on " + std::to_string(d.size()) + " of the last " +
                std::to_string(opt_.overflow_window) + " steps",
            overflow_hint(s.step, name));
      }
    }

    trend_.push_back({s.step, s.scale, s.loss});
    while (trend_.front().step <= s.step - opt_.trend_window) trend_.pop_front();
  }

  // What to do about overflows, by their cause. When the loss or the
  // gradient norm blew up within the last backoff_window steps, the weights
  // are diverging and fp16 merely overflows first: bf16 would only postpone
  // it. Otherwise a layer's values exceed fp16's range.
  std::string overflow_hint(std::int64_t step, const std::string& param) const {
    if (step - divergence_step_ <= opt_.backoff_window) {
      return "the run is diverging (" + divergence_why_ +
             "), and fp16 overflows first: lower the lr (or lengthen its warmup) and clip the gradient norm "
             "(scaler.step(opt, max_norm)); bf16 would only postpone the blow-up";
    }
    if (!param.empty()) {
      return "the layer that owns " + param +
             " overflows fp16: compute it in fp32 or normalise its input, check its init and inputs for inf/NaN, "
             "or train in bf16";
    }
    return "look for a layer that overflows in fp16 (the repeated_overflow events and the per-parameter overflow "
           "shares name it; often the loss, a softmax or an unnormalised activation): compute it and the loss in "
           "fp32, or train in bf16";
  }

  std::string underflow_hint() const {
    if (info_.scaling == "dynamic") {
      return "raise the loss scale (a larger init_scale or a shorter growth_interval; if the scale keeps "
             "backing off, find the parameter that overflows) or train in bf16";
    }
    if (info_.scaling == "static") {
      return "raise the loss scale (init_scale, or enable dynamic scaling) or train in bf16";
    }
    return "enable loss scaling (dynamic, with init_scale 65536) or train in bf16";
  }

  // h without the values fp16 loses (zero or under 2^-24).
  static Histogram kept(Histogram h) {
    for (int b = 0; b < Bins::nonfinite; ++b) {
      if (b == Bins::zero || Bins::lower_exponent(b) < Bins::fp16_min_subnormal_exponent) {  // bin 1 is 2^-45
        h[static_cast<std::size_t>(b)] = 0;
      }
    }
    return h;
  }
  // The subnormal share of the values h keeps in fp16 (overflowed ones
  // count as kept: they are not zeros); 1 when it keeps none. From the
  // counts, so that half of an even count is exactly 0.5.
  static double kept_subnormal(const Histogram& h) {
    const Histogram k = kept(h);
    std::uint64_t n = 0;
    for (std::uint64_t c : k) n += c;
    return n == 0 ? 1.0 : fp16_shares(k).subnormal;
  }
  // Whether the values a gradient keeps in fp16 sit where underflowing
  // ones pass through: at least underflow_subnormal of them subnormal (see
  // DetectorOptions::underflow_subnormal). Dead units' zeros leave the
  // rest of the gradient normal.
  bool draining(const Histogram& h) const { return kept_subnormal(h) >= opt_.underflow_subnormal; }

  void observe_logged(const LogRecord& r, std::vector<Event>& found) {
    using detail::short_number;
    const StepSample& last = r.last();

    // Underflow over the float16 parameters, naming the worst large one.
    Histogram all{};
    for (std::size_t i : fp16_params_) {
      for (std::size_t b = 0; b < all.size(); ++b) all[b] += r.params[i].hist[b];
    }
    std::uint64_t total = 0;
    for (std::uint64_t n : all) total += n;
    if (total > 0) {
      const double share = fp16_shares(all).underflow;
      std::size_t worst = info_.params.size();
      double worst_share = -1, worst_kept_subnormal = 0;
      for (std::size_t i : fp16_params_) {
        if (info_.params[i].numel < opt_.underflow_min_numel) continue;
        const Histogram& h = r.params[i].hist;
        std::uint64_t n = 0;
        for (std::uint64_t c : h) n += c;
        if (n == 0) continue;
        const double s = fp16_shares(h).underflow;
        lowest_share_[i] = std::min(lowest_share_[i], s);
        if (s >= opt_.underflow_share && s - lowest_share_[i] >= opt_.underflow_rise && draining(h) &&
            s > worst_share) {
          worst = i;
          worst_share = s;
          worst_kept_subnormal = kept_subnormal(h);
        }
      }
      const std::string percent_all = short_number(100 * share) + "%";
      if (worst < info_.params.size()) {
        const std::string& name = info_.params[worst].name;
        if (may_fire(EventKind::underflow, name, last.step)) {
          add(found, EventKind::underflow, last.step, name, worst_share, opt_.underflow_share,
              short_number(100 * worst_share) + "% of " + name +
                  "'s scaled gradient is lost in fp16 (zero or under 2^-24; " + percent_all +
                  " over all fp16 parameters), and " + short_number(100 * worst_kept_subnormal) +
                  "% of the values it keeps are subnormal (under 2^-14)",
              underflow_hint());
        }
      } else if (share >= opt_.underflow_share && share - lowest_overall_ >= opt_.underflow_rise &&
                 draining(all) && may_fire(EventKind::underflow, "", last.step)) {
        add(found, EventKind::underflow, last.step, "", share, opt_.underflow_share,
            percent_all + " of the scaled fp16 gradients is lost in fp16 (zero or under 2^-24), and " +
                short_number(100 * kept_subnormal(all)) + "% of the values they keep are subnormal (under 2^-14)",
            underflow_hint());
      }
      lowest_overall_ = std::min(lowest_overall_, share);
      underflow_trend_.push_back({last.step, share, all});
      if (static_cast<std::int64_t>(underflow_trend_.size()) > opt_.underflow_trend_records) {
        underflow_trend_.pop_front();
      }
    }

    // The second moment lagging g^2 (computed in the host update pass; NaN,
    // which compares false, elsewhere).
    if (!last.skipped && last.step > opt_.moment_lag_warmup_records * info_.every) {
      for (std::size_t i = 0; i < r.params.size(); ++i) {
        const double rms = r.params[i].v_ratio_rms;
        const ParamInfo& p = info_.params[i];
        if (!(rms > opt_.moment_lag_rms) || !may_fire(EventKind::moment_lag, p.name, last.step)) continue;
        add(found, EventKind::moment_lag, last.step, p.name, rms, opt_.moment_lag_rms,
            p.name + "'s RMS of g^2 / v is " + short_number(rms) + ", above " + short_number(opt_.moment_lag_rms) +
                ": its second moment underestimates the gradients it divides, which precedes loss spikes",
            "lower the lr or beta2 (v then follows g^2 sooner), or clip updates (AdamOptions::update_clipping, "
            "StableAdamW)");
      }
    }

    // Updates that jumped far above their recent median (NaN, zero weights,
    // and skipped steps, which moved nothing, are left out of the history).
    if (!last.skipped) {
      const bool warm = last.step > opt_.update_jump_warmup_records * info_.every;
      for (std::size_t i = 0; i < r.params.size(); ++i) {
        const double ratio = r.params[i].update_ratio;
        if (!(std::isfinite(ratio) && ratio > 0)) continue;
        std::deque<double>& h = update_history_[i];
        if (warm && static_cast<std::int64_t>(h.size()) >= opt_.update_jump_records) {
          const double median = detail::median_of(h, scratch_);
          const double limit = opt_.update_jump_factor * median;
          const ParamInfo& p = info_.params[i];
          if (median > 0 && ratio > limit && may_fire(EventKind::update_jump, p.name, last.step)) {
            add(found, EventKind::update_jump, last.step, p.name, ratio, limit,
                p.name + "'s update ratio " + short_number(ratio) + " is " + short_number(ratio / median) +
                    "x its median " + short_number(median) + " over the last " + std::to_string(h.size()) +
                    " logged steps: its updates jumped, as when a gradient burst meets a second moment that had "
                    "decayed, which precedes loss spikes",
                "lower the lr, or clip updates (AdamOptions::update_clipping, StableAdamW) or the gradient norm "
                "(scaler.step(opt, max_norm))");
          }
        }
        h.push_back(ratio);
        if (static_cast<std::int64_t>(h.size()) > opt_.update_jump_records) h.pop_front();
      }
    }

    // Stalled updates: only applied steps move the weights, and Adam's
    // first steps are not representative.
    if (!last.skipped && last.step > opt_.stall_warmup_records * info_.every) {
      for (std::size_t i = 0; i < r.params.size(); ++i) {
        const double ratio = r.params[i].update_ratio;  // NaN (zero weights) compares false
        const ParamInfo& p = info_.params[i];
        stalled_[i] = ratio < opt_.stall_ratio ? stalled_[i] + 1 : 0;
        if (stalled_[i] < opt_.stall_records || !may_fire(EventKind::stalled_updates, p.name, last.step)) continue;
        std::string why = "the lr is too small for this parameter, or its weights are too large: at this ratio ";
        if (p.dtype == "float16") {
          why += "its fp16 weights no longer change (one fp16 ulp is 2^-11 relative) and even the fp32 master ";
        } else if (p.dtype == "bfloat16") {
          why += "its bf16 weights no longer change (one bf16 ulp is 2^-8 relative) and even the fp32 master ";
        } else {
          why += "its fp32 weights ";
        }
        why += "rounds updates away (one fp32 ulp is 2^-24 relative)";
        add(found, EventKind::stalled_updates, last.step, p.name, ratio, opt_.stall_ratio,
            p.name + "'s update ratio " + short_number(ratio) + " is under " + short_number(opt_.stall_ratio), why);
      }
    }
  }

  void update_forecast(const LogRecord& r) {
    Forecast f;
    f.step = r.last().step;
    std::vector<double> x, y;

    if (info_.scaling == "dynamic" && info_.min_scale > 0) {
      for (const TrendPoint& p : trend_) {
        if (std::isfinite(p.scale) && p.scale > 0) {
          x.push_back(static_cast<double>(p.step));
          y.push_back(std::log2(p.scale));
        }
      }
      const double now = r.last().scale;
      if (std::isfinite(now) && now > 0) {
        const double gap = std::log2(now) - std::log2(info_.min_scale);
        const detail::LineFit fit = detail::fit_line(x, y);
        if (gap <= 0) {
          f.steps_to_min_scale = 0;
        } else if (fit.slope < 0) {
          f.steps_to_min_scale = gap / -fit.slope;
        }
      }
    }

    // Only when this record measured a share (it has float16 gradients).
    if (!underflow_trend_.empty() && underflow_trend_.back().step == f.step) {
      // The share crosses the threshold q when the q-quantile of the
      // gradients' magnitudes falls under 2^-24. Gradients grow and shrink
      // by factors, so that quantile's log2 moves about linearly where the
      // share itself (flat at 0, then a sigmoid) does not: extrapolate it.
      // The target is the share the detector fires at (the threshold, or
      // the run's lowest share plus the rise, whichever is higher).
      const double target = std::min(1.0, std::max(opt_.underflow_share, lowest_overall_ + opt_.underflow_rise));
      const SharePoint& now = underflow_trend_.back();
      x.clear();
      y.clear();
      for (const SharePoint& p : underflow_trend_) {
        const double q = detail::quantile_exponent(p.hist, target);
        if (std::isfinite(q)) {
          x.push_back(static_cast<double>(p.step));
          y.push_back(q);
        }
      }
      const detail::LineFit fit = detail::fit_line(x, y);
      const double boundary = Bins::fp16_min_subnormal_exponent;
      const double q_now = detail::quantile_exponent(now.hist, target);
      double to_share = std::numeric_limits<double>::quiet_NaN();
      if (now.share >= target) {
        to_share = 0;
      } else if (std::isfinite(q_now) && fit.slope < 0) {
        to_share = std::max(0.0, (q_now - boundary) / -fit.slope);
      }
      // The detector also asks that underflow_subnormal of the kept values
      // be subnormal: the underflow_subnormal-quantile of the kept
      // magnitudes under 2^-14. Dead units' zeros push the share over the
      // target with the kept values far above that: extrapolate that
      // quantile the same way, and the forecast is the later of the two.
      double to_drain = std::numeric_limits<double>::quiet_NaN();
      if (draining(now.hist)) {
        to_drain = 0;
      } else {
        x.clear();
        y.clear();
        for (const SharePoint& p : underflow_trend_) {
          const double q = detail::quantile_exponent(kept(p.hist), opt_.underflow_subnormal);
          if (std::isfinite(q)) {
            x.push_back(static_cast<double>(p.step));
            y.push_back(q);
          }
        }
        const detail::LineFit kept_fit = detail::fit_line(x, y);
        const double k_now = detail::quantile_exponent(kept(now.hist), opt_.underflow_subnormal);
        if (std::isfinite(k_now) && kept_fit.slope < 0) {
          to_drain = std::max(0.0, (k_now - Bins::fp16_min_normal_exponent) / -kept_fit.slope);
        }
      }
      if (std::isfinite(to_share) && std::isfinite(to_drain)) f.steps_to_underflow = std::max(to_share, to_drain);
    }

    x.clear();
    y.clear();
    for (const TrendPoint& p : trend_) {
      if (std::isfinite(p.loss)) {
        x.push_back(static_cast<double>(p.step));
        y.push_back(p.loss);
      }
    }
    const detail::LineFit fit = detail::fit_line(x, y);
    f.loss_slope = fit.slope;
    if (!std::isfinite(r.last().loss)) {
      f.diverging = true;
    } else if (static_cast<std::int64_t>(fit.n) >= opt_.min_samples && fit.slope > 0) {
      const double rise = fit.slope * (x.back() - x.front());
      f.diverging = rise > opt_.diverge_sigmas * fit.residual_std && rise > opt_.diverge_rise * std::fabs(fit.mean_y);
    }
    forecast_ = f;
  }

  RunInfo info_;
  DetectorOptions opt_;
  std::vector<std::size_t> fp16_params_;  // indices of the float16 parameters

  std::int64_t last_step_ = 0;
  std::deque<double> losses_;  // the last loss_window finite losses of applied steps
  std::deque<double> norms_;   // the last grad_norm_window finite gradient norms
  std::vector<double> scratch_;
  double prev_scale_ = std::numeric_limits<double>::quiet_NaN();
  std::deque<std::int64_t> backoffs_;                     // backoffs under the settled scale, within backoff_window
  double settled_scale_ = std::numeric_limits<double>::quiet_NaN();  // held settle_steps applied steps; NaN: none yet
  std::int64_t clean_streak_ = 0;                                      // consecutive applied steps at streak_scale_
  double streak_scale_ = std::numeric_limits<double>::quiet_NaN();
  std::int64_t divergence_step_ = std::numeric_limits<std::int64_t>::min() / 2;  // the loss / norm last blew up
  std::string divergence_why_;
  std::vector<std::deque<std::int64_t>> overflow_steps_;  // per parameter, within overflow_window
  std::deque<TrendPoint> trend_;                          // the last trend_window steps
  std::deque<SharePoint> underflow_trend_;                // the last underflow_trend_records records
  std::vector<double> lowest_share_;                      // per parameter, the lowest lost share so far
  double lowest_overall_ = 2.0;                           // the same over all float16 parameters
  std::vector<std::int64_t> stalled_;                     // per parameter, consecutive stalled records
  std::vector<std::deque<double>> update_history_;        // per parameter, the last update_jump_records ratios

  std::map<std::pair<int, std::string>, std::int64_t> last_fired_;  // (kind, param) -> step
  std::vector<Event> events_;
  Forecast forecast_;
};

}  // namespace monitor
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// What the instability monitor measures, as plain host data: the exponent
// histogram's layout, the figures of every step, the figures of a logged
// step per parameter, and the events and forecasts the detectors derive.
// The JSONL log (docs/monitor.md) writes these one record per logged step.
#pragma once

#include "mixprec/core/config.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

MIXPREC_NAMESPACE_BEGIN namespace monitor {

/// The log2 histogram of gradient magnitudes. Bin 0 counts exact zeros,
/// bin 63 infs and NaNs; a finite nonzero x with e = floor(log2 |x|) goes to
/// bin clamp(e, -45, 16) + 46: bin 1 holds everything below 2^-44, bin 62
/// everything from 2^16 up, bin b in between holds [2^(b-46), 2^(b-45)).
struct Bins {
  static constexpr int count = 64;
  static constexpr int zero = 0;
  static constexpr int nonfinite = 63;
  static constexpr int min_exponent = -45;  // bin 1
  static constexpr int max_exponent = 16;   // bin 62
  static constexpr int offset = 46;         // bin = clamp(e) + offset
  /// fp16's smallest subnormal is 2^-24, its smallest normal 2^-14, its
  /// largest finite value 65504 (just under 2^16).
  static constexpr int fp16_min_subnormal_exponent = -24;
  static constexpr int fp16_min_normal_exponent = -14;
  static constexpr int fp16_overflow_exponent = 16;

  /// The bin of x (host version; the CUDA kernel computes the same from
  /// the float's bits).
  static int of(float x) {
    if (x == 0.0f) return zero;
    if (!std::isfinite(x)) return nonfinite;
    int e = std::ilogb(x);  // floor(log2 |x|), subnormals included
    if (e < min_exponent) e = min_exponent;
    if (e > max_exponent) e = max_exponent;
    return e + offset;
  }
  /// The exponent range of bin b (1..62): [2^lower, 2^(lower+1)).
  static int lower_exponent(int b) { return b - offset; }
};

using Histogram = std::array<std::uint64_t, Bins::count>;

/// What a histogram of (scaled) gradients means for fp16: the share of
/// elements that are zero or below 2^-24 (lost: fp16 stores them as 0; in an
/// fp16 gradient, values that underflowed are already zeros and count here),
/// the share in [2^-24, 2^-14) (fp16 subnormals: bits of precision lost), and
/// the share from 2^16 up or not finite (fp16 overflows to inf).
struct Fp16Shares {
  double underflow = 0, subnormal = 0, overflow = 0;
};

inline Fp16Shares fp16_shares(const Histogram& h) {
  std::uint64_t total = 0, under = 0, sub = 0, over = 0;
  for (int b = 0; b < Bins::count; ++b) {
    const std::uint64_t n = h[static_cast<std::size_t>(b)];
    total += n;
    if (b == Bins::zero) {
      under += n;
    } else if (b == Bins::nonfinite) {
      over += n;
    } else {
      const int e = Bins::lower_exponent(b);
      if (b == 1 || e < Bins::fp16_min_subnormal_exponent) {
        under += n;
      } else if (e < Bins::fp16_min_normal_exponent) {
        sub += n;
      } else if (e >= Bins::fp16_overflow_exponent) {
        over += n;
      }
    }
  }
  Fp16Shares s;
  if (total == 0) return s;
  const double t = static_cast<double>(total);
  s.underflow = static_cast<double>(under) / t;
  s.subnormal = static_cast<double>(sub) / t;
  s.overflow = static_cast<double>(over) / t;
  return s;
}

/// One parameter of the monitored optimizer.
struct ParamInfo {
  std::string name;
  std::int64_t numel = 0;
  std::string dtype;  // of its gradient: "float16", "bfloat16", "float32"
};

/// What the log's header record says about the run.
struct RunInfo {
  std::string optimizer;  // "AdamW", ...
  std::string device;     // "cpu", "cuda:0"
  std::string scaling;    // "dynamic", "static", "disabled"
  double init_scale = 0, min_scale = 0, max_scale = 0;
  int every = 10;  // a logged step every `every` steps
  std::vector<ParamInfo> params;
};

/// The figures of one step (every step, read back with the next logged one).
struct StepSample {
  std::int64_t step = 0;  // 1-based count of monitored steps, skipped ones included
  double loss = std::numeric_limits<double>::quiet_NaN();  // as the trainer gave it
  double scale = 1;        // the loss scale the step's gradients carried
  bool skipped = false;    // a gradient was not finite: the step changed nothing
  /// The spike guard skipped the step (its gradients were finite; the
  /// loss or norm was an outlier): it changed nothing either.
  bool guard_skipped = false;
  double grad_norm = 0;    // L2 norm of all unscaled gradients (inf or NaN when skipped)
  std::vector<int> nonfinite_params;  // indices of the parameters whose gradient held inf/NaN
};

/// The figures of one parameter at a logged step.
struct ParamSample {
  double grad_norm = 0;  // L2 norm of the unscaled gradient
  /// ||master after - master before|| / ||master before|| (fp32 masters);
  /// 0 when the step was skipped, NaN when the weight's norm is 0.
  double update_ratio = 0;
  /// Share of elements where eps dominates the update's denominator:
  /// sqrt(v / bias_correction2) < eps (Adam, AdamW; RMSprop: sqrt(v) < eps).
  /// NaN for optimizers without a second moment (SGD).
  double eps_share = std::numeric_limits<double>::quiet_NaN();
  /// RMS over the elements of g^2 / max(v, eps^2), v the bias-corrected
  /// second moment after the update (Wortsman et al. 2023: loss spikes
  /// follow 1-8 steps after it exceeds 1, when v underestimates g^2), from
  /// the update pass (Optimizer::set_precursors). NaN without a second
  /// moment and on a skipped step.
  double v_ratio_rms = std::numeric_limits<double>::quiet_NaN();
  /// Share of elements whose update is under half an ulp of their 16-bit
  /// weight: updates that rounding would lose without an fp32 master (what
  /// StateLayout::master none must live with). NaN where not computed, as
  /// v_ratio_rms.
  double lost_update_share = std::numeric_limits<double>::quiet_NaN();
  bool nonfinite = false;
  Histogram hist{};  // of the gradient as stored (scaled), see Bins
};

/// One record of the log: the steps since the previous record (oldest
/// first; the last is the logged step) and the logged step's details.
struct LogRecord {
  std::vector<StepSample> steps;
  std::vector<ParamSample> params;
  const StepSample& last() const { return steps.back(); }
  Histogram overall() const {
    Histogram h{};
    for (const ParamSample& p : params) {
      for (std::size_t b = 0; b < h.size(); ++b) h[b] += p.hist[b];
    }
    return h;
  }
};

enum class EventKind {
  nonfinite_loss,       // the loss is inf or NaN
  loss_spike,           // the loss is far above its recent mean (z-score)
  grad_norm_explosion,  // the gradient norm jumped far above its recent median
  scale_collapse,       // the scale fell under a floor, or backed off often
  underflow,            // a large share of the scaled gradients is lost in fp16
  stalled_updates,      // a parameter's update ratio is far below 1e-5
  repeated_overflow,    // one parameter keeps producing non-finite gradients
  precision_fallback,   // a layer's compute moved (or should move) to bf16/fp32 (monitor/precision_fallback.hpp)
  moment_lag,           // the second moment underestimates g^2: RMS of g^2 / v far above 1 (a spike precursor)
  update_jump,          // a parameter's update ratio jumped far above its recent median (a spike precursor)
};

inline const char* to_string(EventKind k) {
  switch (k) {
    case EventKind::nonfinite_loss: return "nonfinite_loss";
    case EventKind::loss_spike: return "loss_spike";
    case EventKind::grad_norm_explosion: return "grad_norm_explosion";
    case EventKind::scale_collapse: return "scale_collapse";
    case EventKind::underflow: return "underflow";
    case EventKind::stalled_updates: return "stalled_updates";
    case EventKind::repeated_overflow: return "repeated_overflow";
    case EventKind::precision_fallback: return "precision_fallback";
    case EventKind::moment_lag: return "moment_lag";
    case EventKind::update_jump: return "update_jump";
  }
  return "unknown";
}

/// Something a detector found.
struct Event {
  EventKind kind = EventKind::nonfinite_loss;
  std::int64_t step = 0;
  std::string param;  // empty: the whole model
  double value = 0;      // what was measured
  double threshold = 0;  // what it was compared with
  std::string message;     // one sentence: what happened
  std::string suggestion;  // one sentence: what to try
};

/// The detectors' look ahead, from the recent trend. Each "steps" figure is
/// absent (NaN) when the trend does not point that way.
struct Forecast {
  std::int64_t step = 0;  // the logged step it was made at
  /// Steps until the loss scale reaches min_scale at the recent backoff rate.
  double steps_to_min_scale = std::numeric_limits<double>::quiet_NaN();
  /// Steps until the fp16 underflow share crosses the threshold q (0 when
  /// it already has): from the trend of log2 of the q-quantile of the
  /// gradients' magnitudes, which crosses -24 when the share crosses q; and
  /// no sooner than the values fp16 keeps are subnormal enough for the
  /// underflow detector (DetectorOptions::underflow_subnormal), from the
  /// trend of the same quantile of the kept magnitudes, which crosses -14.
  double steps_to_underflow = std::numeric_limits<double>::quiet_NaN();
  /// The loss's recent slope per step (least squares over finite losses).
  double loss_slope = std::numeric_limits<double>::quiet_NaN();
  /// The loss is rising significantly, or is not finite.
  bool diverging = false;
};

}  // namespace monitor
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// Learning-rate schedules: a factor of each group's base lr as a function of
// the number of applied optimizer steps. Skipped steps do not advance them.
#pragma once

#include <cmath>
#include <cstdint>

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/simd.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// lr(k) = base_lr * factor(k) at the optimizer's k-th applied step (k = 0
/// for the first). The closed forms of PyTorch's schedulers, stepped once per
/// applied step:
///  * constant: 1.
///  * linear_warmup (torch LinearLR, end_factor 1): start_factor + (1 -
///    start_factor) * min(k, warmup_steps) / warmup_steps.
///  * cosine (torch CosineAnnealingLR with eta_min = min_factor * base_lr):
///    min_factor + (1 - min_factor) * (1 + cos(pi * k / total_steps)) / 2.
///    Like torch, it keeps following the cosine after total_steps.
///  * step_decay (torch StepLR): gamma^floor(k / step_size), gamma in (0, 1].
/// Every factor lies in [0, 1], so a scheduled lr never exceeds the base lr
/// (which the optimizers keep a finite float).
struct LRSchedule {
  enum class Kind { constant, linear_warmup, cosine, step_decay };

  Kind kind = Kind::constant;
  std::int64_t steps = 1;     // warmup_steps, total_steps or step_size
  double start_factor = 1.0;  // linear_warmup
  double min_factor = 0.0;    // cosine
  double gamma = 1.0;         // step_decay

  static LRSchedule constant() { return {}; }
  static LRSchedule linear_warmup(std::int64_t warmup_steps, double start_factor = 1.0 / 3.0) {
    MIXPREC_CHECK(warmup_steps > 0, "LRSchedule::linear_warmup: warmup_steps = ", warmup_steps,
                  ", must be > 0");
    MIXPREC_CHECK(start_factor > 0.0 && start_factor <= 1.0,
                  "LRSchedule::linear_warmup: start_factor = ", start_factor, ", must be in (0, 1]");
    return {Kind::linear_warmup, warmup_steps, start_factor, 0.0, 1.0};
  }
  static LRSchedule cosine(std::int64_t total_steps, double min_factor = 0.0) {
    MIXPREC_CHECK(total_steps > 0, "LRSchedule::cosine: total_steps = ", total_steps,
                  ", must be > 0");
    MIXPREC_CHECK(min_factor >= 0.0 && min_factor <= 1.0, "LRSchedule::cosine: min_factor = ",
                  min_factor, ", must be in [0, 1]");
    return {Kind::cosine, total_steps, 1.0, min_factor, 1.0};
  }
  static LRSchedule step_decay(std::int64_t step_size, double gamma = 0.1) {
    MIXPREC_CHECK(step_size > 0, "LRSchedule::step_decay: step_size = ", step_size,
                  ", must be > 0");
    MIXPREC_CHECK(gamma > 0.0 && gamma <= 1.0, "LRSchedule::step_decay: gamma = ", gamma,
                  ", must be in (0, 1] (a decay; gamma > 1 grows the lr without bound)");
    return {Kind::step_decay, step_size, 1.0, 0.0, gamma};
  }

  /// Throws unless the fields describe a valid schedule (the factories only
  /// make valid ones; this guards schedules assembled field by field).
  void validate() const {
    MIXPREC_CHECK(steps > 0, "LRSchedule: steps = ", steps, ", must be > 0");
    switch (kind) {
      case Kind::linear_warmup:
        MIXPREC_CHECK(start_factor > 0.0 && start_factor <= 1.0, "LRSchedule: start_factor = ",
                      start_factor, ", must be in (0, 1]");
        break;
      case Kind::cosine:
        MIXPREC_CHECK(min_factor >= 0.0 && min_factor <= 1.0, "LRSchedule: min_factor = ",
                      min_factor, ", must be in [0, 1]");
        break;
      case Kind::step_decay:
        MIXPREC_CHECK(gamma > 0.0 && gamma <= 1.0, "LRSchedule: gamma = ", gamma,
                      ", must be in (0, 1] (a decay; gamma > 1 grows the lr without bound)");
        break;
      case Kind::constant:
        break;
    }
  }

  /// The factor at applied step k (k >= 0), in double as torch computes it.
  MIXPREC_HOST_DEVICE double factor(std::int64_t k) const {
    switch (kind) {
      case Kind::linear_warmup: {
        const double t = static_cast<double>(k < steps ? k : steps);
        return start_factor + (1.0 - start_factor) * t / static_cast<double>(steps);
      }
      case Kind::cosine:
        // The halving becomes a product that feeds the sum: kept apart.
        return min_factor + math::opaque((1.0 - min_factor) *
                                         (1.0 + ::cos(3.141592653589793 * static_cast<double>(k) /
                                                      static_cast<double>(steps))) /
                                         2.0);
      case Kind::step_decay:
        return ::pow(gamma, static_cast<double>(k / steps));
      case Kind::constant:
        break;
    }
    return 1.0;
  }
};

}  // namespace optim
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// RMSprop (alpha, centered, momentum, weight decay, maximize), as
// torch.optim.RMSprop, on fp32 masters.
#pragma once

#include <utility>
#include <string>
#include <vector>

#include "mixprec/optim/formulas.hpp"
#include "mixprec/optim/optimizer_base.hpp"

namespace mixprec::optim {

/// torch.optim.RMSprop's options and defaults.
struct RMSpropOptions {
  double lr = 1e-2;
  double alpha = 0.99;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double momentum = 0.0;
  bool centered = false;
  bool maximize = false;
};

/// RMSprop (formula: rmsprop_update). State per parameter: square_avg, plus
/// grad_avg when centered and the momentum buffer when momentum > 0.
class RMSprop : public OptimizerBase<RMSprop, RMSpropOptions> {
 public:
  explicit RMSprop(std::vector<Param> params, const RMSpropOptions& options = {}) {
    add_param_group(std::move(params), options);
  }
  const char* name() const override { return "RMSprop"; }
  std::vector<std::string> state_names() const override { return {"square_avg", "grad_avg", "momentum_buffer"}; }

  /// square_avg, without bias correction (centered RMSprop subtracts
  /// grad_avg^2 first: square_avg is then an upper bound of what eps meets).
  SecondMoment second_moment(std::size_t i) const override {
    const RMSpropOptions& o = options(group_of(i));
    return {existing_state(i, 0), static_cast<float>(o.eps), 0.0f};
  }

  /// A loaded square_avg is >= 0 (its sqrt divides).
  void check_state_values(std::size_t i, const ParamState& p) const override {
    if (!p.state.empty() && p.state[0]) {
      check_values(*p.state[0], "square_avg", param(i).name, [](float v) { return v >= 0.0f; }, ">= 0");
    }
  }

  static void validate(const RMSpropOptions& o) {
    detail::check_nonnegative("RMSprop", "lr", o.lr);
    MIXPREC_CHECK(o.alpha >= 0.0 && o.alpha <= 1.0, "RMSprop: alpha = ", o.alpha,
                  ", must be in [0, 1]");
    detail::check_float("RMSprop", "lr", o.lr);
    detail::check_eps("RMSprop", o.eps);
    detail::check_nonnegative("RMSprop", "weight_decay", o.weight_decay);
    detail::check_float("RMSprop", "weight_decay", o.weight_decay);
    detail::check_nonnegative("RMSprop", "momentum", o.momentum);
    detail::check_float("RMSprop", "momentum", o.momentum);
  }

 protected:
  void allocate_state(std::size_t i) override {
    const RMSpropOptions& o = options_[group_of(i)];
    state(i, 0);
    if (o.centered) state(i, 1);
    if (o.momentum > 0.0) state(i, 2);
  }

  void launch_groups(DevicePlan& plan, const DeviceStepInputs& in, stream_t stream) override {
    std::vector<RmspropHyper> groups;
    for (std::size_t g = 0; g < num_groups(); ++g) {
      const RMSpropOptions& o = options_[g];
      RmspropHyper h;
      h.lr = base_lr(g);  // the kernel applies the schedule on the device
      h.alpha = o.alpha;
      h.eps = o.eps;
      h.weight_decay = o.weight_decay;
      h.momentum = o.momentum;
      h.centered = o.centered;
      h.maximize = o.maximize;
      groups.push_back(h);
    }
    plan.step(groups, schedule(), in, stream);
  }

  void update_param(std::size_t i, const GradTransform& t) override {
    const RMSpropOptions& o = options_[group_of(i)];
    RmspropCoeffs c;
    c.weight_decay = static_cast<float>(o.weight_decay);
    c.alpha = static_cast<float>(o.alpha);
    c.one_minus_alpha = static_cast<float>(1.0 - o.alpha);
    c.eps = static_cast<float>(o.eps);
    c.momentum = static_cast<float>(o.momentum);
    c.neg_lr = static_cast<float>(-lr(group_of(i)));
    c.maximize = o.maximize;
    c.centered = o.centered;
    float* master = slots_[i].master.data();
    float* square_avg = state(i, 0);
    // Unused state stays unallocated: formula arguments it would feed are
    // never read when the option is off.
    float* grad_avg = c.centered ? state(i, 1) : nullptr;
    float* buf = c.momentum > 0.0f ? state(i, 2) : nullptr;
    if (grad_avg && buf) {
      update_elements<4>(i, t, {master, square_avg, grad_avg, buf},
                         [c](auto& p, auto& sq, auto& ga, auto& b, auto grad) {
                           rmsprop_update(p, sq, ga, b, grad, c);
                         });
    } else if (grad_avg) {
      update_elements<3>(i, t, {master, square_avg, grad_avg},
                         [c](auto& p, auto& sq, auto& ga, auto grad) {
                           auto unused = p;
                           rmsprop_update(p, sq, ga, unused, grad, c);
                         });
    } else if (buf) {
      update_elements<3>(i, t, {master, square_avg, buf},
                         [c](auto& p, auto& sq, auto& b, auto grad) {
                           auto unused = p;
                           rmsprop_update(p, sq, unused, b, grad, c);
                         });
    } else {
      update_elements<2>(i, t, {master, square_avg}, [c](auto& p, auto& sq, auto grad) {
        auto unused = p;
        auto unused2 = p;
        rmsprop_update(p, sq, unused, unused2, grad, c);
      });
    }
  }
};

}  // namespace mixprec::optim

// SPDX-License-Identifier: Apache-2.0
// SGD with momentum, dampening, Nesterov momentum, weight decay and maximize,
// as torch.optim.SGD, on fp32 masters.
#pragma once

#include <utility>
#include <string>
#include <vector>

#include "mixprec/optim/formulas.hpp"
#include "mixprec/optim/optimizer_base.hpp"

namespace mixprec::optim {

/// torch.optim.SGD's options and defaults.
struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
};

/// Stochastic gradient descent (formula: sgd_update in formulas.hpp). State:
/// the momentum buffer when momentum != 0, started as a copy of the first
/// gradient, as in PyTorch.
class SGD : public OptimizerBase<SGD, SGDOptions> {
 public:
  explicit SGD(std::vector<Param> params, const SGDOptions& options = {}) {
    add_param_group(std::move(params), options);
  }
  const char* name() const override { return "SGD"; }
  std::vector<std::string> state_names() const override { return {"momentum_buffer"}; }

  static void validate(const SGDOptions& o) {
    detail::check_nonnegative("SGD", "lr", o.lr);
    detail::check_float("SGD", "lr", o.lr);
    detail::check_nonnegative("SGD", "momentum", o.momentum);
    detail::check_float("SGD", "momentum", o.momentum);
    MIXPREC_CHECK(std::isfinite(o.dampening), "SGD: dampening = ", o.dampening, ", must be finite");
    detail::check_float("SGD", "1 - dampening", 1.0 - o.dampening);
    detail::check_nonnegative("SGD", "weight_decay", o.weight_decay);
    detail::check_float("SGD", "weight_decay", o.weight_decay);
    MIXPREC_CHECK(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0),
                  "SGD: nesterov = true needs momentum > 0 and dampening = 0 (momentum = ",
                  o.momentum, ", dampening = ", o.dampening, ")");
  }

 protected:
  void allocate_state(std::size_t i) override {
    if (options_[group_of(i)].momentum != 0.0) state(i, 0);
  }

  void launch_groups(DevicePlan& plan, const DeviceStepInputs& in, stream_t stream) override {
    std::vector<SgdHyper> groups;
    for (std::size_t g = 0; g < num_groups(); ++g) {
      const SGDOptions& o = options_[g];
      SgdHyper h;
      h.lr = base_lr(g);  // the kernel applies the schedule on the device
      h.momentum = o.momentum;
      h.dampening = o.dampening;
      h.weight_decay = o.weight_decay;
      h.nesterov = o.nesterov;
      h.maximize = o.maximize;
      // Momentum switched on since the last step: its buffers start from the gradient.
      h.fresh_buffers = o.momentum != 0.0 && fresh_state(first_of_group(g), 0);
      groups.push_back(h);
    }
    plan.step(groups, schedule(), in, stream);
  }

  void update_param(std::size_t i, const GradTransform& t) override {
    const SGDOptions& o = options_[group_of(i)];
    SgdCoeffs c;
    c.weight_decay = static_cast<float>(o.weight_decay);
    c.momentum = static_cast<float>(o.momentum);
    c.one_minus_dampening = static_cast<float>(1.0 - o.dampening);
    c.neg_lr = static_cast<float>(-lr(group_of(i)));
    c.maximize = o.maximize;
    c.nesterov = o.nesterov;
    float* master = slots_[i].master.data();
    if (c.momentum == 0.0f) {
      update_elements<1>(i, t, {master}, [c](auto& p, auto grad) {
        auto unused = p;
        sgd_update(p, unused, grad, c);
      });
      return;
    }
    // torch: the buffer starts as a copy of the gradient, at the first step
    // or when momentum was switched on since (the device kernel's rule).
    c.first_step = fresh_state(i, 0) || slots_[i].step == 1;
    float* buf = state(i, 0);
    update_elements<2>(i, t, {master, buf},
                       [c](auto& p, auto& b, auto grad) { sgd_update(p, b, grad, c); });
  }
};

}  // namespace mixprec::optim

// SPDX-License-Identifier: Apache-2.0
// Adam and AdamW (L2 or decoupled weight decay, amsgrad, maximize), as
// torch.optim.Adam and torch.optim.AdamW, on fp32 masters.
#pragma once

#include <array>
#include <cmath>
#include <utility>
#include <string>
#include <vector>

#include "mixprec/optim/formulas.hpp"
#include "mixprec/optim/optimizer_base.hpp"

namespace mixprec::optim {

/// torch.optim.Adam's options and defaults.
struct AdamOptions {
  double lr = 1e-3;
  std::array<double, 2> betas = {0.9, 0.999};
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool amsgrad = false;
  bool maximize = false;
};

/// torch.optim.AdamW's options: Adam's, with weight_decay defaulting to 1e-2.
struct AdamWOptions : AdamOptions {
  AdamWOptions() { weight_decay = 1e-2; }
};

namespace detail {

/// Adam (Decoupled = false: weight decay added to the gradient) and AdamW
/// (Decoupled = true: param *= 1 - lr * weight_decay). Formula: adam_update.
/// State per parameter: exp_avg, exp_avg_sq, and max_exp_avg_sq with amsgrad.
template <bool Decoupled, class Options>
class AdamImpl : public OptimizerBase<AdamImpl<Decoupled, Options>, Options> {
 public:
  explicit AdamImpl(std::vector<Param> params, const Options& options = {}) {
    this->add_param_group(std::move(params), options);
  }
  const char* name() const override { return Decoupled ? "AdamW" : "Adam"; }
  std::vector<std::string> state_names() const override { return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}; }
  /// exp_avg_sq (max_exp_avg_sq with amsgrad), bias-corrected with betas[1].
  SecondMoment second_moment(std::size_t i) const override {
    const Options& o = this->options(this->group_of(i));
    return {this->existing_state(i, o.amsgrad ? 2 : 1), static_cast<float>(o.eps), static_cast<float>(o.betas[1])};
  }

  /// A loaded second moment is >= 0 (its sqrt divides), and with amsgrad
  /// the running maximum is >= the moment.
  void check_state_values(std::size_t i, const ParamState& p) const override {
    const std::string& n = this->param(i).name;
    if (p.state.size() > 1 && p.state[1]) {
      this->check_values(*p.state[1], "exp_avg_sq", n, [](float v) { return v >= 0.0f; }, ">= 0");
    }
    if (p.state.size() > 2 && p.state[2]) {
      this->check_values(*p.state[2], "max_exp_avg_sq", n, [](float v) { return v >= 0.0f; }, ">= 0");
      if (p.state[1]) {
        const std::vector<float>& v = *p.state[1];
        const std::vector<float>& mx = *p.state[2];
        for (std::size_t k = 0; k < v.size(); ++k) {
          MIXPREC_CHECK(mx[k] >= v[k], this->name(), "::load_state: parameter \"", n, "\": max_exp_avg_sq[", k,
                        "] = ", mx[k], " < exp_avg_sq[", k, "] = ", v[k], "; the running maximum cannot be below it");
        }
      }
    }
  }

  static void validate(const Options& o) {
    const char* n = Decoupled ? "AdamW" : "Adam";
    check_nonnegative(n, "lr", o.lr);
    check_float(n, "lr", o.lr);
    check_unit_interval(n, "betas[0]", o.betas[0]);
    check_unit_interval(n, "betas[1]", o.betas[1]);
    check_eps(n, o.eps);
    check_nonnegative(n, "weight_decay", o.weight_decay);
    check_float(n, "weight_decay", o.weight_decay);
    // The largest coefficients any step can make (the schedule's factor is
    // <= 1): the first step's size, lr / (1 - betas[0]), and the decay.
    check_float(n, "lr / (1 - betas[0]) (the first step's size)", o.lr / (1.0 - o.betas[0]));
    check_float(n, "lr * weight_decay", o.lr * o.weight_decay);
  }

 protected:
  void allocate_state(std::size_t i) override {
    this->state(i, 0);
    this->state(i, 1);
    if (this->options_[this->group_of(i)].amsgrad) this->state(i, 2);
  }

  void launch_groups(DevicePlan& plan, const DeviceStepInputs& in, stream_t stream) override {
    std::vector<AdamHyper> groups;
    for (std::size_t g = 0; g < this->num_groups(); ++g) {
      const Options& o = this->options_[g];
      AdamHyper h;
      h.lr = this->base_lr(g);  // the kernel applies the schedule on the device
      h.beta1 = o.betas[0];
      h.beta2 = o.betas[1];
      h.eps = o.eps;
      h.weight_decay = o.weight_decay;
      h.amsgrad = o.amsgrad;
      h.maximize = o.maximize;
      h.decoupled = Decoupled;
      groups.push_back(h);
    }
    plan.step(groups, this->schedule(), in, stream);
  }

  void update_param(std::size_t i, const GradTransform& t) override {
    const Options& o = this->options_[this->group_of(i)];
    const double lr = this->lr(this->group_of(i));
    const double step = static_cast<double>(this->step_count(i));
    AdamCoeffs c;
    c.decoupled = Decoupled;
    c.weight_decay = static_cast<float>(o.weight_decay);
    c.decay = static_cast<float>(1.0 - lr * o.weight_decay);
    c.one_minus_beta1 = static_cast<float>(1.0 - o.betas[0]);
    c.beta2 = static_cast<float>(o.betas[1]);
    c.one_minus_beta2 = static_cast<float>(1.0 - o.betas[1]);
    c.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(o.betas[1], step)));
    c.eps = static_cast<float>(o.eps);
    c.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(o.betas[0], step))));
    c.maximize = o.maximize;
    c.amsgrad = o.amsgrad;
    float* master = this->slots_[i].master.data();
    float* exp_avg = this->state(i, 0);
    float* exp_avg_sq = this->state(i, 1);
    if (!c.amsgrad) {
      this->template update_elements<3>(i, t, {master, exp_avg, exp_avg_sq},
                                        [c](auto& p, auto& m1, auto& m2, auto grad) {
                                          auto unused = m2;
                                          adam_update(p, m1, m2, unused, grad, c);
                                        });
      return;
    }
    float* max_exp_avg_sq = this->state(i, 2);
    this->template update_elements<4>(
        i, t, {master, exp_avg, exp_avg_sq, max_exp_avg_sq},
        [c](auto& p, auto& m1, auto& m2, auto& mx, auto grad) { adam_update(p, m1, m2, mx, grad, c); });
  }
};

}  // namespace detail

/// torch.optim.Adam on fp32 masters.
using Adam = detail::AdamImpl<false, AdamOptions>;
/// torch.optim.AdamW on fp32 masters.
using AdamW = detail::AdamImpl<true, AdamWOptions>;

}  // namespace mixprec::optim

// SPDX-License-Identifier: Apache-2.0
// Adam and AdamW (L2 or decoupled weight decay, amsgrad, maximize), as
// torch.optim.Adam and torch.optim.AdamW (torch/optim/adam.py, adamw.py,
// _single_tensor_adam), on fp32 masters. The whole optimizer: options,
// kernel part and rules.
#pragma once

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/state_layout.hpp"
#include "mixprec/optim/formulas.hpp"

// The formula is instantiated with 8-float vectors for the AVX2 loop (see
// core/simd.hpp on -Wpsabi).
MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// torch.optim.Adam's options and defaults.
struct AdamOptions {
  double lr = 1e-3;
  std::array<double, 2> betas = {0.9, 0.999};
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool amsgrad = false;
  bool maximize = false;
  /// How this group keeps its state and master (optim/state_layout.hpp):
  /// fp32 by default; bf16 or 8-bit moments, remainder or no master.
  StateLayout layout;
};

/// torch.optim.AdamW's options: Adam's, with weight_decay defaulting to 1e-2.
struct AdamWOptions : AdamOptions {
  AdamWOptions() { weight_decay = 1e-2; }
};

struct AdamKernel;

/// One group's hyperparameters, as a device step launch bakes them in.
struct AdamHyper {
  using kernel = AdamKernel;
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool amsgrad = false, maximize = false, decoupled = false;
};

struct AdamCoeffs {
  float weight_decay = 0;           // Adam: grad.add(param, alpha=weight_decay)
  float decay = 1;                  // AdamW: param.mul_(1 - lr * weight_decay)
  float one_minus_beta1 = 0.1f;     // exp_avg.lerp_(grad, 1 - beta1)
  float beta2 = 0.999f;             // exp_avg_sq.mul_(beta2)
  float one_minus_beta2 = 0.001f;   // .addcmul_(grad, grad, value=1 - beta2)
  float bias_correction2_sqrt = 1;  // sqrt(1 - beta2^step)
  float eps = 1e-8f;
  float neg_step_size = 0;  // -lr / (1 - beta1^step)
  bool maximize = false;
  bool amsgrad = false;
  bool decoupled = false;  // AdamW
};

/// The device part of Adam and AdamW. State: 0 exp_avg, 1 exp_avg_sq,
/// 2 max_exp_avg_sq (amsgrad).
struct AdamKernel {
  using Hyper = AdamHyper;
  using Coeffs = AdamCoeffs;
  static constexpr const char* kKey = "adam";

  MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper& h, double lr, double step) {
    Coeffs c;
    c.decoupled = h.decoupled;
    c.weight_decay = static_cast<float>(h.weight_decay);
    c.decay = static_cast<float>(1.0 - math::mul(lr, h.weight_decay));
    c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
    c.beta2 = static_cast<float>(h.beta2);
    c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
    c.bias_correction2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(h.beta2, step)));
    c.eps = static_cast<float>(h.eps);
    c.neg_step_size = static_cast<float>(-(lr / (1.0 - ::pow(h.beta1, step))));
    c.maximize = h.maximize;
    c.amsgrad = h.amsgrad;
    return c;
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs& c, int k) { return k < 2 || c.amsgrad; }

  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq, V grad,
                                         const Coeffs& c) {
    if (c.maximize) grad = -grad;
    if (c.decoupled) {
      if (c.decay != 1.0f) param = math::mul(param, c.decay);  // feeds the sum below
    } else if (c.weight_decay != 0.0f) {
      grad = grad + math::mul(c.weight_decay, param);
    }
    exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
    exp_avg_sq = math::mul(exp_avg_sq, c.beta2) + math::mul(c.one_minus_beta2 * grad, grad);
    V second = exp_avg_sq;
    if (c.amsgrad) {
      max_exp_avg_sq = math::max(max_exp_avg_sq, exp_avg_sq);  // torch.maximum
      second = max_exp_avg_sq;
    }
    const V denom = math::sqrt(second) / c.bias_correction2_sqrt + c.eps;
    param = param + (c.neg_step_size * exp_avg) / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
};

namespace detail {

template <bool Decoupled, class O>
struct AdamRuleOf : RuleDefaults {
  using Options = O;
  using Kernel = AdamKernel;
  static const char* name() { return Decoupled ? "AdamW" : "Adam"; }
  static std::vector<std::string> state_names() { return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}; }
  static bool allocates(const Options& o, int k) { return k < 2 || (k == 2 && o.amsgrad); }
  static Kernel::Hyper hyper(const Options& o, double lr, unsigned) {
    Kernel::Hyper h;
    h.lr = lr;
    h.beta1 = o.betas[0];
    h.beta2 = o.betas[1];
    h.eps = o.eps;
    h.weight_decay = o.weight_decay;
    h.amsgrad = o.amsgrad;
    h.maximize = o.maximize;
    h.decoupled = Decoupled;
    return h;
  }
  /// exp_avg_sq (max_exp_avg_sq with amsgrad), bias-corrected with betas[1].
  static SecondMomentOf second_moment(const Options& o) { return {o.amsgrad ? 2 : 1, o.eps, o.betas[1]}; }
  /// A loaded second moment is >= 0 (its sqrt divides), and with amsgrad
  /// the running maximum is >= the moment.
  static std::vector<int> nonnegative_states() { return {1, 2}; }
  static std::vector<StateOrder> ordered_states() { return {{2, 1, "the running maximum cannot be below it"}}; }
  static void validate(const Options& o) {
    const char* n = name();
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
};

}  // namespace detail

using AdamRule = detail::AdamRuleOf<false, AdamOptions>;
using AdamWRule = detail::AdamRuleOf<true, AdamWOptions>;

/// torch.optim.Adam on fp32 masters.
using Adam = Family<AdamRule>;
/// torch.optim.AdamW on fp32 masters.
using AdamW = Family<AdamWRule>;

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

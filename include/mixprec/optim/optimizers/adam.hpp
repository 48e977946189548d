// SPDX-License-Identifier: Apache-2.0
// Adam and AdamW (L2 or decoupled weight decay, amsgrad, maximize), as
// torch.optim.Adam and torch.optim.AdamW (torch/optim/adam.py, adamw.py,
// _single_tensor_adam), on fp32 masters, with StableAdamW's update clipping
// as an option. The whole optimizer: options, kernel part and rules.
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
  /// StableAdamW's update clipping (Wortsman et al. 2023, "Stable and
  /// low-precision training for large-scale vision-language models",
  /// Algorithm 2): each step, per tensor, RMS = sqrt(mean(g^2 / max(v, eps^2)))
  /// and the step's lr becomes lr / max(1, RMS), in the step size and in
  /// AdamW's decay alike. Not in torch.optim; off by default, and then the
  /// step is torch's, bit for bit. It costs a pre-pass over the gradients,
  /// the moments and the masters (optim/family.hpp). Needs eps * eps > 0 as
  /// a float (eps >= about 3.7e-23).
  bool update_clipping = false;
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
  bool amsgrad = false, maximize = false, decoupled = false, update_clipping = false;
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
  float bias_correction2 = 1;  // update clipping: 1 - beta2^step
  float eps_squared = 1e-16f;  // update clipping: eps^2
  bool maximize = false;
  bool amsgrad = false;
  bool decoupled = false;  // AdamW
};

/// The device part of Adam and AdamW. State: 0 exp_avg, 1 exp_avg_sq,
/// 2 max_exp_avg_sq (amsgrad). With update_clipping, a pre-pass sum per
/// tensor (optim/family.hpp): sum(g^2 / max(v_hat, eps^2)).
struct AdamKernel {
  using Hyper = AdamHyper;
  using Coeffs = AdamCoeffs;
  static constexpr const char* kKey = "adam";
  static constexpr int kStates = 3;
  static constexpr int kSums = 1;

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
    c.bias_correction2 = static_cast<float>(1.0 - ::pow(h.beta2, step));
    c.eps_squared = static_cast<float>(math::mul(h.eps, h.eps));
    return c;
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs& c, int k) { return k < 2 || c.amsgrad; }

  MIXPREC_HOST_DEVICE static unsigned prepass(const Hyper& h) { return h.update_clipping ? kPrepassSums : 0u; }
  MIXPREC_HOST_DEVICE static void grad_norm(Coeffs&, const Hyper&, double) {}

  // The gradient the moments see: maximize's sign, Adam's L2 term.
  template <class V>
  MIXPREC_HOST_DEVICE static V moment_grad(const V& param, V grad, const Coeffs& c) {
    if (c.maximize) grad = -grad;
    if (!c.decoupled && c.weight_decay != 0.0f) grad = grad + math::mul(c.weight_decay, param);
    return grad;
  }
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  template <class V>
  MIXPREC_HOST_DEVICE static V next_exp_avg_sq(const V& exp_avg_sq, const V& grad, const Coeffs& c) {
    return math::mul(exp_avg_sq, c.beta2) + math::mul(c.one_minus_beta2 * grad, grad);
  }

  // Update clipping's term, g^2 / max(v_hat, eps^2), where v_hat is the
  // second moment this step divides by, bias-corrected: Algorithm 2's u_t,
  // which is the moment updated with this step's g (u_t = b2^ u_{t-1} +
  // (1 - b2^) g_t^2, its b2^ = b2 (1 - b2^(t-1)) / (1 - b2^t) making u_t the
  // bias-corrected average exp_avg_sq / (1 - b2^t)), read before the step
  // writes it. The authors' gist computes the same u. With amsgrad it is
  // the running maximum (what the update divides by; the paper has none);
  // with Adam's L2 decay, g includes the L2 term (what the moments see).
  template <class V>
  MIXPREC_HOST_DEVICE static void terms(const V& param, const V&, const V& exp_avg_sq, const V& max_exp_avg_sq,
                                        V grad, const Coeffs& c, V* out) {
    grad = moment_grad(param, grad, c);
    V second = next_exp_avg_sq(exp_avg_sq, grad, c);
    if (c.amsgrad) second = math::max(max_exp_avg_sq, second);
    const V v_hat = second / c.bias_correction2;
    out[0] = math::mul(grad, grad) / math::max(v_hat, splat<V>(c.eps_squared));
  }
  // RMS_t = sqrt(mean(terms)); eta_t = lr / max(1, RMS_t), the lr of the
  // step size and of AdamW's decay (Algorithm 2: theta -= eta_t lambda theta
  // + eta_t v / (sqrt(u) + eps)). RMS_t <= 1 leaves the coefficients as they
  // were: the bits of a step without clipping.
  MIXPREC_HOST_DEVICE static void finish(Coeffs& c, const Hyper& h, double lr, double step, const double* sums,
                                         std::int64_t numel) {
    if (numel <= 0) return;
    const double rms = ::sqrt(sums[0] / static_cast<double>(numel));
    if (rms > 1.0) c = coeffs(h, lr / rms, step);
  }

  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq, V grad,
                                         const Coeffs& c) {
    grad = moment_grad(param, grad, c);                                   // reads the param before AdamW's decay
    if (c.decoupled && c.decay != 1.0f) param = math::mul(param, c.decay);  // feeds the sum below
    exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
    exp_avg_sq = next_exp_avg_sq(exp_avg_sq, grad, c);
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
    h.update_clipping = o.update_clipping;
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
    // Update clipping divides by max(v_hat, eps^2): eps^2 must stay > 0 as
    // a float (a zero gradient with a zero moment would give 0 / 0).
    MIXPREC_CHECK(!o.update_clipping || static_cast<float>(o.eps * o.eps) > 0.0f, n, ": eps = ", o.eps,
                  " with update_clipping: eps * eps = ", o.eps * o.eps,
                  " rounds to 0 as a float; update clipping needs eps >= 3.8e-23");
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

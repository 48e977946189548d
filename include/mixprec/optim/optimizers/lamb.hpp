// SPDX-License-Identifier: Apache-2.0
// LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning:
// Training BERT in 76 minutes") with the semantics of NVIDIA Apex's
// FusedLAMB (apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu): an
// Adam direction per element, scaled per tensor by the trust ratio
// ||w|| / ||u||, after a clamp of the global gradient norm. On fp32 masters;
// the norms come from the family's pre-pass (optim/family.hpp). The whole
// optimizer: options, kernel part and rule.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/family.hpp"

// The formula is instantiated with 4- and 8-float vectors for the CPU loops
// (see core/simd.hpp on -Wpsabi).
MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// apex.optimizers.FusedLAMB's options, names and defaults (amsgrad, which
/// FusedLAMB refuses, is left out). Differences from Apex: max_grad_norm
/// belongs to each group (Apex reads the constructor's for every group;
/// the norm is over every parameter of the optimizer in both), and
/// max_grad_norm = 0 turns the clamp off (in Apex it divides every gradient
/// by infinity).
struct LambOptions {
  double lr = 1e-3;
  /// Divide the moments by 1 - beta^step (Adam's bias correction).
  bool bias_correction = true;
  std::array<double, 2> betas = {0.9, 0.999};
  double eps = 1e-6;
  double weight_decay = 0.01;
  /// Decoupled weight decay, added to the direction (true, Apex's default)
  /// or an L2 term added to the gradient before the moments (false).
  bool adam_w_mode = true;
  /// exp_avg gathers (1 - beta1) * g (true) or g (false).
  bool grad_averaging = true;
  /// Clamp of the global gradient norm: when ||g|| (every parameter's
  /// gradient as the update sees it: unscaled, after the scaler's own
  /// clipping) exceeds it, every gradient is divided by ||g|| / max_grad_norm.
  /// 0: no clamp.
  double max_grad_norm = 1.0;
  /// Apply the trust ratio to groups with weight_decay 0 as well (NVLAMB);
  /// by default those take the plain lr, as in Apex.
  bool use_nvlamb = false;
  /// How this group keeps its state and master (optim/state_layout.hpp):
  /// fp32 by default; bf16 or 8-bit moments, remainder or no master.
  StateLayout layout;
};

struct LambKernel;

/// One group's hyperparameters, as a device step launch bakes them in
/// (eps and max_grad_norm as the floats the kernel uses: 64 groups fit a
/// kernel's arguments).
struct LambHyper {
  using kernel = LambKernel;
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, weight_decay = 0.01;
  float eps = 1e-6f, max_grad_norm = 1.0f;
  bool bias_correction = true, grad_averaging = true, adam_w_mode = true, use_nvlamb = false;
};

struct LambCoeffs {
  float grad_divisor = 1;        // g / (||g|| / max_grad_norm) when ||g|| > max_grad_norm
  float beta1 = 0.9f;            // m = beta1 * m + beta3 * g
  float beta3 = 0.1f;            // 1 - beta1 (grad_averaging) or 1
  float beta2 = 0.999f;          // v = beta2 * v + (1 - beta2) * g * g
  float one_minus_beta2 = 0.001f;
  float bias_correction1 = 1;    // 1 - beta1^step (bias_correction) or 1
  float bias_correction2 = 1;
  float eps = 1e-6f;
  float decay = 0;               // weight_decay
  float neg_ratio = 0;           // -lr * trust ratio
  bool adam_w_mode = true;
};

/// The device part. State: 0 exp_avg, 1 exp_avg_sq. Pre-pass sums per
/// tensor: ||w||^2 (the master before the step) and ||u||^2 (the direction
/// below).
struct LambKernel {
  using Hyper = LambHyper;
  using Coeffs = LambCoeffs;
  static constexpr const char* kKey = "lamb";
  static constexpr int kStates = 2;
  static constexpr int kSums = 2;

  MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper& h, double lr, double step) {
    Coeffs c;
    c.beta1 = static_cast<float>(h.beta1);
    c.beta3 = h.grad_averaging ? static_cast<float>(1.0 - h.beta1) : 1.0f;
    c.beta2 = static_cast<float>(h.beta2);
    c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
    c.bias_correction1 = h.bias_correction ? static_cast<float>(1.0 - ::pow(h.beta1, step)) : 1.0f;
    c.bias_correction2 = h.bias_correction ? static_cast<float>(1.0 - ::pow(h.beta2, step)) : 1.0f;
    c.eps = h.eps;
    c.decay = static_cast<float>(h.weight_decay);
    c.neg_ratio = static_cast<float>(-lr);  // the trust ratio, where it applies, comes in finish()
    c.adam_w_mode = h.adam_w_mode;
    return c;
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs&, int k) { return k < 2; }

  // Apex applies the trust ratio where use_nvlamb or weight_decay != 0;
  // the gradient clamp where max_grad_norm is set.
  MIXPREC_HOST_DEVICE static bool trusts(const Hyper& h) { return h.use_nvlamb || h.weight_decay != 0.0; }
  MIXPREC_HOST_DEVICE static unsigned prepass(const Hyper& h) {
    return (trusts(h) ? kPrepassSums : 0u) | (h.max_grad_norm > 0.0f ? kPrepassGradNorm : 0u);
  }
  // Apex: clipped = norm > max_grad_norm ? norm / max_grad_norm : 1, and
  // the gradients are divided by it (the norm in double here, then float).
  MIXPREC_HOST_DEVICE static void grad_norm(Coeffs& c, const Hyper& h, double sum_squares) {
    if (!(h.max_grad_norm > 0.0f)) return;
    const double norm = ::sqrt(sum_squares);
    const double max_norm = static_cast<double>(h.max_grad_norm);
    c.grad_divisor = norm > max_norm ? static_cast<float>(norm / max_norm) : 1.0f;
  }

  // Apex's stage 1 for one element: the moments (written back through m
  // and v) and the direction u = m_hat / (sqrt(v_hat) + eps) (+ decay * w
  // in adam_w_mode; in L2 mode decay * w joins the gradient instead).
  template <class V>
  MIXPREC_HOST_DEVICE static V direction(const V& param, V& exp_avg, V& exp_avg_sq, V grad, const Coeffs& c) {
    if (c.grad_divisor != 1.0f) grad = grad / c.grad_divisor;
    if (!c.adam_w_mode && c.decay != 0.0f) grad = grad + math::mul(c.decay, param);
    exp_avg = math::mul(exp_avg, c.beta1) + math::mul(c.beta3, grad);
    exp_avg_sq = math::mul(exp_avg_sq, c.beta2) + math::mul(math::mul(c.one_minus_beta2, grad), grad);
    const V m_hat = exp_avg / c.bias_correction1;
    const V v_hat = exp_avg_sq / c.bias_correction2;
    V u = m_hat / (math::sqrt(v_hat) + c.eps);
    if (c.adam_w_mode && c.decay != 0.0f) u = u + math::mul(c.decay, param);
    return u;
  }

  template <class V>
  MIXPREC_HOST_DEVICE static void terms(const V& param, const V& s0, const V& s1, const V&, V grad, const Coeffs& c,
                                        V* out) {
    V m = s0, v = s1;
    const V u = direction(param, m, v, grad, c);
    out[0] = math::mul(param, param);
    out[1] = math::mul(u, u);
  }

  // Apex's stage 2: ratio = lr * (||w|| / ||u||) when both norms are
  // nonzero, else lr (no clamp of the ratio: the paper's phi is the
  // identity there). In double, rounded to float once.
  MIXPREC_HOST_DEVICE static void finish(Coeffs& c, const Hyper& h, double lr, double, const double* sums,
                                         std::int64_t) {
    if (!trusts(h)) return;
    const double w = ::sqrt(sums[0]), u = ::sqrt(sums[1]);
    c.neg_ratio = static_cast<float>(-(w != 0.0 && u != 0.0 ? lr * (w / u) : lr));
  }

  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& exp_avg, V& exp_avg_sq, V&, V grad, const Coeffs& c) {
    const V u = direction(param, exp_avg, exp_avg_sq, grad, c);
    param = param + math::mul(c.neg_ratio, u);  // p - ratio * u
  }
};

struct LambRule : RuleDefaults {
  using Options = LambOptions;
  using Kernel = LambKernel;
  static const char* name() { return "LAMB"; }
  static std::vector<std::string> state_names() { return {"exp_avg", "exp_avg_sq"}; }
  static bool allocates(const Options&, int k) { return k < 2; }
  static Kernel::Hyper hyper(const Options& o, double lr, unsigned) {
    Kernel::Hyper h;
    h.lr = lr;
    h.beta1 = o.betas[0];
    h.beta2 = o.betas[1];
    h.eps = static_cast<float>(o.eps);
    h.weight_decay = o.weight_decay;
    h.max_grad_norm = static_cast<float>(o.max_grad_norm);
    h.bias_correction = o.bias_correction;
    h.grad_averaging = o.grad_averaging;
    h.adam_w_mode = o.adam_w_mode;
    h.use_nvlamb = o.use_nvlamb;
    return h;
  }
  /// exp_avg_sq, bias-corrected with betas[1] where bias_correction is on.
  static SecondMomentOf second_moment(const Options& o) {
    return {1, o.eps, o.bias_correction ? o.betas[1] : 0.0};
  }
  static std::vector<int> nonnegative_states() { return {1}; }
  static void validate(const Options& o) {
    const char* n = name();
    detail::check_nonnegative(n, "lr", o.lr);
    detail::check_float(n, "lr", o.lr);
    detail::check_unit_interval(n, "betas[0]", o.betas[0]);
    detail::check_unit_interval(n, "betas[1]", o.betas[1]);
    detail::check_eps(n, o.eps);
    detail::check_nonnegative(n, "weight_decay", o.weight_decay);
    detail::check_float(n, "weight_decay", o.weight_decay);
    detail::check_nonnegative(n, "max_grad_norm", o.max_grad_norm);
    detail::check_float(n, "max_grad_norm", o.max_grad_norm);
    MIXPREC_CHECK(o.max_grad_norm == 0.0 || static_cast<float>(o.max_grad_norm) > 0.0f, n, ": max_grad_norm = ",
                  o.max_grad_norm, ", must be 0 (no clamp) or > 0 as a float");
  }
};

/// LAMB on fp32 masters, as apex.optimizers.FusedLAMB. State: exp_avg,
/// exp_avg_sq (zeros at the start).
using LAMB = Family<LambRule>;

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

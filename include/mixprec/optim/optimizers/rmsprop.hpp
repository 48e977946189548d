// SPDX-License-Identifier: Apache-2.0
// RMSprop (alpha, centered, momentum, weight decay, maximize), as
// torch.optim.RMSprop (torch/optim/rmsprop.py, _single_tensor_rmsprop), on
// fp32 masters. The whole optimizer: options, kernel part and rule.
#pragma once

#include <string>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/formulas.hpp"

// The formula is instantiated with 8-float vectors for the AVX2 loop (see
// core/simd.hpp on -Wpsabi).
MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// torch.optim.RMSprop's options and defaults.
struct RMSpropOptions {
  double lr = 1e-2;
  double alpha = 0.99;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double momentum = 0.0;
  bool centered = false;
  bool maximize = false;
  /// How this group keeps its state and master (optim/state_layout.hpp):
  /// fp32 by default; bf16 or 8-bit moments, remainder or no master.
  StateLayout layout;
};

struct RmspropKernel;

/// One group's hyperparameters, as a device step launch bakes them in.
struct RmspropHyper {
  using kernel = RmspropKernel;
  double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0;
  bool centered = false, maximize = false;
};

struct RmspropCoeffs {
  float weight_decay = 0;         // grad.add(param, alpha=weight_decay)
  float alpha = 0.99f;            // square_avg.mul_(alpha)
  float one_minus_alpha = 0.01f;  // .addcmul_(grad, grad, value=1 - alpha); grad_avg.lerp_
  float eps = 1e-8f;              // avg.add_(eps)
  float momentum = 0;             // buf.mul_(momentum).addcdiv_(grad, avg)
  float neg_lr = 0;
  bool maximize = false;
  bool centered = false;
};

/// The device part. State: 0 square_avg, 1 grad_avg (centered),
/// 2 momentum_buffer (momentum > 0).
struct RmspropKernel {
  using Hyper = RmspropHyper;
  using Coeffs = RmspropCoeffs;
  static constexpr const char* kKey = "rmsprop";
  static constexpr int kStates = 3;

  MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper& h, double lr, double) {
    Coeffs c;
    c.weight_decay = static_cast<float>(h.weight_decay);
    c.alpha = static_cast<float>(h.alpha);
    c.one_minus_alpha = static_cast<float>(1.0 - h.alpha);
    c.eps = static_cast<float>(h.eps);
    c.momentum = static_cast<float>(h.momentum);
    c.neg_lr = static_cast<float>(-lr);
    c.maximize = h.maximize;
    c.centered = h.centered;
    return c;
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs& c, int k) {
    return k == 0 || (k == 1 && c.centered) || (k == 2 && c.momentum > 0.0f);
  }

  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& square_avg, V& grad_avg, V& buf, V grad, const Coeffs& c) {
    if (c.maximize) grad = -grad;
    if (c.weight_decay != 0.0f) grad = grad + math::mul(c.weight_decay, param);
    square_avg = math::mul(square_avg, c.alpha) + math::mul(c.one_minus_alpha * grad, grad);
    V avg;
    if (c.centered) {
      grad_avg = lerp(grad_avg, grad, c.one_minus_alpha);
      avg = math::sqrt(square_avg - math::mul(grad_avg, grad_avg));  // square_avg.addcmul(ga, ga, value=-1).sqrt_()
    } else {
      avg = math::sqrt(square_avg);
    }
    avg = avg + c.eps;
    if (c.momentum > 0.0f) {
      buf = math::mul(buf, c.momentum) + grad / avg;
      param = param + math::mul(c.neg_lr, buf);  // param.add_(buf, alpha=-lr)
    } else {
      param = param + (c.neg_lr * grad) / avg;  // param.addcdiv_(grad, avg, value=-lr)
    }
  }
};

struct RmspropRule : RuleDefaults {
  using Options = RMSpropOptions;
  using Kernel = RmspropKernel;
  static const char* name() { return "RMSprop"; }
  static std::vector<std::string> state_names() { return {"square_avg", "grad_avg", "momentum_buffer"}; }
  static bool allocates(const Options& o, int k) {
    return k == 0 || (k == 1 && o.centered) || (k == 2 && o.momentum > 0.0);
  }
  static Kernel::Hyper hyper(const Options& o, double lr, unsigned) {
    Kernel::Hyper h;
    h.lr = lr;
    h.alpha = o.alpha;
    h.eps = o.eps;
    h.weight_decay = o.weight_decay;
    h.momentum = o.momentum;
    h.centered = o.centered;
    h.maximize = o.maximize;
    return h;
  }
  /// square_avg, without bias correction (centered RMSprop subtracts
  /// grad_avg^2 first: square_avg is then an upper bound of what eps meets).
  static SecondMomentOf second_moment(const Options& o) { return {0, o.eps, 0.0}; }
  /// A loaded square_avg is >= 0 (its sqrt divides).
  static std::vector<int> nonnegative_states() { return {0}; }
  static void validate(const Options& o) {
    detail::check_nonnegative("RMSprop", "lr", o.lr);
    MIXPREC_CHECK(o.alpha >= 0.0 && o.alpha <= 1.0, "RMSprop: alpha = ", o.alpha, ", must be in [0, 1]");
    detail::check_float("RMSprop", "lr", o.lr);
    detail::check_eps("RMSprop", o.eps);
    detail::check_nonnegative("RMSprop", "weight_decay", o.weight_decay);
    detail::check_float("RMSprop", "weight_decay", o.weight_decay);
    detail::check_nonnegative("RMSprop", "momentum", o.momentum);
    detail::check_float("RMSprop", "momentum", o.momentum);
  }
};

/// torch.optim.RMSprop on fp32 masters.
using RMSprop = Family<RmspropRule>;

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

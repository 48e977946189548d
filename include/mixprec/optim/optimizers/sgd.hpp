// SPDX-License-Identifier: Apache-2.0
// SGD with momentum, dampening, Nesterov momentum, weight decay and maximize,
// as torch.optim.SGD (torch/optim/sgd.py, _single_tensor_sgd), on fp32
// masters. The whole optimizer: options, kernel part and rule.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/formulas.hpp"

// The formula is instantiated with 8-float vectors for the AVX2 loop (see
// core/simd.hpp on -Wpsabi).
MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// torch.optim.SGD's options and defaults.
struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
  /// How this group keeps its state and master (optim/state_layout.hpp):
  /// fp32 by default; bf16 or 8-bit moments, remainder or no master.
  StateLayout layout;
};

struct SgdKernel;

/// One group's hyperparameters, as a device step launch bakes them in.
struct SgdHyper {
  using kernel = SgdKernel;
  double lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false;
  /// The momentum buffers were created for this step although the step
  /// counts are past 1 (momentum switched on later): they start as a copy
  /// of the gradient, as in torch. Steps 1 do that by themselves.
  bool fresh_buffers = false;
};

struct SgdCoeffs {
  float weight_decay = 0;         // grad.add(param, alpha=weight_decay)
  float momentum = 0;             // buf.mul_(momentum)
  float one_minus_dampening = 1;  // .add_(grad, alpha=1 - dampening)
  float neg_lr = 0;               // param.add_(grad, alpha=-lr)
  bool maximize = false;
  bool nesterov = false;
  bool first_step = false;  // the momentum buffer starts as a copy of the gradient
};

/// The device part. State: 0 momentum_buffer (when momentum != 0).
struct SgdKernel {
  using Hyper = SgdHyper;
  using Coeffs = SgdCoeffs;
  static constexpr const char* kKey = "sgd";
  static constexpr int kStates = 1;

  MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper& h, double lr, double step) {
    Coeffs c;
    c.weight_decay = static_cast<float>(h.weight_decay);
    c.momentum = static_cast<float>(h.momentum);
    c.one_minus_dampening = static_cast<float>(1.0 - h.dampening);
    c.neg_lr = static_cast<float>(-lr);
    c.maximize = h.maximize;
    c.nesterov = h.nesterov;
    c.first_step = step == 1.0 || h.fresh_buffers;
    return c;
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs& c, int k) { return k == 0 && c.momentum != 0.0f; }

  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& buf, V&, V&, V grad, const Coeffs& c) {
    if (c.maximize) grad = -grad;
    if (c.weight_decay != 0.0f) grad = grad + math::mul(c.weight_decay, param);
    if (c.momentum != 0.0f) {
      buf = c.first_step ? grad : math::mul(buf, c.momentum) + math::mul(c.one_minus_dampening, grad);
      grad = c.nesterov ? grad + math::mul(c.momentum, buf) : buf;
    }
    param = param + math::mul(c.neg_lr, grad);
  }
};

struct SgdRule : RuleDefaults {
  using Options = SGDOptions;
  using Kernel = SgdKernel;
  static const char* name() { return "SGD"; }
  static std::vector<std::string> state_names() { return {"momentum_buffer"}; }
  static bool allocates(const Options& o, int k) { return k == 0 && o.momentum != 0.0; }
  static Kernel::Hyper hyper(const Options& o, double lr, unsigned fresh) {
    Kernel::Hyper h;
    h.lr = lr;
    h.momentum = o.momentum;
    h.dampening = o.dampening;
    h.weight_decay = o.weight_decay;
    h.nesterov = o.nesterov;
    h.maximize = o.maximize;
    // Momentum switched on since the last step: its buffers start from the gradient.
    h.fresh_buffers = o.momentum != 0.0 && (fresh & 1u) != 0;
    return h;
  }
  static void validate(const Options& o) {
    detail::check_nonnegative("SGD", "lr", o.lr);
    detail::check_float("SGD", "lr", o.lr);
    detail::check_nonnegative("SGD", "momentum", o.momentum);
    detail::check_float("SGD", "momentum", o.momentum);
    MIXPREC_CHECK(std::isfinite(o.dampening), "SGD: dampening = ", o.dampening, ", must be finite");
    detail::check_float("SGD", "1 - dampening", 1.0 - o.dampening);
    detail::check_nonnegative("SGD", "weight_decay", o.weight_decay);
    detail::check_float("SGD", "weight_decay", o.weight_decay);
    MIXPREC_CHECK(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0),
                  "SGD: nesterov = true needs momentum > 0 and dampening = 0 (momentum = ", o.momentum,
                  ", dampening = ", o.dampening, ")");
  }
};

/// Stochastic gradient descent, as torch.optim.SGD. State: the momentum
/// buffer when momentum != 0, started as a copy of the first gradient.
using SGD = Family<SgdRule>;

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

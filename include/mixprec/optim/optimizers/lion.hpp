// SPDX-License-Identifier: Apache-2.0
// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
// Algorithm 2): the sign of an interpolation of the momentum and the
// gradient, with decoupled weight decay, on fp32 masters. The whole
// optimizer: options, kernel part and rule.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/family.hpp"

// The formula is instantiated with 8-float vectors for the AVX2 loop (see
// core/simd.hpp on -Wpsabi).
MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// Lion's options. lr and betas default to the paper's (lr 1e-4, betas
/// (0.9, 0.99)); weight_decay to 0 as in the authors' reference code (the
/// paper advises an lr 3-10x smaller and a weight decay 3-10x larger than
/// AdamW's). There is no torch.optim.Lion: the names follow torch's Adam.
struct LionOptions {
  double lr = 1e-4;
  std::array<double, 2> betas = {0.9, 0.99};
  double weight_decay = 0.0;
  bool maximize = false;
  /// How this group keeps its state and master (optim/state_layout.hpp):
  /// fp32 by default; bf16 or 8-bit moments, remainder or no master.
  StateLayout layout;
};

struct LionKernel;

/// One group's hyperparameters, as a device step launch bakes them in.
struct LionHyper {
  using kernel = LionKernel;
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.99, weight_decay = 0;
  bool maximize = false;
};

struct LionCoeffs {
  float decay = 1;              // param *= 1 - lr * weight_decay
  float beta1 = 0.9f;           // c = beta1 * m + (1 - beta1) * g
  float one_minus_beta1 = 0.1f;
  float beta2 = 0.99f;          // m = beta2 * m + (1 - beta2) * g
  float one_minus_beta2 = 0.01f;
  float neg_lr = 0;             // param += -lr * sign(c)
  bool maximize = false;
};

/// The device part. State: 0 exp_avg (the momentum m).
struct LionKernel {
  using Hyper = LionHyper;
  using Coeffs = LionCoeffs;
  static constexpr const char* kKey = "lion";
  static constexpr int kStates = 1;

  MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper& h, double lr, double) {
    Coeffs c;
    c.decay = static_cast<float>(1.0 - math::mul(lr, h.weight_decay));
    c.beta1 = static_cast<float>(h.beta1);
    c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
    c.beta2 = static_cast<float>(h.beta2);
    c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
    c.neg_lr = static_cast<float>(-lr);
    c.maximize = h.maximize;
    return c;
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs&, int k) { return k == 0; }

  // Algorithm 2, in this order: the update direction from the momentum
  // before this step, the decay and the signed step, then the momentum.
  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& exp_avg, V&, V&, V grad, const Coeffs& c) {
    if (c.maximize) grad = -grad;
    const V direction = math::sign(math::mul(exp_avg, c.beta1) + math::mul(c.one_minus_beta1, grad));
    if (c.decay != 1.0f) param = math::mul(param, c.decay);  // feeds the sum below
    param = param + math::mul(c.neg_lr, direction);
    exp_avg = math::mul(exp_avg, c.beta2) + math::mul(c.one_minus_beta2, grad);
  }
};

struct LionRule : RuleDefaults {
  using Options = LionOptions;
  using Kernel = LionKernel;
  static const char* name() { return "Lion"; }
  static std::vector<std::string> state_names() { return {"exp_avg"}; }
  static bool allocates(const Options&, int k) { return k == 0; }
  static Kernel::Hyper hyper(const Options& o, double lr, unsigned) {
    Kernel::Hyper h;
    h.lr = lr;
    h.beta1 = o.betas[0];
    h.beta2 = o.betas[1];
    h.weight_decay = o.weight_decay;
    h.maximize = o.maximize;
    return h;
  }
  static void validate(const Options& o) {
    detail::check_nonnegative("Lion", "lr", o.lr);
    detail::check_float("Lion", "lr", o.lr);
    MIXPREC_CHECK(o.betas[0] >= 0.0 && o.betas[0] <= 1.0, "Lion: betas[0] = ", o.betas[0], ", must be in [0, 1]");
    MIXPREC_CHECK(o.betas[1] >= 0.0 && o.betas[1] <= 1.0, "Lion: betas[1] = ", o.betas[1], ", must be in [0, 1]");
    detail::check_nonnegative("Lion", "weight_decay", o.weight_decay);
    detail::check_float("Lion", "weight_decay", o.weight_decay);
    detail::check_float("Lion", "lr * weight_decay", o.lr * o.weight_decay);
  }
};

/// Lion on fp32 masters. State: exp_avg (zeros at the start).
using Lion = Family<LionRule>;

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

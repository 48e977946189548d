// SPDX-License-Identifier: Apache-2.0
// A user's own optimizer, defined outside mixprec as one rule of the
// optimizer family (optim/family.hpp): torch.optim.Adagrad (lr_decay,
// weight_decay, eps; initial_accumulator_value 0), as docs/optimizers.md
// shows it. Used by optim_family_test (CPU) and optim_family_gpu_test.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"

MIXPREC_PSABI_PUSH  // the CPU step instantiates update() with 8-float vectors
namespace user {

struct AdagradOptions {
  double lr = 1e-2, lr_decay = 0, weight_decay = 0, eps = 1e-10;
};
struct AdagradKernel;
struct AdagradHyper {
  using kernel = AdagradKernel;
  double lr = 1e-2, lr_decay = 0, weight_decay = 0, eps = 1e-10;
};
struct AdagradCoeffs {
  float neg_clr = 0, weight_decay = 0, eps = 0;
};
struct AdagradKernel {
  using Hyper = AdagradHyper;
  using Coeffs = AdagradCoeffs;
  static constexpr const char* kKey = "user.adagrad";
  MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper& h, double lr, double step) {
    // clr = lr / (1 + (step - 1) * lr_decay)
    return {static_cast<float>(-(lr / (1.0 + mixprec::math::mul(step - 1.0, h.lr_decay)))), static_cast<float>(h.weight_decay),
            static_cast<float>(h.eps)};
  }
  MIXPREC_HOST_DEVICE static bool uses(const Coeffs&, int k) { return k == 0; }
  template <class V>
  MIXPREC_HOST_DEVICE static void update(V& param, V& sum, V&, V&, V grad, const Coeffs& c) {
    if (c.weight_decay != 0.0f) grad = grad + mixprec::math::mul(c.weight_decay, param);
    sum = sum + mixprec::math::mul(grad, grad);                                                   // state_sum.addcmul_(grad, grad, value=1)
    param = param + (c.neg_clr * grad) / (mixprec::math::sqrt(sum) + c.eps);  // addcdiv_(grad, std, value=-clr)
  }
};
struct AdagradRule : mixprec::optim::RuleDefaults {
  using Options = AdagradOptions;
  using Kernel = AdagradKernel;
  static const char* name() { return "Adagrad"; }
  static std::vector<std::string> state_names() { return {"sum"}; }
  static bool allocates(const Options&, int k) { return k == 0; }
  static AdagradHyper hyper(const Options& o, double lr, unsigned) { return {lr, o.lr_decay, o.weight_decay, o.eps}; }
  static std::vector<int> nonnegative_states() { return {0}; }
  static void validate(const Options& o) {
    MIXPREC_CHECK(o.lr >= 0 && std::isfinite(o.lr), "Adagrad: lr = ", o.lr, ", must be finite and >= 0");
    MIXPREC_CHECK(o.eps > 0 && static_cast<float>(o.eps) > 0.0f, "Adagrad: eps = ", o.eps, ", must be > 0");
    MIXPREC_CHECK(o.lr_decay >= 0, "Adagrad: lr_decay = ", o.lr_decay, ", must be >= 0");
    MIXPREC_CHECK(o.weight_decay >= 0, "Adagrad: weight_decay = ", o.weight_decay, ", must be >= 0");
  }
};
using Adagrad = mixprec::optim::Family<AdagradRule>;

}  // namespace user
MIXPREC_PSABI_POP

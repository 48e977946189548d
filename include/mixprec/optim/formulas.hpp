// SPDX-License-Identifier: Apache-2.0
// The update formulas of SGD, Adam/AdamW and RMSprop, each written once for
// one element. V is float (device kernels, scalar tails) or simd::f32x4 (the
// CPU loops): the same operations in the same order either way. Coefficients
// that depend only on hyperparameters and the step are computed once per
// tensor on the host, in double as Python computes them, then rounded to
// float, which is what torch.optim does with its Python-float arguments.
//
// Sources: torch/optim/sgd.py, adam.py, adamw.py, rmsprop.py
// (_single_tensor_* functions, PyTorch 2.x). Each line below names the
// tensor operation it reproduces.
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/simd.hpp"

MIXPREC_PSABI_PUSH
namespace mixprec::optim {

/// torch.lerp with a scalar weight: PyTorch switches form at 0.5 to keep the
/// result exact at both ends.
template <class V>
MIXPREC_HOST_DEVICE inline V lerp(V self, V end, float weight) {
  return weight < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

struct SgdCoeffs {
  float weight_decay = 0;         // grad.add(param, alpha=weight_decay)
  float momentum = 0;             // buf.mul_(momentum)
  float one_minus_dampening = 1;  // .add_(grad, alpha=1 - dampening)
  float neg_lr = 0;               // param.add_(grad, alpha=-lr)
  bool maximize = false;
  bool nesterov = false;
  bool first_step = false;  // the momentum buffer starts as a copy of the gradient
};

template <class V>
MIXPREC_HOST_DEVICE inline void sgd_update(V& param, V& buf, V grad, const SgdCoeffs& c) {
  if (c.maximize) grad = -grad;
  if (c.weight_decay != 0.0f) grad = grad + c.weight_decay * param;
  if (c.momentum != 0.0f) {
    buf = c.first_step ? grad : buf * c.momentum + c.one_minus_dampening * grad;
    grad = c.nesterov ? grad + c.momentum * buf : buf;
  }
  param = param + c.neg_lr * grad;
}

struct AdamCoeffs {
  float weight_decay = 0;       // Adam: grad.add(param, alpha=weight_decay)
  float decay = 1;              // AdamW: param.mul_(1 - lr * weight_decay)
  float one_minus_beta1 = 0.1f;  // exp_avg.lerp_(grad, 1 - beta1)
  float beta2 = 0.999f;          // exp_avg_sq.mul_(beta2)
  float one_minus_beta2 = 0.001f;  // .addcmul_(grad, grad, value=1 - beta2)
  float bias_correction2_sqrt = 1;  // sqrt(1 - beta2^step)
  float eps = 1e-8f;
  float neg_step_size = 0;  // -lr / (1 - beta1^step)
  bool maximize = false;
  bool amsgrad = false;
  bool decoupled = false;  // AdamW
};

template <class V>
MIXPREC_HOST_DEVICE inline void adam_update(V& param, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq,
                                            V grad, const AdamCoeffs& c) {
  if (c.maximize) grad = -grad;
  if (c.decoupled) {
    if (c.decay != 1.0f) param = param * c.decay;
  } else if (c.weight_decay != 0.0f) {
    grad = grad + c.weight_decay * param;
  }
  exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * c.beta2 + (c.one_minus_beta2 * grad) * grad;
  V second = exp_avg_sq;
  if (c.amsgrad) {
    max_exp_avg_sq = math::max(max_exp_avg_sq, exp_avg_sq);  // torch.maximum
    second = max_exp_avg_sq;
  }
  const V denom = math::sqrt(second) / c.bias_correction2_sqrt + c.eps;
  param = param + (c.neg_step_size * exp_avg) / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
}

struct RmspropCoeffs {
  float weight_decay = 0;       // grad.add(param, alpha=weight_decay)
  float alpha = 0.99f;          // square_avg.mul_(alpha)
  float one_minus_alpha = 0.01f;  // .addcmul_(grad, grad, value=1 - alpha); grad_avg.lerp_
  float eps = 1e-8f;            // avg.add_(eps)
  float momentum = 0;           // buf.mul_(momentum).addcdiv_(grad, avg)
  float neg_lr = 0;
  bool maximize = false;
  bool centered = false;
};

template <class V>
MIXPREC_HOST_DEVICE inline void rmsprop_update(V& param, V& square_avg, V& grad_avg, V& buf, V grad,
                                               const RmspropCoeffs& c) {
  if (c.maximize) grad = -grad;
  if (c.weight_decay != 0.0f) grad = grad + c.weight_decay * param;
  square_avg = square_avg * c.alpha + (c.one_minus_alpha * grad) * grad;
  V avg;
  if (c.centered) {
    grad_avg = lerp(grad_avg, grad, c.one_minus_alpha);
    avg = math::sqrt(square_avg - grad_avg * grad_avg);  // square_avg.addcmul(ga, ga, value=-1).sqrt_()
  } else {
    avg = math::sqrt(square_avg);
  }
  avg = avg + c.eps;
  if (c.momentum > 0.0f) {
    buf = buf * c.momentum + grad / avg;
    param = param + c.neg_lr * buf;  // param.add_(buf, alpha=-lr)
  } else {
    param = param + (c.neg_lr * grad) / avg;  // param.addcdiv_(grad, avg, value=-lr)
  }
}

}  // namespace mixprec::optim
MIXPREC_PSABI_POP

// SPDX-License-Identifier: Apache-2.0
// The types an optimizer's parameters and states are made of: Param (what
// the user hands over, and all that layers need), the check pass's
// results, the gradient transform, and the saved training state.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// One trainable parameter as the user hands it over: the weight the forward
/// pass reads and the gradient the backward pass writes, both views of the
/// user's own buffers (fp16, bf16 or fp32, independently), never copied.
struct Param {
  std::string name;
  TensorRef weight;
  TensorRef grad;
};

/// What pass 1 over the gradients found, per parameter: whether any element
/// is not finite, and the sum of squares of the gradient as stored (that is,
/// still multiplied by the loss scale), accumulated in double.
struct GradStats {
  std::vector<char> nonfinite;
  std::vector<double> sum_squares;
  bool any_nonfinite() const {
    return std::any_of(nonfinite.begin(), nonfinite.end(), [](char c) { return c != 0; });
  }
  double total_sum_squares() const {
    double s = 0;
    for (double x : sum_squares) s += x;
    return s;
  }
};

/// How the stored gradients become the gradients the update uses:
/// g = (float(stored) * inv_scale) * clip_coef, the two roundings in
/// PyTorch's order (unscale, then clip_grad_norm_'s multiply).
struct GradTransform {
  float inv_scale = 1.0f;
  float clip_coef = 1.0f;
};

/// Where an optimizer keeps the second moment that divides its update, for
/// monitors: the update's denominator is sqrt(v / (1 - beta2^t)) + eps with t
/// the parameter's step count (beta2 = 0: no bias correction, as RMSprop).
/// v is null for optimizers without one (SGD) and before the first step.
struct SecondMoment {
  const float* v = nullptr;
  float eps = 0;
  float beta2 = 0;
  /// Which state tensor it is (-1: none). v is null where it exists but
  /// not as fp32 values (lean moments, optim/state_layout.hpp).
  int state = -1;
};

/// One parameter's part of an optimizer's training state, on the host.
struct ParamState {
  std::vector<float> master;
  /// Per state tensor (Optimizer::state_names()): its values, or none where
  /// the optimizer has not made it yet (momentum before the first step).
  std::vector<std::optional<std::vector<float>>> state;
  std::int64_t step = 0;  // applied steps of this parameter (torch's state['step'])
};

/// An optimizer's training state copied to the host: what a checkpoint
/// holds besides the model weights (mixprec/io/checkpoint.hpp).
struct OptimizerState {
  std::vector<ParamState> params;  // in parameter order
  std::vector<double> lrs;         // per group: the base lr
  std::int64_t applied_steps = 0;  // the LR schedule's position
};

}  // namespace optim
MIXPREC_NAMESPACE_END

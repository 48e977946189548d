// SPDX-License-Identifier: Apache-2.0
// The element-wise formulas of the layers, once, for the host (CPU layers
// and tests) and the device (the kernels): activations and their
// derivatives, in float.
#pragma once

#include <cmath>

#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

/// The activation a Linear layer fuses into its output (or an activation
/// layer applies). gelu is the tanh approximation, PyTorch's
/// GELU(approximate="tanh"), the form cuBLASLt's GELU epilogues compute.
enum class Activation { none, relu, gelu };

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::none:
      return "none";
    case Activation::relu:
      return "relu";
    case Activation::gelu:
      return "gelu";
  }
  return "?";
}

namespace fn {

inline constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
inline constexpr float kGeluA = 0.044715f;

MIXPREC_HOST_DEVICE inline float relu(float z) { return z > 0.0f ? z : 0.0f; }
/// d relu / dz, from the output (y > 0 exactly when z > 0).
MIXPREC_HOST_DEVICE inline float relu_grad_from_output(float y) { return y > 0.0f ? 1.0f : 0.0f; }

MIXPREC_HOST_DEVICE inline float gelu(float z) {
  const float t = tanhf(kGeluC * (z + kGeluA * z * z * z));
  return 0.5f * z * (1.0f + t);
}
MIXPREC_HOST_DEVICE inline float gelu_grad(float z) {
  const float t = tanhf(kGeluC * (z + kGeluA * z * z * z));
  return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * z * z);
}

MIXPREC_HOST_DEVICE inline float activate(Activation a, float z) {
  return a == Activation::relu ? relu(z) : a == Activation::gelu ? gelu(z) : z;
}
/// The derivative at pre-activation z.
MIXPREC_HOST_DEVICE inline float activation_grad(Activation a, float z) {
  return a == Activation::relu ? (z > 0.0f ? 1.0f : 0.0f) : a == Activation::gelu ? gelu_grad(z) : 1.0f;
}

}  // namespace fn
}  // namespace nn
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// Element operations the optimizers' update formulas share (each formula
// lives in its optimizer's header, optim/optimizers/<name>.hpp). V is float
// (device kernels, scalar tails), simd::f32x4 or f32x8 (the CPU loops) or the
// kernels' exact_float: the same operations in the same order on every path.
#pragma once

#include "mixprec/core/config.hpp"
#include "mixprec/core/simd.hpp"

MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// torch.lerp with a scalar weight: PyTorch switches form at 0.5 to keep the
/// result exact at both ends.
template <class V>
MIXPREC_HOST_DEVICE inline V lerp(V self, V end, float weight) {
  return weight < 0.5f ? self + math::mul(weight, end - self) : end - math::mul(end - self, 1.0f - weight);
}

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

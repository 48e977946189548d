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

/// x in every lane of V (float, simd::f32x4, the kernels' exact_float).
template <class V>
MIXPREC_HOST_DEVICE inline V splat(float x) {
  return V(x);
}
#if MIXPREC_HAS_VECTOR_EXT
template <>
inline simd::f32x4 splat<simd::f32x4>(float x) {
  return simd::f32x4{x, x, x, x};
}
#endif

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

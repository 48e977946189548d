// SPDX-License-Identifier: Apache-2.0
// A minimal 4-lane float vector for the CPU path, so that a numeric formula
// written once as a template runs on `float` (device, scalar tails) and on
// `simd::f32x4` (host loops) with the same operations in the same order.
#pragma once

#include <cmath>
#include <cstring>

#include "mixprec/core/config.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define MIXPREC_HAS_VECTOR_EXT 1
#else
#define MIXPREC_HAS_VECTOR_EXT 0
#endif
#if MIXPREC_HAS_VECTOR_EXT && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mixprec {
namespace math {

// The scalar operations the formulas use. Under nvcc these are the device
// math functions; IEEE-exact (correctly rounded sqrt) on both sides.
MIXPREC_HOST_DEVICE inline float sqrt(float x) { return ::sqrtf(x); }
MIXPREC_HOST_DEVICE inline float max(float a, float b) { return a > b ? a : b; }

}  // namespace math

#if MIXPREC_HAS_VECTOR_EXT
namespace simd {

/// Four floats in GCC/Clang's vector extension: +, -, *, / work lane-wise
/// and with scalars, one SSE instruction each on baseline x86-64 (and NEON
/// on AArch64). 16 bytes, so passing it by value needs no AVX ABI.
typedef float f32x4 __attribute__((vector_size(16), aligned(4)));
inline constexpr int lanes = 4;

inline f32x4 load(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, f32x4 v) { std::memcpy(p, &v, sizeof v); }

}  // namespace simd

namespace math {

inline simd::f32x4 sqrt(simd::f32x4 x) {
#if defined(__x86_64__)
  // sqrtps is correctly rounded, like sqrtf: the same bits as the scalar path.
  __m128 v;
  std::memcpy(&v, &x, 16);
  v = _mm_sqrt_ps(v);
  std::memcpy(&x, &v, 16);
  return x;
#else
  for (int i = 0; i < simd::lanes; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

inline simd::f32x4 max(simd::f32x4 a, simd::f32x4 b) { return a > b ? a : b; }

}  // namespace math
#endif  // MIXPREC_HAS_VECTOR_EXT

}  // namespace mixprec

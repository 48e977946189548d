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

// f32x8 values are passed by value only in code that is inlined into
// functions compiled for AVX2, so GCC's note that such signatures change the
// ABI without AVX (-Wpsabi) does not apply; these bracket that code.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MIXPREC_PSABI_PUSH _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wpsabi\"")
#define MIXPREC_PSABI_POP _Pragma("GCC diagnostic pop")
#else
#define MIXPREC_PSABI_PUSH
#define MIXPREC_PSABI_POP
#endif

MIXPREC_NAMESPACE_BEGIN
namespace math {

// The scalar operations the formulas use. Under nvcc these are the device
// math functions; IEEE-exact (correctly rounded sqrt) on both sides.
MIXPREC_HOST_DEVICE inline float sqrt(float x) { return ::sqrtf(x); }
MIXPREC_HOST_DEVICE inline float max(float a, float b) { return a > b ? a : b; }
/// torch.sign: 1, -1, or 0 for a zero of either sign.
MIXPREC_HOST_DEVICE inline float sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// opaque(a * b): the product, rounded, as a value the compiler cannot fuse
// into the addition or subtraction it feeds. The formulas write every
// product that feeds a sum through mul(a, b), so a consumer's own flags
// (-march=native -ffp-contract=fast, GCC's default outside ISO mode) cannot
// turn a * b + c into an FMA in mixprec's code: the bits do not depend on how
// the including program is compiled. GCC ignores `#pragma STDC FP_CONTRACT`
// in C++ and its `optimize` pragma stops inlining, so the product goes
// through an empty asm that takes it in a register and hands it back: no
// instruction, but an opaque value to the optimizer. On the device it is the
// plain product (the kernels' exact_float already rounds each operation, and
// nvcc's own contraction of float / double code is the device's business).
// Elsewhere (other CPUs, other compilers) it is the plain product: build
// those with contraction off. MIXPREC_FP_BARRIER=0 turns it off, for the test
// that shows the barrier is what keeps the bits (tests/consumer/).
#if !defined(MIXPREC_FP_BARRIER)
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDA_ARCH__) && \
    (defined(__x86_64__) || defined(__aarch64__))
#define MIXPREC_FP_BARRIER 1
#else
#define MIXPREC_FP_BARRIER 0
#endif
#endif
#if MIXPREC_FP_BARRIER
#if defined(__x86_64__)
#define MIXPREC_FP_REG "+x"
#else
#define MIXPREC_FP_REG "+w"
#endif
#endif

/// x, opaque to the optimizer (see mul). Any other lane type (the kernels'
/// exact_float) passes through.
template <class V>
MIXPREC_HOST_DEVICE inline V opaque(V x) {
  return x;
}
#if MIXPREC_FP_BARRIER
inline float opaque(float x) {
  __asm__("" : MIXPREC_FP_REG(x));
  return x;
}
inline double opaque(double x) {
  __asm__("" : MIXPREC_FP_REG(x));
  return x;
}
#endif
}  // namespace math

#if MIXPREC_HAS_VECTOR_EXT
MIXPREC_PSABI_PUSH
namespace simd {

/// Four floats in GCC/Clang's vector extension: +, -, *, / work lane-wise
/// and with scalars, one SSE instruction each on baseline x86-64 (and NEON
/// on AArch64). 16 bytes, so passing it by value needs no AVX ABI.
typedef float f32x4 __attribute__((vector_size(16), aligned(4)));
inline constexpr int lanes = 4;

// Eight floats, used only inside functions compiled for AVX2 (see
// Optimizer::apply_formula), where everything is inlined; passing it by
// value elsewhere would change the ABI, which is what -Wpsabi warns about.
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));

template <class V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

}  // namespace simd

namespace math {

// The 8-float functions are compiled for AVX: they only ever run inlined into
// the AVX2 loops, and GCC checks the return-value ABI of a non-template
// function at the end of the translation unit, where a -Wpsabi pragma
// cannot reach; with the attribute there is no ABI change to warn of.
#if defined(__x86_64__)
#define MIXPREC_AVX2_FN __attribute__((target("avx2")))
#else
#define MIXPREC_AVX2_FN
#endif

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
inline simd::f32x4 sign(simd::f32x4 x) {
  const simd::f32x4 one = {1, 1, 1, 1}, zero = {0, 0, 0, 0};
  return x > zero ? one : (x < zero ? -one : zero);
}

// Two 4-lane square roots: baseline instructions, so this inlines into AVX2
// code (where the halves are xmm registers) as well as into SSE code. The
// halves are split and joined with shuffles: going through memory instead
// costs a store-forwarding stall per call (a 32-byte load of two 16-byte
// stores), which tripled the Adam step's time.
MIXPREC_AVX2_FN inline simd::f32x8 sqrt(simd::f32x8 x) {
  const simd::f32x4 lo = sqrt(simd::f32x4(__builtin_shufflevector(x, x, 0, 1, 2, 3)));
  const simd::f32x4 hi = sqrt(simd::f32x4(__builtin_shufflevector(x, x, 4, 5, 6, 7)));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
}
MIXPREC_AVX2_FN inline simd::f32x8 max(simd::f32x8 a, simd::f32x8 b) { return a > b ? a : b; }
#if MIXPREC_FP_BARRIER
inline simd::f32x4 opaque(simd::f32x4 x) {
  __asm__("" : MIXPREC_FP_REG(x));
  return x;
}
MIXPREC_AVX2_FN inline simd::f32x8 opaque(simd::f32x8 x) {
  __asm__("" : MIXPREC_FP_REG(x));
  return x;
}
#endif
MIXPREC_AVX2_FN inline simd::f32x8 sign(simd::f32x8 x) {
  const simd::f32x8 one = {1, 1, 1, 1, 1, 1, 1, 1}, zero = {0, 0, 0, 0, 0, 0, 0, 0};
  return x > zero ? one : (x < zero ? -one : zero);
}

}  // namespace math
MIXPREC_PSABI_POP
#endif  // MIXPREC_HAS_VECTOR_EXT

namespace math {
// After every overload of opaque: the vector types have no namespace for
// argument-dependent lookup to find a later one.
MIXPREC_PSABI_PUSH
/// a * b, never fused into the sum it feeds (see opaque).
template <class A, class B>
MIXPREC_HOST_DEVICE inline auto mul(A a, B b) -> decltype(a * b) {
  return opaque(a * b);
}
#if MIXPREC_HAS_VECTOR_EXT
// The 8-float products, compiled for AVX like the other 8-float functions.
MIXPREC_AVX2_FN inline simd::f32x8 mul(simd::f32x8 a, simd::f32x8 b) { return opaque(a * b); }
MIXPREC_AVX2_FN inline simd::f32x8 mul(float a, simd::f32x8 b) { return opaque(a * b); }
MIXPREC_AVX2_FN inline simd::f32x8 mul(simd::f32x8 a, float b) { return opaque(a * b); }
#endif
MIXPREC_PSABI_POP
}  // namespace math

MIXPREC_NAMESPACE_END  // namespace mixprec

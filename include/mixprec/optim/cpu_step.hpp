// SPDX-License-Identifier: Apache-2.0
// The CPU step's loops, shared by every optimizer (Optimizer::update_elements
// and the check pass): the fused AVX2 + F16C pass over 8 elements, the
// portable chunked pass on 4-lane vectors and scalars, and the check pass's
// sums in their documented order. The same IEEE operations in the same
// order on every path, no FMA: the same bits.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/param.hpp"
#include "mixprec/tensor/tensor_ref.hpp"

// The fused 8-lane pass relies on GCC's `flatten` to inline formulas written
// for any lane type into AVX2 code; Clang refuses 8-float vectors crossing
// into functions not compiled for AVX, so Clang builds take the portable
// path (the same bits, slower).
#if MIXPREC_HOST_SIMD && defined(__GNUC__) && !defined(__clang__)
#define MIXPREC_OPTIM_AVX2 1
#else
#define MIXPREC_OPTIM_AVX2 0
#endif

MIXPREC_NAMESPACE_BEGIN namespace optim::cpu {

/// Elements per chunk of the portable pass and per block of the check
/// pass's sums: a few KiB of floats, in L1.
inline constexpr std::int64_t kChunk = 1024;
/// Bins of the gradient-exponent histogram (Optimizer::set_grad_histogram).
inline constexpr std::size_t kHistogramBins = 64;

MIXPREC_PSABI_PUSH
// formula(v[0], ..., v[N - 1], grad).
template <class Formula, class V, std::size_t... I>
inline void call_formula(Formula& formula, V (&v)[sizeof...(I)], const V& grad,
                         std::index_sequence<I...>) {
  formula(v[I]..., grad);
}
#if MIXPREC_HAS_VECTOR_EXT
// The 4-lane loop of the chunked path; returns how many elements it did.
template <class V, std::size_t N, class Formula>
inline std::int64_t formula_lanes(std::int64_t count, float* const (&arrays)[N], const float* grad,
                                  Formula& formula) {
  constexpr std::int64_t lanes = sizeof(V) / sizeof(float);
  Formula f = formula;  // a local copy stays in registers (see fused_avx2)
  float* out[N];
  for (std::size_t a = 0; a < N; ++a) out[a] = arrays[a];
  std::int64_t k = 0;
  for (; k + lanes <= count; k += lanes) {
    V v[N];
    for (std::size_t a = 0; a < N; ++a) v[a] = simd::load<V>(out[a] + k);
    call_formula(f, v, simd::load<V>(grad + k), std::make_index_sequence<N>{});
    for (std::size_t a = 0; a < N; ++a) simd::store(out[a] + k, v[a]);
  }
  return k;
}
#if MIXPREC_OPTIM_AVX2
#define MIXPREC_TARGET_AVX2 __attribute__((target("avx2,f16c")))
// 8 stored gradients widened to fp32, with the bits of convert_n.
MIXPREC_TARGET_AVX2 inline simd::f32x8 load8(const float* p) { return simd::load<simd::f32x8>(p); }
MIXPREC_TARGET_AVX2 inline simd::f32x8 load8(const half* p) {
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // A half NaN widens to the canonical float NaN, as everywhere in mixprec.
  const __m256 r = _mm256_blendv_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)),
                                    _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  simd::f32x8 v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}
MIXPREC_TARGET_AVX2 inline simd::f32x8 load8(const bfloat16* p) {
  const __m256i b = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  simd::f32x8 v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
// 8 masters rounded into the model weight (convert_n's bits).
MIXPREC_TARGET_AVX2 inline void store8(float* p, simd::f32x8 v) { simd::store(p, v); }
MIXPREC_TARGET_AVX2 inline void store8(half* p, simd::f32x8 v) {
  float tmp[8];
  simd::store(tmp, v);
  detail::simd_convert(tmp, 8, p);
}
MIXPREC_TARGET_AVX2 inline void store8(bfloat16* p, simd::f32x8 v) {
  __m256i u;
  std::memcpy(&u, &v, sizeof u);
  const __m256i r = detail::round_to_bfloat16_bits8(u);
  // Pack the 8 low halves into 128 bits (packus works per 128-bit lane).
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// The fused pass: every call inside is inlined (flatten) and compiled for
// AVX2 + F16C, without FMA, so nothing is contracted. Returns how many
// elements it did (a multiple of 8).
template <std::size_t N, class G, class W, class Formula>
MIXPREC_TARGET_AVX2 __attribute__((flatten)) inline std::int64_t fused_avx2(
    std::int64_t n, const G* grad, W* weight, float* const (&arrays)[N], const GradTransform& t,
    Formula& formula) {
  // Local copies: the compiler cannot tell that stores through the float
  // arrays leave the caller's coefficients, pointers and factors alone, and
  // would reload them (and re-test the options) on every iteration.
  Formula f = formula;
  float* out[N];
  for (std::size_t a = 0; a < N; ++a) out[a] = arrays[a];
  const float inv_scale = t.inv_scale, clip_coef = t.clip_coef;
  const bool unscale = inv_scale != 1.0f, clip = clip_coef != 1.0f;
  std::int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    simd::f32x8 g = load8(grad + k);
    // Products that the formula adds to: opaque, like its own (math::mul).
    if (unscale) g = math::mul(g, inv_scale);
    if (clip) g = math::mul(g, clip_coef);
    simd::f32x8 v[N];
    for (std::size_t a = 0; a < N; ++a) v[a] = simd::load<simd::f32x8>(out[a] + k);
    call_formula(f, v, g, std::make_index_sequence<N>{});
    for (std::size_t a = 0; a < N; ++a) simd::store(out[a] + k, v[a]);
    store8(weight + k, v[0]);
  }
  return k;
}

// Pass 1 over one gradient: sum of squares (float within 1024-element
// blocks, double across them) and the NaN-propagating flag.
template <class G>
MIXPREC_TARGET_AVX2 __attribute__((flatten)) inline std::int64_t check_avx2(
    const G* grad, std::int64_t n, double& sum, float& flag) {
  std::int64_t k = 0;
  const simd::f32x8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  simd::f32x8 f0 = zero, f1 = zero;
  for (; k + kChunk <= n; k += kChunk) {
    simd::f32x8 s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    for (std::int64_t e = k; e < k + kChunk; e += 32) {
      const simd::f32x8 a = load8(grad + e), b = load8(grad + e + 8), c = load8(grad + e + 16),
                        d = load8(grad + e + 24);
      s0 += math::mul(a, a);
      s1 += math::mul(b, b);
      s2 += math::mul(c, c);
      s3 += math::mul(d, d);
      f0 += (a - a) + (b - b);
      f1 += (c - c) + (d - d);
    }
    // The reduction of sum_block: st[l] = (p[l] + p[8+l]) + (p[16+l] + p[24+l]).
    const simd::f32x8 st = (s0 + s1) + (s2 + s3);
    float part = 0;
    for (int l = 0; l < 8; ++l) part += st[l];
    sum += part;
  }
  const simd::f32x8 ft = f0 + f1;
  for (int l = 0; l < 8; ++l) flag += ft[l];
  return k;
}
#undef MIXPREC_TARGET_AVX2
#endif
#endif

MIXPREC_PSABI_POP
// GCC checks the ABI of some of the 8-float instantiations above (the
// formulas' return values) only at the end of the translation unit, where
// the pop above no longer reaches, and -Wpsabi warns of an ABI change that
// cannot happen (they exist only inlined into AVX2 code). So from here to
// the end of an including file, GCC's -Wpsabi is off: a diagnostic, not
// code generation, and the one thing including the optimizers does to the
// rest of a translation unit (it was -Wno-psabi on every file of a
// consumer until issue 20).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && MIXPREC_OPTIM_AVX2
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

inline void load_float(const TensorRef& src, std::int64_t offset, std::int64_t count, float* out) {
  src.visit([&](auto view) {
    convert_n(view.data() + offset, static_cast<std::size_t>(count), out);
  });
}

// The check pass's summation order, the same on every path so that the
// norm (and the clip coefficient) has the same bits everywhere: within a
// block of kChunk elements, element j goes to partial sum j % 32 (squares
// rounded, then added: no FMA); the 32 partials reduce as
// st[l] = (p[l] + p[8 + l]) + (p[16 + l] + p[24 + l]), then
// ((st[0] + st[1]) + st[2]) + ... in float; blocks add up in double. A
// tail shorter than a block is summed in order. The flag is x - x summed:
// 0 for finite values, NaN once any value is inf or NaN.
inline void sum_block(const float* g, double& sum, float& flag) {
  float p[32] = {};
  for (std::int64_t j = 0; j < kChunk; ++j) {
    const float sq = math::mul(g[j], g[j]);
    p[j % 32] += sq;
    flag += g[j] - g[j];
  }
  float part = 0;
  for (int l = 0; l < 8; ++l) part += (p[l] + p[8 + l]) + (p[16 + l] + p[24 + l]);
  sum += part;
}
// The histogram of set_grad_histogram for m values.
inline void count_exponents(const float* g, std::int64_t m, std::uint64_t* bins) {
  for (std::int64_t j = 0; j < m; ++j) {
    const float x = g[j];
    std::size_t b;
    if (x == 0.0f) {
      b = 0;
    } else if (!std::isfinite(x)) {
      b = kHistogramBins - 1;
    } else {
      const int e = std::ilogb(x);
      b = static_cast<std::size_t>(std::min(std::max(e, -45), 16) + 46);
    }
    bins[b] += 1;
  }
}
inline void sum_tail(const float* g, std::int64_t m, double& sum, float& flag) {
  float part = 0;
  for (std::int64_t j = 0; j < m; ++j) {
    part += math::mul(g[j], g[j]);
    flag += g[j] - g[j];
  }
  sum += part;
}

}  // namespace optim::cpu
MIXPREC_NAMESPACE_END

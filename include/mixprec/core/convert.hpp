// SPDX-License-Identifier: Apache-2.0
// Conversions between float and the 16-bit types: scalar ones usable in host
// and device code, and whole-array host conversions.
//
// The contract, identical on host and device for every input bit pattern:
//  * float -> half / bfloat16 rounds to nearest, ties to even. Values at or
//    beyond the rounding midpoint past the largest finite value become inf;
//    values that round to below the smallest subnormal become signed zero.
//  * Any NaN becomes the canonical NaN 0x7fff (sign and payload dropped),
//    which is what the GPU's cvt.rn.f16.f32 / cvt.rn.bf16.f32 produce.
//  * half -> float is exact; a half NaN becomes the canonical float NaN
//    0x7fffffff, as the GPU's cvt.f32.f16 does. bfloat16 -> float is exact
//    and keeps NaN payloads (it is a shift on both sides).
// half(float) and bfloat16(float) (core/dtype.hpp) round with the same bit
// functions on host and device; on the device these use CUDA's intrinsics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mixprec/core/config.hpp"
#include "mixprec/core/dtype.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// The x86-64 SIMD host paths need GCC/Clang target attributes; nvcc's host
// pass takes the portable loop (same bits, tested). So does an unoptimised
// build (-O0, no __OPTIMIZE__): the AVX2 functions pass 8-float vectors to
// helpers (simd::load, the formulas) that have no AVX2 target of their own
// and rely on being inlined; at -O0 they are real calls that pass those
// vectors in memory while the AVX2 caller expects them in registers (the
// ABI change -Wpsabi warns of), and the optimizer step crashed.
#if !defined(MIXPREC_HOST_SIMD)
#if (defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))) && !defined(__CUDACC__) && \
    defined(__OPTIMIZE__)
#define MIXPREC_HOST_SIMD 1
#else
#define MIXPREC_HOST_SIMD 0
#endif
#endif
#if MIXPREC_HOST_SIMD
#include <cpuid.h>
#include <immintrin.h>
#endif

MIXPREC_NAMESPACE_BEGIN

/// The raw bits of a value.
MIXPREC_HOST_DEVICE inline std::uint16_t to_bits(half x) { return x.bits; }
MIXPREC_HOST_DEVICE inline std::uint16_t to_bits(bfloat16 x) { return x.bits; }
MIXPREC_HOST_DEVICE inline std::uint32_t to_bits(float x) { return detail::bit_cast<std::uint32_t>(x); }

/// The value with the given raw bits.
template <class T>
MIXPREC_HOST_DEVICE inline T from_bits(
    std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint16_t> bits) {
  if constexpr (std::is_same_v<T, float>) {
    return detail::bit_cast<float>(bits);
  } else {
    T x;
    x.bits = bits;
    return x;
  }
}

/// Rounds `x` to nearest even in T (see the contract at the top of the file).
template <class T>
MIXPREC_HOST_DEVICE T from_float(float x);

template <>
MIXPREC_HOST_DEVICE inline float from_float<float>(float x) {
  return x;
}

template <>
MIXPREC_HOST_DEVICE inline half from_float<half>(float x) {
#if defined(__CUDA_ARCH__)
  return from_bits<half>(__half_as_ushort(__float2half_rn(x)));
#else
  return from_bits<half>(detail::float_bits_to_half_bits(to_bits(x)));
#endif
}

template <>
MIXPREC_HOST_DEVICE inline bfloat16 from_float<bfloat16>(float x) {
#if defined(__CUDA_ARCH__)
  return from_bits<bfloat16>(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
#else
  return from_bits<bfloat16>(detail::float_bits_to_bfloat16_bits(to_bits(x)));
#endif
}

/// Widens to float exactly (see the contract at the top of the file for NaN).
MIXPREC_HOST_DEVICE inline float to_float(float x) { return x; }

MIXPREC_HOST_DEVICE inline float to_float(half x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(to_bits(x)));
#else
  return from_bits<float>(detail::half_bits_to_float_bits(to_bits(x)));
#endif
}

MIXPREC_HOST_DEVICE inline float to_float(bfloat16 x) {
  return from_bits<float>(detail::bfloat16_bits_to_float_bits(to_bits(x)));
}

/// Converts between any two element types through float (exact for the
/// widening direction, one rounding for the narrowing one).
template <class To, class From>
MIXPREC_HOST_DEVICE inline To convert(From x) {
  return from_float<To>(to_float(x));
}

namespace detail {

// One element's conversion on bit patterns, as the host scalar functions do it.
template <class From, class To, class FromBits, class ToBits = std::conditional_t<sizeof(To) == 4, std::uint32_t, std::uint16_t>>
inline ToBits convert_bits(FromBits x) {
  if constexpr (std::is_same_v<From, float>) {
    if constexpr (std::is_same_v<To, half>) return float_bits_to_half_bits(x);
    else return float_bits_to_bfloat16_bits(x);
  } else if constexpr (std::is_same_v<To, float>) {
    if constexpr (std::is_same_v<From, half>) return half_bits_to_float_bits(x);
    else return bfloat16_bits_to_float_bits(x);
  } else {
    // Between the two 16-bit types: widen exactly, then round once.
    return convert_bits<float, To>(convert_bits<From, float>(x));
  }
}

#if MIXPREC_HOST_SIMD
// x86-64 SIMD paths, compiled for AVX2 + F16C through target attributes and
// chosen at run time, so a binary built for baseline x86-64 still uses them on
// any CPU that has them. F16C rounds exactly like the contract; only its NaN
// encodings differ (x86 keeps sign and payload), so NaN lanes are replaced
// with the canonical patterns. Each returns how many elements it converted.
#define MIXPREC_TARGET_AVX2 __attribute__((target("avx2,f16c")))

MIXPREC_TARGET_AVX2 inline std::size_t simd_convert(const float* src, std::size_t n, half* dst) {
  const __m128i canonical_nan = _mm_set1_epi16(0x7fff);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan32),
                                          _mm256_extracti128_si256(nan32, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_blendv_epi8(h, canonical_nan, nan16));
  }
  return i;
}

MIXPREC_TARGET_AVX2 inline std::size_t simd_convert(const half* src, std::size_t n, float* dst) {
  const __m256 canonical_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_blendv_ps(x, canonical_nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  }
  return i;
}

// float_bits_to_bfloat16_bits on 8 lanes: round the 16 dropped bits to
// nearest even, canonical NaN 0x7fff; results in the low 16 bits of each lane.
MIXPREC_TARGET_AVX2 inline __m256i round_to_bfloat16_bits8(__m256i u) {
  const __m256i bias = _mm256_set1_epi32(0x7fff);  // also the canonical NaN
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(r, bias, is_nan);
}

MIXPREC_TARGET_AVX2 inline std::size_t simd_convert(const float* src, std::size_t n,
                                                    bfloat16* dst) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i lo = round_to_bfloat16_bits8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m256i hi = round_to_bfloat16_bits8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 8)));
    // packus works per 128-bit lane: fix the order with a 64-bit permute.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8));
  }
  return i;
}

MIXPREC_TARGET_AVX2 inline std::size_t simd_convert(const bfloat16* src, std::size_t n,
                                                    float* dst) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(b, 16));
  }
  return i;
}

// AVX2 and F16C usable: the CPU has them (CPUID) and the OS saves the YMM
// registers (XGETBV). Read directly rather than through
// __builtin_cpu_supports, which clang does not accept for "f16c".
inline bool cpu_has_avx2_f16c() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx && f16c)) return false;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6) != 0x6) return false;  // XMM and YMM state enabled
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    return ((b >> 5) & 1) != 0;  // AVX2
  }();
  return has;
}
#undef MIXPREC_TARGET_AVX2
#endif  // MIXPREC_HOST_SIMD

}  // namespace detail

/// Converts n elements from `src` to `dst` on the host, with the same bits as
/// the scalar functions. On x86-64 CPUs with AVX2 and F16C (checked once at
/// run time) float <-> half / bfloat16 take 8-16 elements per instruction;
/// elsewhere a branch-free loop over bit patterns (the bfloat16 one
/// vectorises at -O3). Single-threaded, synchronous. The ranges must not
/// overlap unless From == To. Define MIXPREC_HOST_SIMD=0 to force the
/// portable loop.
template <class From, class To>
inline void convert_n(const From* src, std::size_t n, To* dst) {
  static_assert(is_element_type_v<From> && is_element_type_v<To>,
                "convert_n: element types are half, bfloat16 and float");
  if constexpr (std::is_same_v<From, To>) {
    if (n != 0 && src != dst) std::memmove(dst, src, n * sizeof(To));
  } else {
    std::size_t i = 0;
#if MIXPREC_HOST_SIMD
    if constexpr (std::is_same_v<From, float> || std::is_same_v<To, float>) {
      if (detail::cpu_has_avx2_f16c()) i = detail::simd_convert(src, n, dst);
    }
#endif
    // Blocks through local bit arrays: memcpy is the aliasing-safe way to see
    // the bits, and plain integer arrays are what the vectoriser handles.
    constexpr std::size_t block = 256;
    using FromBits = std::conditional_t<sizeof(From) == 4, std::uint32_t, std::uint16_t>;
    using ToBits = std::conditional_t<sizeof(To) == 4, std::uint32_t, std::uint16_t>;
    FromBits in[block];
    ToBits out[block];
    while (i < n) {
      const std::size_t m = n - i < block ? n - i : block;
      std::memcpy(in, src + i, m * sizeof(From));
      for (std::size_t k = 0; k < m; ++k) out[k] = detail::convert_bits<From, To>(in[k]);
      std::memcpy(dst + i, out, m * sizeof(To));
      i += m;
    }
  }
}

MIXPREC_NAMESPACE_END  // namespace mixprec

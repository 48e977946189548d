// SPDX-License-Identifier: Apache-2.0
// The element types mixprec computes with (half, bfloat16, float) and their
// traits: name, size, and the limits that decide overflow and underflow.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

namespace detail {

/// The bits of `from` as a `To` of the same size (memcpy: the defined way
/// in C++17, host and device, and free once optimised).
template <class To, class From>
MIXPREC_HOST_DEVICE inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// The conversions on bit patterns, rounded as core/convert.hpp's contract
// says. Branch-free (every case is computed and one is selected) so that
// g++ vectorises array loops over them.

MIXPREC_HOST_DEVICE inline std::uint16_t float_bits_to_half_bits(std::uint32_t u) {
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  // Normal half results: rebias the exponent (127 -> 15), then round the 13
  // dropped fraction bits to nearest even. A carry out of the fraction
  // correctly bumps the exponent.
  std::uint32_t normal = a - 0x38000000u;
  normal = (normal + 0x0fffu + ((normal >> 13) & 1u)) >> 13;
  // Subnormal half results (|x| < 2^-14): adding 0.5f makes the float's ulp
  // 2^-24, the half subnormal step, so the FPU's own round-to-nearest-even
  // rounds |x| to the right multiple; the low bits are then the half fraction
  // (0x400, the smallest normal, when it rounds up across the boundary).
  // Needs only the default rounding mode; FTZ/DAZ cannot change the result
  // because every float subnormal rounds to zero here anyway.
  const float shifted = bit_cast<float>(a) + 0.5f;
  const std::uint32_t subnormal = bit_cast<std::uint32_t>(shifted) - 0x3f000000u;
  std::uint32_t r = a < 0x38800000u ? subnormal : normal;
  // 0x477ff000 = 65520, the midpoint between 65504 and 2^16: ties go to the
  // even neighbour, which is inf.
  r = a >= 0x477ff000u ? 0x7c00u : r;
  r |= sign;
  r = a > 0x7f800000u ? 0x7fffu : r;
  return static_cast<std::uint16_t>(r);
}

MIXPREC_HOST_DEVICE inline std::uint32_t half_bits_to_float_bits(std::uint16_t h) {
  const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
  const std::uint32_t exponent = h & 0x7c00u;
  const std::uint32_t fraction = h & 0x03ffu;
  const std::uint32_t normal = (((static_cast<std::uint32_t>(h) & 0x7fffu) << 13) + 0x38000000u);
  // Subnormal: 0.5f with the fraction in its lowest bits is 0.5 + m * 2^-24;
  // subtracting 0.5 is exact (Sterbenz) and leaves m * 2^-24.
  const float sub = bit_cast<float>(0x3f000000u | fraction) - 0.5f;
  std::uint32_t r = exponent == 0 ? bit_cast<std::uint32_t>(sub) : normal;
  r |= sign;
  r = exponent == 0x7c00u ? (fraction != 0 ? 0x7fffffffu : (sign | 0x7f800000u)) : r;
  return r;
}

MIXPREC_HOST_DEVICE inline std::uint16_t float_bits_to_bfloat16_bits(std::uint32_t u) {
  // Round the 16 dropped bits to nearest even; overflow carries into the
  // exponent and reaches inf exactly when it should.
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fffu : rounded);
}

MIXPREC_HOST_DEVICE inline std::uint32_t bfloat16_bits_to_float_bits(std::uint16_t b) {
  return static_cast<std::uint32_t>(b) << 16;
}

// What half and bfloat16 share: 16 bits, built from float by rounding to
// nearest even (explicitly: a narrowing), read as float implicitly (exact),
// and arithmetic as Eigen's types do it: in float, rounded once into the
// type (for + - * / of two such values the same as exact rounding, float
// having more than twice their precision plus two bits). Comparisons go
// through float: NaN is unordered, -0 == +0.
struct HalfBits {
  MIXPREC_HOST_DEVICE static std::uint16_t narrow(std::uint32_t u) { return float_bits_to_half_bits(u); }
  MIXPREC_HOST_DEVICE static std::uint32_t widen(std::uint16_t h) { return half_bits_to_float_bits(h); }
};
struct Bfloat16Bits {
  MIXPREC_HOST_DEVICE static std::uint16_t narrow(std::uint32_t u) { return float_bits_to_bfloat16_bits(u); }
  MIXPREC_HOST_DEVICE static std::uint32_t widen(std::uint16_t b) { return bfloat16_bits_to_float_bits(b); }
};

template <class Derived, class Bits>
struct Float16Base {
  std::uint16_t bits = 0;  // the raw bits; from_bits / to_bits in convert.hpp

  Float16Base() = default;
  MIXPREC_HOST_DEVICE explicit Float16Base(float x) : bits(Bits::narrow(bit_cast<std::uint32_t>(x))) {}
  MIXPREC_HOST_DEVICE operator float() const {  // NOLINT(google-explicit-constructor): exact
    return bit_cast<float>(Bits::widen(bits));
  }

  MIXPREC_HOST_DEVICE friend Derived operator+(Derived a, Derived b) { return Derived(float(a) + float(b)); }
  MIXPREC_HOST_DEVICE friend Derived operator-(Derived a, Derived b) { return Derived(float(a) - float(b)); }
  MIXPREC_HOST_DEVICE friend Derived operator*(Derived a, Derived b) { return Derived(float(a) * float(b)); }
  MIXPREC_HOST_DEVICE friend Derived operator/(Derived a, Derived b) { return Derived(float(a) / float(b)); }
  MIXPREC_HOST_DEVICE friend Derived operator-(Derived a) {
    Derived r;
    r.bits = static_cast<std::uint16_t>(a.bits ^ 0x8000u);
    return r;
  }
  MIXPREC_HOST_DEVICE friend Derived& operator+=(Derived& a, Derived b) { return a = a + b; }
  MIXPREC_HOST_DEVICE friend Derived& operator-=(Derived& a, Derived b) { return a = a - b; }
  MIXPREC_HOST_DEVICE friend Derived& operator*=(Derived& a, Derived b) { return a = a * b; }
  MIXPREC_HOST_DEVICE friend Derived& operator/=(Derived& a, Derived b) { return a = a / b; }
};

}  // namespace detail

/// IEEE 754 binary16, mixprec's own 16-bit type (no Eigen needed): two
/// bytes, the same bits as CUDA's __half and Eigen::half (a test checks the
/// layout across g++ and nvcc translation units; <mixprec/tensor/eigen.hpp>
/// maps it as Eigen::half). `half(x)` rounds a float to nearest even; a
/// half converts to float exactly and implicitly.
struct half : detail::Float16Base<half, detail::HalfBits> {
  using Float16Base::Float16Base;
  half() = default;
  /// From any other arithmetic type, through float.
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, float>>>
  MIXPREC_HOST_DEVICE explicit half(T x) : half(static_cast<float>(x)) {}
};

/// bfloat16: the top 16 bits of a binary32, mixprec's own type; the same
/// bits as CUDA's __nv_bfloat16 and Eigen::bfloat16. Conversions as half's.
struct bfloat16 : detail::Float16Base<bfloat16, detail::Bfloat16Bits> {
  using Float16Base::Float16Base;
  bfloat16() = default;
  /// From any other arithmetic type, through float.
  template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, float>>>
  MIXPREC_HOST_DEVICE explicit bfloat16(T x) : bfloat16(static_cast<float>(x)) {}
};

static_assert(sizeof(half) == 2 && alignof(half) == 2 && sizeof(bfloat16) == 2 && alignof(bfloat16) == 2,
              "half and bfloat16 are two bytes, two-aligned, as CUDA's types");
static_assert(std::is_trivially_copyable_v<half> && std::is_trivially_copyable_v<bfloat16>,
              "half and bfloat16 are copied as bytes");

/// The runtime tag of an element type.
enum class DType : std::uint8_t { float16, bfloat16, float32 };

/// Compile-time facts about an element type. Limits are given as float: every
/// one of them is exactly representable in binary32.
template <class T>
struct dtype_traits;

template <>
struct dtype_traits<half> {
  static constexpr DType dtype = DType::float16;
  static constexpr const char* name = "float16";
  static constexpr std::size_t bytes = 2;
  static constexpr int exponent_bits = 5;
  static constexpr int mantissa_bits = 10;      // stored fraction bits
  static constexpr float max_finite = 65504.0f;  // (2 - 2^-10) * 2^15
  static constexpr float min_normal = 6.103515625e-05f;            // 2^-14
  static constexpr float smallest_subnormal = 5.9604644775390625e-08f;  // 2^-24
  static constexpr float epsilon = 9.765625e-04f;                  // 2^-10
};

template <>
struct dtype_traits<bfloat16> {
  static constexpr DType dtype = DType::bfloat16;
  static constexpr const char* name = "bfloat16";
  static constexpr std::size_t bytes = 2;
  static constexpr int exponent_bits = 8;
  static constexpr int mantissa_bits = 7;
  static constexpr float max_finite = 3.38953139e+38f;  // (2 - 2^-7) * 2^127
  static constexpr float min_normal = 1.17549435e-38f;  // 2^-126
  static constexpr float smallest_subnormal = 9.18354962e-41f;  // 2^-133
  static constexpr float epsilon = 7.8125e-03f;                  // 2^-7
};

template <>
struct dtype_traits<float> {
  static constexpr DType dtype = DType::float32;
  static constexpr const char* name = "float32";
  static constexpr std::size_t bytes = 4;
  static constexpr int exponent_bits = 8;
  static constexpr int mantissa_bits = 23;
  static constexpr float max_finite = std::numeric_limits<float>::max();
  static constexpr float min_normal = std::numeric_limits<float>::min();
  static constexpr float smallest_subnormal = std::numeric_limits<float>::denorm_min();
  static constexpr float epsilon = std::numeric_limits<float>::epsilon();
};

/// True for the element types mixprec stores tensors in.
template <class T>
inline constexpr bool is_element_type_v =
    std::is_same_v<T, half> || std::is_same_v<T, bfloat16> || std::is_same_v<T, float>;

/// The runtime tag of T.
template <class T>
inline constexpr DType dtype_of = dtype_traits<T>::dtype;

/// "float16", "bfloat16" or "float32".
constexpr const char* dtype_name(DType d) {
  switch (d) {
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float32:
      return "float32";
  }
  return "unknown";
}

/// Size in bytes of one element of type d.
constexpr std::size_t dtype_size(DType d) { return d == DType::float32 ? 4 : 2; }

MIXPREC_NAMESPACE_END  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// The element types mixprec computes with (half, bfloat16, float) and their
// traits: name, size, and the limits that decide overflow and underflow.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "mixprec/core/config.hpp"

namespace mixprec {

/// IEEE 754 binary16. On the host this is Eigen::half; in device code its
/// 16 bits are those of CUDA's __half (a test checks the layout across g++
/// and nvcc translation units).
using half = Eigen::half;
/// bfloat16: the top 16 bits of a binary32. Eigen::bfloat16 on the host, the
/// same bits as __nv_bfloat16 on the device.
using bfloat16 = Eigen::bfloat16;

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

}  // namespace mixprec

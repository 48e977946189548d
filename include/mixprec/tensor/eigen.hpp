// SPDX-License-Identifier: Apache-2.0
// Eigen interop: TensorView::flat() and matrix() as Eigen maps, with
// mixprec::half and mixprec::bfloat16 seen as Eigen::half and Eigen::bfloat16
// (the same 16 bits). The only mixprec header besides the CPU layers that
// includes Eigen.
#pragma once

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "mixprec/core/dtype.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

/// Eigen's type with the same bits as a mixprec element type: Eigen::half
/// for half, Eigen::bfloat16 for bfloat16, float for float (const kept).
template <class T>
struct eigen_element {
  using type = T;
};
template <>
struct eigen_element<half> {
  using type = Eigen::half;
};
template <>
struct eigen_element<const half> {
  using type = const Eigen::half;
};
template <>
struct eigen_element<bfloat16> {
  using type = Eigen::bfloat16;
};
template <>
struct eigen_element<const bfloat16> {
  using type = const Eigen::bfloat16;
};
template <class T>
using eigen_element_t = typename eigen_element<T>::type;

static_assert(sizeof(Eigen::half) == sizeof(half) && sizeof(Eigen::bfloat16) == sizeof(bfloat16),
              "mixprec's 16-bit types and Eigen's must have the same size to share bits");

namespace detail {

template <class T>
struct EigenMaps<T, std::enable_if_t<is_element_type_v<std::remove_const_t<T>>>> {
  using E = eigen_element_t<T>;
  using Value = std::remove_const_t<E>;
  using Array = Eigen::Array<Value, Eigen::Dynamic, 1>;
  using Matrix = Eigen::Matrix<Value, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ArrayMap = std::conditional_t<std::is_const_v<T>, Eigen::Map<const Array>, Eigen::Map<Array>>;
  using MatrixMap = std::conditional_t<std::is_const_v<T>, Eigen::Map<const Matrix>, Eigen::Map<Matrix>>;

  static ArrayMap flat(T* data, std::int64_t n) {
    return ArrayMap(reinterpret_cast<E*>(data), static_cast<Eigen::Index>(n));
  }
  static MatrixMap matrix(T* data, std::int64_t rows, std::int64_t cols) {
    return MatrixMap(reinterpret_cast<E*>(data), static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
  }
};

}  // namespace detail
MIXPREC_NAMESPACE_END  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// Host helpers of the CPU layers: views of T as float matrices (widened
// exactly) and float matrices rounded back into views of T.
#pragma once

#include <Eigen/Core>

#include <cstddef>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn::detail {

using MatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The view as a rows x (numel / rows) float matrix.
template <class T>
MatrixF to_matrix(TensorView<const T> v, std::int64_t rows) {
  MIXPREC_CHECK(rows > 0 && v.numel() % rows == 0, "to_matrix: ", v.numel(), " elements in ", rows, " rows");
  MatrixF m(rows, v.numel() / rows);
  convert_n(v.data(), static_cast<std::size_t>(v.numel()), m.data());
  return m;
}

/// Rounds m into v (same element count), to nearest even.
template <class T, class Derived>
void store(const Eigen::MatrixBase<Derived>& m, TensorView<T> v) {
  const MatrixF dense = m;  // evaluate (and make row-major) first
  MIXPREC_CHECK(dense.size() == v.numel(), "store: ", dense.size(), " values into ", v.numel(), " elements");
  convert_n(dense.data(), static_cast<std::size_t>(dense.size()), v.data());
}

}  // namespace nn::detail
MIXPREC_NAMESPACE_END

// SPDX-License-Identifier: Apache-2.0
// Shared declarations of the cross-compiler test (layout_gpp.cpp is compiled
// by g++, layout_nvcc.cu by nvcc).
#pragma once

#include <cstddef>

#include "mixprec/mixprec.hpp"

namespace mixprec::test {

struct LayoutReport {
  std::size_t half_size, half_align, bfloat16_size, bfloat16_align, device_size, shape_size,
      view_size, tensor_size, buffer_size;
};

#define MIXPREC_LAYOUT_REPORT()                                                             \
  LayoutReport {                                                                            \
    sizeof(::mixprec::half), alignof(::mixprec::half), sizeof(::mixprec::bfloat16),        \
        alignof(::mixprec::bfloat16), sizeof(::mixprec::Device), sizeof(::mixprec::Shape),  \
        sizeof(::mixprec::TensorView<::mixprec::half>), sizeof(::mixprec::Tensor<float>),   \
        sizeof(::mixprec::Buffer)                                                           \
  }

LayoutReport gpp_layout();
LayoutReport nvcc_layout();
void nvcc_convert(const float* xs, std::size_t n, half* h, bfloat16* b, float* widened);
double nvcc_sum(TensorView<const half> v);

}  // namespace mixprec::test

// SPDX-License-Identifier: Apache-2.0
// The nvcc side of the cross-compiler test (see layout_gpp.cpp).
#include "layout.hpp"

namespace mixprec::test {

LayoutReport nvcc_layout() { return MIXPREC_LAYOUT_REPORT(); }

void nvcc_convert(const float* xs, std::size_t n, half* h, bfloat16* b, float* widened) {
  convert_n(xs, n, h);
  convert_n(xs, n, b);
  convert_n(h, n, widened);
}

double nvcc_sum(TensorView<const half> v) {
  double sum = 0;
  for (std::int64_t i = 0; i < v.numel(); ++i) sum += to_float(v.at(i));
  return sum;
}

}  // namespace mixprec::test

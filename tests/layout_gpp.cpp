// SPDX-License-Identifier: Apache-2.0
// The g++ side of the cross-compiler test: this file is compiled by g++ and
// linked with layout_nvcc.cu (compiled by nvcc). Both report the layout of
// mixprec's types and convert the same inputs on the host; they must agree.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "layout.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec::test {

LayoutReport gpp_layout() { return MIXPREC_LAYOUT_REPORT(); }

namespace {

TEST(CrossCompiler, TypesHaveOneLayout) {
  const LayoutReport a = gpp_layout();
  const LayoutReport b = nvcc_layout();
  EXPECT_EQ(a.half_size, b.half_size);
  EXPECT_EQ(a.half_align, b.half_align);
  EXPECT_EQ(a.bfloat16_size, b.bfloat16_size);
  EXPECT_EQ(a.bfloat16_align, b.bfloat16_align);
  EXPECT_EQ(a.device_size, b.device_size);
  EXPECT_EQ(a.shape_size, b.shape_size);
  EXPECT_EQ(a.view_size, b.view_size);
  EXPECT_EQ(a.tensor_size, b.tensor_size);
  EXPECT_EQ(a.buffer_size, b.buffer_size);
  EXPECT_EQ(a.half_size, 2u);
  EXPECT_EQ(a.bfloat16_size, 2u);
}

TEST(CrossCompiler, ConversionsGiveTheSameBits) {
  // Every 16-bit high half with a spread of low halves: all exponents,
  // ties, NaNs and infinities.
  std::vector<float> xs;
  for (std::uint32_t hi = 0; hi <= 0xffff; ++hi) {
    for (std::uint32_t lo : {0x0000u, 0x0fffu, 0x1000u, 0x1001u, 0x8000u, 0xc3a5u}) {
      const std::uint32_t u = hi << 16 | lo;
      float f;
      std::memcpy(&f, &u, 4);
      xs.push_back(f);
    }
  }
  const auto n = xs.size();
  std::vector<half> h_gpp(n), h_nvcc(n);
  std::vector<bfloat16> b_gpp(n), b_nvcc(n);
  std::vector<float> w_gpp(n), w_nvcc(n);
  convert_n(xs.data(), n, h_gpp.data());
  convert_n(xs.data(), n, b_gpp.data());
  convert_n(h_gpp.data(), n, w_gpp.data());
  nvcc_convert(xs.data(), n, h_nvcc.data(), b_nvcc.data(), w_nvcc.data());
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_EQ(to_bits(h_gpp[i]), to_bits(h_nvcc[i])) << i;
    ASSERT_EQ(to_bits(b_gpp[i]), to_bits(b_nvcc[i])) << i;
    ASSERT_EQ(to_bits(w_gpp[i]), to_bits(w_nvcc[i])) << i;
  }
}

TEST(CrossCompiler, ViewsPassBetweenCompilers) {
  Tensor<half> t({3, 5});
  fill_normal(t, 0.0f, 1.0f, 3);
  // nvcc's side reads the view g++ built, element by element.
  const double sum = nvcc_sum(t.view());
  double want = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) want += to_float(t.at(i));
  EXPECT_EQ(sum, want);
}

}  // namespace
}  // namespace mixprec::test

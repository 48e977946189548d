// SPDX-License-Identifier: Apache-2.0
// Narrow Linear layers on the GPU (at most 16 outputs: mixprec's own kernels,
// nn::set_narrow_linear, cuda/linear_kernels.cuh) against float64 sums of
// the same inputs, with an error bound that holds for any summation order:
// rounding to T (half an ulp) plus fp32 accumulation (n u32 sum |terms|). The
// same bound checks cuBLASLt's GEMMs with the setting off, and shapes the
// kernels do not take (in not a multiple of 4, 17 outputs). Also: the
// kernels really ran (no GEMM plan for their shapes), the same bits on every
// call and in a graph replay, bits from the CPU layer's within
// gpu_layer_compare.hpp's tolerances inside a fused Sequential. The setting
// is the process's: these tests have their own program.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "gpu_layer_compare.hpp"
#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

using nn::Activation;
using test::host;

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d[i] = to_float(v[i]);
  return d;
}

// Unit roundoff of T, and half its smallest subnormal (rounding near 0).
template <class T>
double unit_roundoff() {
  return std::is_same_v<T, float> ? std::ldexp(1.0, -24) : std::is_same_v<T, half> ? std::ldexp(1.0, -11)
                                                                                     : std::ldexp(1.0, -8);
}
template <class T>
double rounding_floor() {
  return std::is_same_v<T, float> ? std::ldexp(1.0, -150) : std::is_same_v<T, half> ? std::ldexp(1.0, -25)
                                                                                     : std::ldexp(1.0, -134);
}

// |got - exact| <= r u_T |exact| + 1.01 n u32 sum|terms| + floor, where
// exact is the float64 sum of n products (every product of two T values is
// exact in float64, and so is the sum to far below these bounds) and r = 1
// (round to nearest once). cuBLASLt's bf16 GEMMs get r = 2, one ulp: on an
// H100 (CUDA 13.0) they returned outputs and input gradients up to 0.73 of
// an ulp from the float64 sum, more than fp32 accumulation and one rounding
// allow (its heuristic keeps some bf16 split-K partial sums in bf16:
// bench_layers' partials16), while its fp16 GEMMs and mixprec's kernels
// stayed within r = 1.
template <class T>
void expect_within_bound(const std::vector<T>& got, const std::vector<double>& exact,
                         const std::vector<double>& abs_sum, std::int64_t n, const std::string& what,
                         bool cublaslt) {
  ASSERT_EQ(got.size(), exact.size()) << what;
  const double u32 = std::ldexp(1.0, -24);
  const double r = cublaslt && std::is_same_v<T, bfloat16> ? 2.0 : 1.0;
  int bad = 0;
  double worst = 0;  // the largest error as a fraction of the r = 1 bound
  for (std::size_t k = 0; k < got.size(); ++k) {
    const double g = to_float(got[k]);
    const double slack = 1.01 * static_cast<double>(n) * u32 * abs_sum[k] + rounding_floor<T>();
    const double bound = r * unit_roundoff<T>() * std::fabs(exact[k]) + slack;
    worst = std::max(worst, std::fabs(g - exact[k]) / (unit_roundoff<T>() * std::fabs(exact[k]) + slack));
    if (!(std::fabs(g - exact[k]) <= bound) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << k << "] = " << g << ", float64 " << exact[k] << ", bound " << bound;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": elements outside the bound";
  if (r > 1 && worst > 1) {  // what the allowance was needed for, in the log
    std::printf("  cuBLASLt bf16 %s: %.2f x the one-rounding bound\n", what.c_str(), worst);
  }
}

struct Case {
  std::int64_t batch, in, out;
};

// One Linear layer's forward and backward on the GPU against float64.
template <class T>
void linear_against_float64(const Case& c, Activation act, bool bias) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " " + nn::activation_name(act) + (bias ? " bias " : " no bias ") +
               std::to_string(c.batch) + "x" + std::to_string(c.in) + "->" + std::to_string(c.out) +
               (nn::nn_device_ops().narrow_linear() ? ", narrow on" : ", narrow off"));
  // Which tensors mixprec's kernels compute (the rest: cuBLASLt's GEMMs).
  const bool narrow = nn::nn_device_ops().narrow_linear() && c.out <= 16 && c.in % 4 == 0;
  nn::Linear<T> layer(c.in, c.out, act, bias, Device::cuda(0), 21);
  Tensor<T> x({c.batch, c.in}), dy({c.batch, c.out});
  fill_normal(x, 0, 1, 22);
  fill_normal(dy, 0, 1, 23);
  Tensor<T> gx = x.to(Device::cuda(0)), gdy = dy.to(Device::cuda(0)), gy({c.batch, c.out}, Device::cuda(0)),
            gdx({c.batch, c.in}, Device::cuda(0));
  if (bias) fill_normal(layer.bias(), 0, 1, 24);  // the layer starts its bias at 0
  layer.forward(gx.view(), gy.view(), {});
  layer.backward(gx.view(), gy.view(), gdy.view(), gdx.view(), {});
  const std::vector<double> xs = as_double(host<T>(x.view())), ws = as_double(host<T>(layer.weight().view()));
  const std::vector<double> bs = bias ? as_double(host<T>(layer.bias().view())) : std::vector<double>(c.out, 0.0);
  const std::vector<T> y = host<T>(gy.view());
  std::vector<double> exact(c.batch * c.out), abs_sum(c.batch * c.out);
  for (std::int64_t b = 0; b < c.batch; ++b) {
    for (std::int64_t o = 0; o < c.out; ++o) {
      double s = bs[o], a = std::fabs(bs[o]);
      for (std::int64_t i = 0; i < c.in; ++i) {
        s += xs[b * c.in + i] * ws[o * c.in + i];
        a += std::fabs(xs[b * c.in + i] * ws[o * c.in + i]);
      }
      exact[b * c.out + o] = act == Activation::relu ? std::max(s, 0.0) : s;
      abs_sum[b * c.out + o] = a;
    }
  }
  expect_within_bound(y, exact, abs_sum, c.in + 1, "y", !narrow);
  // dz = dy * relu'(y), exact in T (the factor is 0 or 1), as the layer takes it.
  std::vector<double> dz = as_double(host<T>(dy.view()));
  if (act == Activation::relu) {
    for (std::size_t k = 0; k < dz.size(); ++k) dz[k] = to_float(y[k]) > 0 ? dz[k] : 0.0;
  }
  std::vector<double> gw(c.out * c.in), gw_abs(c.out * c.in), gb(c.out), gb_abs(c.out);
  for (std::int64_t o = 0; o < c.out; ++o) {
    for (std::int64_t i = 0; i < c.in; ++i) {
      double s = 0, a = 0;
      for (std::int64_t b = 0; b < c.batch; ++b) {
        s += dz[b * c.out + o] * xs[b * c.in + i];
        a += std::fabs(dz[b * c.out + o] * xs[b * c.in + i]);
      }
      gw[o * c.in + i] = s;
      gw_abs[o * c.in + i] = a;
    }
    for (std::int64_t b = 0; b < c.batch; ++b) {
      gb[o] += dz[b * c.out + o];
      gb_abs[o] += std::fabs(dz[b * c.out + o]);
    }
  }
  expect_within_bound(host<T>(layer.grad_weight().view()), gw, gw_abs, c.batch, "grad weight", !narrow);
  if (bias) expect_within_bound(host<T>(layer.grad_bias().view()), gb, gb_abs, c.batch, "grad bias", !narrow);
  std::vector<double> dx(c.batch * c.in), dx_abs(c.batch * c.in);
  for (std::int64_t b = 0; b < c.batch; ++b) {
    for (std::int64_t i = 0; i < c.in; ++i) {
      for (std::int64_t o = 0; o < c.out; ++o) {
        dx[b * c.in + i] += dz[b * c.out + o] * ws[o * c.in + i];
        dx_abs[b * c.in + i] += std::fabs(dz[b * c.out + o] * ws[o * c.in + i]);
      }
    }
  }
  expect_within_bound(host<T>(gdx.view()), dx, dx_abs, c.out, "dx", true);
}

// The kernels' shapes: the examples' last layers, batches that leave warps
// without rows or end mid-way through a staged group of 32, features that
// end mid-block, 1 to 16 outputs; then two shapes they do not take.
const Case kCases[] = {{256, 1024, 10}, {1024, 4096, 10}, {1000, 784, 16}, {5, 132, 3},
                       {1, 4, 1},       {37, 12, 7},      {64, 783, 10},   {64, 1024, 17}};

template <class T>
void every_case() {
  int k = 0;
  for (const Case& c : kCases) {
    const Activation act = k % 2 == 0 ? Activation::none : Activation::relu;
    linear_against_float64<T>(c, act, k % 3 != 2);
    ++k;
  }
}

TEST(NarrowLinear, OffIsTheDefaultAndTheSettingRoundTrips) {
  MIXPREC_SKIP_WITHOUT_GPU();
  EXPECT_FALSE(nn::nn_device_ops().narrow_linear());
  nn::set_narrow_linear(true);
  EXPECT_TRUE(nn::nn_device_ops().narrow_linear());
  nn::set_narrow_linear(false);
  EXPECT_FALSE(nn::nn_device_ops().narrow_linear());
}

TEST(NarrowLinear, LayersWithinTheFloat64BoundBothWays) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (const bool narrow : {true, false}) {
    nn::set_narrow_linear(narrow);
    every_case<half>();
    every_case<bfloat16>();
    every_case<float>();
  }
  nn::set_narrow_linear(false);
}

// With the setting on, a narrow shape's forward and weight gradient plan no
// GEMM (the kernels ran); its input gradient, and every GEMM with it off, do.
TEST(NarrowLinear, TheKernelsRunInsteadOfGemms) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 48, in = 1028, out = 10;  // a shape no other test here uses
  const auto planned = [&] {
    int forward = 0, wgrad = 0, dx = 0;
    for (const nn::GemmPlanInfo& p : nn::nn_device_ops().gemm_plans()) {
      if (p.dtype != DType::float16) continue;
      if (p.m == out && p.n == batch && p.k == in) ++forward;
      if (p.m == in && p.n == out && p.k == batch) ++wgrad;
      if (p.m == in && p.n == batch && p.k == out) ++dx;
    }
    return std::vector<int>{forward, wgrad, dx};
  };
  const Case c{batch, in, out};
  nn::set_narrow_linear(true);
  linear_against_float64<half>(c, Activation::none, true);
  EXPECT_EQ(planned(), (std::vector<int>{0, 0, 1}));
  nn::set_narrow_linear(false);
  linear_against_float64<half>(c, Activation::none, true);
  EXPECT_EQ(planned(), (std::vector<int>{1, 1, 1}));
}

// The kernels' sums run in an order fixed by the shape: the same bits on
// every call and in a graph replay.
TEST(NarrowLinear, SameBitsEveryCallAndInAGraph) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_narrow_linear(true);
  nn::Linear<bfloat16> layer(784, 10, Activation::none, true, Device::cuda(0), 31);
  test::expect_same_bits_every_call(layer, 1000, 32);
  nn::Linear<half> relu(1024, 16, Activation::relu, true, Device::cuda(0), 33);
  test::expect_same_bits_every_call(relu, 256, 34);
}

// In a Sequential whose backward is fused (the last layer's input-gradient
// GEMM applies the previous layer's ReLU or GELU derivative and writes its
// bias gradient), a narrow last layer gives the CPU's gradients.
TEST(NarrowLinear, FusedSequentialGivesTheCpuResults) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_narrow_linear(true);
  for (auto [first, second] : {std::pair{Activation::relu, Activation::gelu},
                               std::pair{Activation::gelu, Activation::relu}}) {
    test::fused_case<half>(first, second, 200, 96);
    test::fused_case<bfloat16>(first, second, 128, 64);
    test::fused_case<float>(first, second, 72, 40);
  }
}

}  // namespace
}  // namespace mixprec

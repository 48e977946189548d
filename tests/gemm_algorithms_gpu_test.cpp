// SPDX-License-Identifier: Apache-2.0
// nn::GemmAlgorithms on the GPU: Linear layers whose cuBLASLt algorithm was
// chosen by timing its candidates give the CPU layer's results (within
// gpu_layer_compare.hpp's tolerances, as in nn_gpu_test; the CPU layer is
// checked against float64 finite differences in nn_test), the same bits on
// every call and in a graph replay, report plans that follow the stated
// rule, and a shape first met inside a capture is refused with an error
// naming it. The setting is the process's: these tests have their own
// program.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "gpu_layer_compare.hpp"
#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

using nn::Activation;
using test::host;
using nn::GemmAlgorithms;

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// One Linear layer on the CPU and the GPU from the same seed: forward and
// backward, every output against the CPU's.
template <class T>
void linear_against_cpu(std::int64_t batch, std::int64_t in, std::int64_t out, Activation act) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " " + nn::activation_name(act) + " " + std::to_string(batch) +
               "x" + std::to_string(in) + "->" + std::to_string(out));
  nn::Linear<T> cpu(in, out, act, true, Device::cpu(), 5), gpu(in, out, act, true, Device::cuda(0), 5);
  Tensor<T> x({batch, in});
  fill_normal(x, 0, 1, 1);
  test::compare_layer<T>(cpu, gpu, x, 2);
}

template <class T>
void mlp_shapes_against_cpu() {
  linear_against_cpu<T>(256, 784, 1024, Activation::relu);  // the MLP example's layers
  linear_against_cpu<T>(256, 1024, 10, Activation::none);
  linear_against_cpu<T>(33, 40, 10, Activation::gelu);      // odd batch, GELU not fused
  linear_against_cpu<T>(64, 96, 128, Activation::gelu);
}

// The rule the plans must follow: for 16-bit types no split-K partial sums
// in 16 bits; heuristic plans timed nothing; a timed plan kept the fastest
// candidate when it beat the heuristic's first by 3%, else the first.
void expect_plans_follow(GemmAlgorithms how) {
  const std::vector<nn::GemmPlanInfo> plans = nn::nn_device_ops().gemm_plans();
  ASSERT_FALSE(plans.empty());
  for (const nn::GemmPlanInfo& p : plans) {
    SCOPED_TRACE(std::string(dtype_name(p.dtype)) + " m = " + std::to_string(p.m) + ", n = " + std::to_string(p.n) +
                 ", k = " + std::to_string(p.k) + ", epilogue " + std::to_string(p.epilogue));
    EXPECT_GE(p.m, 1);
    EXPECT_GE(p.chosen, 0);
    EXPECT_LT(p.chosen, p.candidates);
    EXPECT_GE(p.split_k, 1);
    if (p.dtype != DType::float32) {
      // CUBLASLT_REDUCTION_SCHEME_NONE (0) or _COMPUTE_TYPE (2): fp32 partial sums.
      EXPECT_TRUE(p.reduction_scheme == 0u || p.reduction_scheme == 2u) << "scheme " << p.reduction_scheme;
    }
    if (how == GemmAlgorithms::heuristic) {
      EXPECT_EQ(p.candidates, 1);
      EXPECT_EQ(p.timed, 0);
      EXPECT_EQ(p.first_us, 0.0);
      EXPECT_EQ(p.fastest_us, 0.0);
      EXPECT_EQ(p.chosen_us, 0.0);
      continue;
    }
    EXPECT_GE(p.timed, 1);
    EXPECT_LE(p.timed, p.candidates);
    EXPECT_GT(p.fastest_us, 0.0);
    EXPECT_LE(p.fastest_us, p.chosen_us);
    if (p.chosen == 0) {
      EXPECT_GT(p.first_us, 0.0);
      EXPECT_EQ(p.chosen_us, p.first_us);
      EXPECT_GE(p.fastest_us, 0.97 * p.first_us);  // not beaten by the margin
    } else {
      EXPECT_EQ(p.chosen_us, p.fastest_us);
      if (p.first_us > 0) {  // 0: the first could not run
        EXPECT_LT(p.chosen_us, 0.97 * p.first_us);
      }
    }
  }
}

TEST(GemmAlgorithms, TimedLayersGiveTheCpuResults) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_narrow_linear(false);  // the layers of 10 and 16 outputs through cuBLASLt too
  nn::set_gemm_algorithms(GemmAlgorithms::timed);
  EXPECT_EQ(nn::nn_device_ops().gemm_algorithms(), GemmAlgorithms::timed);
  mlp_shapes_against_cpu<half>();
  mlp_shapes_against_cpu<bfloat16>();
  mlp_shapes_against_cpu<float>();
  // Sequential's fused backward: the DRELU / DGELU (+ BGRAD) and RELU_AUX
  // epilogues, timed too.
  for (auto [first, second] : {std::pair{Activation::relu, Activation::gelu},
                               std::pair{Activation::gelu, Activation::relu}}) {
    test::fused_case<half>(first, second, 200, 96);
    test::fused_case<bfloat16>(first, second, 128, 64);
    test::fused_case<float>(first, second, 72, 40);
  }
  expect_plans_follow(GemmAlgorithms::timed);
  // Some shape had a choice (the MLP's 1024 x 256 GEMMs have several
  // candidates on any GPU cuBLASLt supports).
  const std::vector<nn::GemmPlanInfo> plans = nn::nn_device_ops().gemm_plans();
  EXPECT_TRUE(std::any_of(plans.begin(), plans.end(), [](const nn::GemmPlanInfo& p) { return p.candidates > 1; }));
}

TEST(GemmAlgorithms, HeuristicPlansAndSwitchingPlansAgain) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_narrow_linear(false);
  nn::set_gemm_algorithms(GemmAlgorithms::heuristic);
  EXPECT_TRUE(nn::nn_device_ops().gemm_plans().empty());  // the timed ones went out of use
  mlp_shapes_against_cpu<half>();
  expect_plans_follow(GemmAlgorithms::heuristic);
  const std::size_t heuristic_plans = nn::nn_device_ops().gemm_plans().size();
  nn::set_gemm_algorithms(GemmAlgorithms::heuristic);  // the same setting: kept
  EXPECT_EQ(nn::nn_device_ops().gemm_plans().size(), heuristic_plans);
  nn::set_gemm_algorithms(GemmAlgorithms::timed);
  EXPECT_TRUE(nn::nn_device_ops().gemm_plans().empty());
  mlp_shapes_against_cpu<half>();
  EXPECT_EQ(nn::nn_device_ops().gemm_plans().size(), heuristic_plans);
  expect_plans_follow(GemmAlgorithms::timed);
}

// Once chosen, an algorithm stays: eager calls and a graph replay give the
// bits of the call that chose it.
TEST(GemmAlgorithms, TimedChoiceKeepsItsBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_gemm_algorithms(GemmAlgorithms::timed);
  nn::Linear<bfloat16> layer(1024, 512, Activation::relu, true, Device::cuda(0), 7);
  test::expect_same_bits_every_call(layer, 256, 3);  // the first call chooses (waiting while it times)
}

TEST(GemmAlgorithms, TimedShapeFirstMetInACaptureIsRefused) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_gemm_algorithms(GemmAlgorithms::timed);
  linear_against_cpu<half>(16, 24, 32, Activation::none);  // handle and workspace made outside the capture
  nn::Linear<half> layer(40, 24, Activation::none, true, Device::cuda(0), 9);  // a shape not met yet
  Tensor<half> gx({48, 40}, Device::cuda(0)), gy({48, 24}, Device::cuda(0));
  fill_normal(gx, 0, 1, 5);
  const std::size_t before = nn::nn_device_ops().gemm_plans().size();
  Stream stream;
  Graph graph;
  try {
    graph.capture(stream.get(), [&] { layer.forward(gx.view(), gy.view(), nn::Context{stream.get()}); });
    FAIL() << "a timed shape was planned inside a capture";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("inside a CUDA graph capture"), std::string::npos) << what;
    EXPECT_NE(what.find("m = 24, n = 48, k = 40"), std::string::npos) << what;
  }
  EXPECT_EQ(nn::nn_device_ops().gemm_plans().size(), before);  // nothing half-planned
  // Met once eagerly, the same shape captures and replays.
  layer.forward(gx.view(), gy.view(), nn::Context{stream.get()});
  stream.synchronize();
  const std::vector<half> eager = host<half>(gy.view());
  fill_normal(gy, 0, 1, 6);
  graph.capture(stream.get(), [&] { layer.forward(gx.view(), gy.view(), nn::Context{stream.get()}); });
  graph.replay(stream.get());
  stream.synchronize();
  EXPECT_TRUE(same_bits(host<half>(gy.view()), eager));
}

TEST(GemmAlgorithms, NotAValueIsRefusedAndChangesNothing) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::set_gemm_algorithms(GemmAlgorithms::heuristic);
  try {
    nn::set_gemm_algorithms(static_cast<GemmAlgorithms>(7));
    FAIL() << "GemmAlgorithms 7 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("how = 7"), std::string::npos) << e.what();
  }
  try {  // the kernels' own check, reached without the free function's
    nn::nn_device_ops().set_gemm_algorithms(static_cast<GemmAlgorithms>(7));
    FAIL() << "NnOps took GemmAlgorithms 7";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("how = 7"), std::string::npos) << e.what();
  }
  EXPECT_EQ(nn::nn_device_ops().gemm_algorithms(), GemmAlgorithms::heuristic);
}

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// Pass 1 on the GPU (cuda::GradCheck) against float64 sums on the host:
// mixed dtypes and sizes (zero, one element, chunk boundaries, > 2^31
// elements), fault injection, unaligned pointers, determinism and graph
// replay.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/cuda/grad_check.cuh"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

// A list of device gradients with host copies for the reference.
struct Grads {
  std::vector<Tensor<half>> h;
  std::vector<Tensor<bfloat16>> b;
  std::vector<Tensor<float>> f;
  std::vector<TensorRef> refs;
  std::vector<double> want;  // float64 sum of squares of each tensor

  explicit Grads(const std::vector<std::int64_t>& sizes) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const Shape shape({sizes[i]});
      const std::uint64_t seed = 1000 + i;
      switch (i % 3) {
        case 0: add(h, shape, seed); break;
        case 1: add(b, shape, seed); break;
        default: add(f, shape, seed); break;
      }
    }
  }
  template <class T>
  void add(std::vector<Tensor<T>>& store, const Shape& shape, std::uint64_t seed) {
    Tensor<T> host(shape);
    fill_normal(host, 0.0f, 300.0f, seed);
    double s = 0;
    for (std::int64_t e = 0; e < host.numel(); ++e) s += std::pow(static_cast<double>(to_float(host.at(e))), 2);
    want.push_back(s);
    store.push_back(host.to(Device::cuda(0)));
    refs.push_back(store.back());
  }
};

void expect_sums(const cuda::GradCheck::Host& got, const std::vector<double>& want) {
  ASSERT_EQ(got.sum_squares.size(), want.size());
  double total = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    // Float partials within a chunk: a few float roundings of relative error.
    EXPECT_NEAR(got.sum_squares[i], want[i], 1e-5 * want[i]) << "tensor " << i;
    total += want[i];
  }
  EXPECT_NEAR(got.total_sum_squares, total, 1e-5 * total);
}

const std::vector<std::int64_t> kSizes = {0, 1, 7, 65536, 65537, 3 * 65536 + 5, 0, (1 << 20) + 3, 33};

TEST(GradCheckGpu, SumsAndFlagsMatchFloat64) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Grads g(kSizes);
  cuda::TensorList list(g.refs);
  cuda::GradCheck check(list);
  check.launch(list);
  const auto got = check.read();
  expect_sums(got, g.want);
  EXPECT_FALSE(got.found_inf);
  for (int bad : got.nonfinite) EXPECT_EQ(bad, 0);
}

TEST(GradCheckGpu, FindsEveryInjectedValueAndNamesItsTensor) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Grads g(kSizes);
  cuda::TensorList list(g.refs);
  cuda::GradCheck check(list);
  const int last = static_cast<int>(kSizes.size()) - 1;  // float32 (index 8 % 3 == 2)
  const int big = 7;                                      // bfloat16, 2^20 + 3 elements
  struct Case {
    int tensor;
    std::int64_t element;
  };
  const std::vector<Case> cases = {{last, 0}, {last, 16}, {last, 32}, {big, 0}, {big, 65535}, {big, 65536},
                                   {big, (1 << 20) + 2}, {5, 2 * 65536 + 1}, {1, 0}};
  for (const Case& c : cases) {
    for (const float value : {INFINITY, -INFINITY, NAN}) {
      const TensorRef& t = g.refs[c.tensor];
      // Write one element on the device, check, restore.
      std::vector<char> saved(dtype_size(t.dtype()));
      char* where = static_cast<char*>(t.data()) + c.element * dtype_size(t.dtype());
      MIXPREC_CUDA_CHECK(cudaMemcpy(saved.data(), where, saved.size(), cudaMemcpyDeviceToHost));
      t.visit([&](auto view) {
        using T = typename decltype(view)::value_type;
        const T bad = from_float<T>(value);
        MIXPREC_CUDA_CHECK(cudaMemcpy(where, &bad, sizeof(T), cudaMemcpyHostToDevice));
      });
      check.launch(list);
      const auto got = check.read();
      MIXPREC_CUDA_CHECK(cudaMemcpy(where, saved.data(), saved.size(), cudaMemcpyHostToDevice));
      EXPECT_TRUE(got.found_inf) << c.tensor << " " << c.element << " " << value;
      for (int i = 0; i < static_cast<int>(kSizes.size()); ++i) {
        EXPECT_EQ(got.nonfinite[i], i == c.tensor ? 1 : 0) << "injected into " << c.tensor << " at "
                                                           << c.element << ", tensor " << i;
      }
    }
  }
  check.launch(list);
  EXPECT_FALSE(check.read().found_inf);  // restored, and nothing stuck from before
}

TEST(GradCheckGpu, UnalignedPointersGiveTheSameResults) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t n = 3 * 65536 + 11;
  Tensor<half> hh({n + 8});
  Tensor<float> hf({n + 8});
  fill_normal(hh, 0, 10, 5);
  fill_normal(hf, 0, 10, 6);
  Tensor<half> dh = hh.to(Device::cuda(0));
  Tensor<float> df = hf.to(Device::cuda(0));
  for (const int offset_bytes : {0, 2, 4, 8}) {
    std::vector<TensorRef> refs;
    std::vector<double> want;
    const std::int64_t oh = offset_bytes / 2, of = offset_bytes / 4;
    refs.push_back(TensorView<half>(dh.data() + oh, {n}, Device::cuda(0)));
    double s = 0;
    for (std::int64_t e = 0; e < n; ++e) s += std::pow(static_cast<double>(to_float(hh.at(e + oh))), 2);
    want.push_back(s);
    if (offset_bytes % 4 == 0) {
      refs.push_back(TensorView<float>(df.data() + of, {n}, Device::cuda(0)));
      double t = 0;
      for (std::int64_t e = 0; e < n; ++e) t += std::pow(static_cast<double>(hf.at(e + of)), 2);
      want.push_back(t);
    }
    cuda::TensorList list(refs);
    cuda::GradCheck check(list);
    check.launch(list);
    expect_sums(check.read(), want);
  }
}

TEST(GradCheckGpu, DeterministicAndReplayableInAGraph) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Grads g(kSizes);
  cuda::TensorList list(g.refs);
  cuda::GradCheck check(list);
  cudaStream_t stream;
  MIXPREC_CUDA_CHECK(cudaStreamCreate(&stream));
  check.launch(list, stream);
  const auto eager = check.read(stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MIXPREC_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  check.launch(list, stream);
  MIXPREC_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MIXPREC_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 20; ++replay) {
    MIXPREC_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    const auto again = check.read(stream);
    ASSERT_EQ(again.total_sum_squares, eager.total_sum_squares) << "replay " << replay;
    ASSERT_EQ(again.sum_squares, eager.sum_squares);
  }
  MIXPREC_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MIXPREC_CUDA_CHECK(cudaGraphDestroy(graph));
  MIXPREC_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(GradCheckGpu, OneTensorBeyond2Pow31Elements) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t n = (std::int64_t{1} << 31) + 5;  // 4 GiB of half
  Tensor<half> g({n}, Device::cuda(0));
  fill(g, 1.0f);
  Tensor<float> small({3}, Device::cuda(0));
  fill(small, 2.0f);
  cuda::TensorList list({small, g});
  cuda::GradCheck check(list);
  check.launch(list);
  auto got = check.read();
  EXPECT_EQ(got.sum_squares[1], static_cast<double>(n));  // exact: chunk partials are exact integers
  EXPECT_EQ(got.sum_squares[0], 12.0);
  EXPECT_FALSE(got.found_inf);
  const half nan = from_float<half>(NAN);
  MIXPREC_CUDA_CHECK(cudaMemcpy(g.data() + (n - 1), &nan, sizeof(half), cudaMemcpyHostToDevice));
  check.launch(list);
  got = check.read();
  EXPECT_TRUE(got.found_inf);
  EXPECT_EQ(got.nonfinite[1], 1);
  EXPECT_EQ(got.nonfinite[0], 0);
}

}  // namespace
}  // namespace mixprec

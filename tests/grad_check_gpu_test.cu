// SPDX-License-Identifier: Apache-2.0
// Pass 1 on the GPU (cuda::GradCheck) against float64 sums on the host:
// mixed dtypes and sizes (zero, one element, chunk boundaries, > 2^31
// elements), fault injection, unaligned pointers (each load path against a
// host emulation of its summation order; exact sums where the order cannot
// matter; flags against the aligned run), determinism and graph replay.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check_order.hpp"
#include "gpu_skip.hpp"
#include "mixprec/cuda/grad_check.cuh"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

using test::emulate_sum_squares;

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

// Host values of the three tensors UnalignedPointersGiveTheSameResults checks.
struct HostGrads {
  std::vector<half> h;
  std::vector<bfloat16> b;
  std::vector<float> f;
};

struct OffsetRun {
  cuda::GradCheck::Host got;
  int slices = 0;  // the check's slices per chunk
};

// One check pass over an fp16, a bf16 and an fp32 tensor holding `g`, whose
// data start `offset_bytes` past a cudaMalloc'ed (256-byte aligned) address:
// 16-byte vector loads at offset 0, the scalar loop otherwise. fp32 needs 4
// bytes of alignment, so an offset of 2 places the floats at 4.
OffsetRun check_at_offset(const HostGrads& g, int offset_bytes) {
  const auto n = static_cast<std::int64_t>(g.h.size());
  Tensor<half> dh({n + 8}, Device::cuda(0));
  Tensor<bfloat16> db({n + 8}, Device::cuda(0));
  Tensor<float> df({n + 8}, Device::cuda(0));
  const int float_offset = offset_bytes % 4 == 0 ? offset_bytes : offset_bytes + 2;
  half* ph = dh.data() + offset_bytes / 2;
  bfloat16* pb = db.data() + offset_bytes / 2;
  float* pf = df.data() + float_offset / 4;
  for (const void* p : {static_cast<const void*>(ph), static_cast<const void*>(pb), static_cast<const void*>(pf)}) {
    // The path under test: vector loads exactly when the offset is 0.
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % 16 == 0, offset_bytes == 0) << "offset " << offset_bytes;
  }
  MIXPREC_CUDA_CHECK(cudaMemcpy(ph, g.h.data(), g.h.size() * sizeof(half), cudaMemcpyHostToDevice));
  MIXPREC_CUDA_CHECK(cudaMemcpy(pb, g.b.data(), g.b.size() * sizeof(bfloat16), cudaMemcpyHostToDevice));
  MIXPREC_CUDA_CHECK(cudaMemcpy(pf, g.f.data(), g.f.size() * sizeof(float), cudaMemcpyHostToDevice));
  cuda::TensorList list({TensorView<half>(ph, {n}, Device::cuda(0)), TensorView<bfloat16>(pb, {n}, Device::cuda(0)),
                         TensorView<float>(pf, {n}, Device::cuda(0))});
  cuda::GradCheck check(list);
  check.launch(list);
  return {check.read(), check.slices()};
}

// The same values at byte offsets 0, 2, 4, 8 and 12: offset 0 takes the
// 16-byte vector loads of accumulate_range, every other offset the scalar
// loop. The two paths give the threads different elements in a different
// order (a thread takes 8 consecutive fp16/bf16 or 4 fp32 elements per load,
// loads strided over the block, then the tail; or single elements, strided),
// so for arbitrary values the aligned and unaligned sums differ in their
// last bits, by design. Each path's order is fixed, though (explicit FMAs,
// slices from the list alone), so:
//  1. Normal values: every run equals, bit for bit, a host emulation of the
//     order its own path uses (emulate_sum_squares), per tensor and in
//     total; the unaligned runs (one path) are bit-identical to each other;
//     all are within 1e-5 of float64.
//  2. Values on a grid where every partial sum is exact (k / 16, |k| <= 7:
//     squares are multiples of 2^-8 and a tensor's sum stays below 2^24 of
//     them): any order gives the exact sum, so every run gives the aligned
//     run's bits and the float64 sum exactly, without the emulation.
//  3. inf/NaN at first, last, chunk-boundary, vector-tail and interior
//     elements: the flags and found_inf of every run equal the aligned
//     run's and the injected pattern.
TEST(GradCheckGpu, UnalignedPointersGiveTheSameResults) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t n = 3 * 65536 + 11;  // 3 full chunks and one of 11: vector tails too
  const int offsets[] = {0, 2, 4, 8, 12};

  HostGrads g;
  Tensor<half> hh({n});
  Tensor<bfloat16> hb({n});
  Tensor<float> hf({n});
  fill_normal(hh, 0, 10, 5);
  fill_normal(hb, 0, 10, 7);
  fill_normal(hf, 0, 10, 6);
  g.h.assign(hh.data(), hh.data() + n);
  g.b.assign(hb.data(), hb.data() + n);
  g.f.assign(hf.data(), hf.data() + n);

  {  // 1. normal values against the emulation of each path
    SCOPED_TRACE("normal values");
    std::vector<std::vector<float>> x(3);
    for (std::int64_t e = 0; e < n; ++e) {
      x[0].push_back(to_float(g.h[e]));
      x[1].push_back(to_float(g.b[e]));
      x[2].push_back(g.f[e]);
    }
    std::vector<double> want(3, 0.0);
    for (int t = 0; t < 3; ++t) {
      for (const float v : x[t]) want[t] += static_cast<double>(v) * v;
    }
    const int per_vector[3] = {8, 8, 4};
    std::vector<cuda::GradCheck::Host> unaligned;
    for (const int offset : offsets) {
      SCOPED_TRACE("offset " + std::to_string(offset));
      const OffsetRun run = check_at_offset(g, offset);
      ASSERT_EQ(run.got.sum_squares.size(), 3u);
      double total = 0;
      for (int t = 0; t < 3; ++t) {
        const double emulated = emulate_sum_squares(x[t], run.slices, offset == 0 ? per_vector[t] : 0);
        EXPECT_EQ(std::memcmp(&run.got.sum_squares[t], &emulated, sizeof(double)), 0)
            << "tensor " << t << ": " << run.got.sum_squares[t] << " vs emulated " << emulated;
        total += emulated;
      }
      EXPECT_EQ(run.got.total_sum_squares, total);
      expect_sums(run.got, want);
      EXPECT_EQ(run.got.nonfinite, std::vector<int>(3, 0));
      EXPECT_FALSE(run.got.found_inf);
      if (offset == 0) continue;
      if (!unaligned.empty()) {
        EXPECT_EQ(run.got.sum_squares, unaligned.front().sum_squares);
        EXPECT_EQ(run.got.total_sum_squares, unaligned.front().total_sum_squares);
      }
      unaligned.push_back(run.got);
    }
  }

  {  // 2. exact sums: every path gives the same bits
    SCOPED_TRACE("grid values");
    HostGrads grid;
    double want[3] = {0, 0, 0};
    std::mt19937 rng(5);
    auto next = [&](double& sum) {
      const auto k = static_cast<float>(1 + rng() % 7);
      const float v = (rng() % 2 ? -k : k) / 16.0f;
      sum += static_cast<double>(v) * v;
      return v;
    };
    for (std::int64_t e = 0; e < n; ++e) {
      grid.h.push_back(from_float<half>(next(want[0])));
      grid.b.push_back(from_float<bfloat16>(next(want[1])));
      grid.f.push_back(next(want[2]));
    }
    const cuda::GradCheck::Host aligned = check_at_offset(grid, 0).got;
    for (const int offset : offsets) {
      const cuda::GradCheck::Host got = check_at_offset(grid, offset).got;
      for (int t = 0; t < 3; ++t) {
        EXPECT_EQ(got.sum_squares[t], want[t]) << "offset " << offset << ", tensor " << t;
        EXPECT_EQ(got.sum_squares[t], aligned.sum_squares[t]) << "offset " << offset << ", tensor " << t;
      }
      EXPECT_EQ(got.total_sum_squares, want[0] + want[1] + want[2]) << "offset " << offset;
      EXPECT_EQ(got.nonfinite, std::vector<int>(3, 0)) << "offset " << offset;
      EXPECT_FALSE(got.found_inf);
    }
  }

  // 3. flags. Tensors: 0 fp16, 1 bf16, 2 fp32. The last chunk holds 11
  // elements; on the aligned path its last 3 are read by no vector load.
  struct Bad {
    int tensor;
    std::int64_t element;
    float value;
  };
  const std::vector<std::vector<Bad>> cases = {
      {{0, 0, INFINITY}},
      {{0, n - 1, NAN}},
      {{1, 65536, -INFINITY}},
      {{1, n - 4, NAN}},
      {{2, 5, INFINITY}},
      {{2, 2 * 65536 - 1, NAN}},
      {{0, 3 * 65536 + 8, -INFINITY}, {2, n - 1, NAN}},
  };
  for (const auto& bad : cases) {
    HostGrads c = g;
    std::vector<int> flags(3, 0);
    std::string what;
    for (const Bad& x : bad) {
      if (x.tensor == 0) c.h[x.element] = from_float<half>(x.value);
      if (x.tensor == 1) c.b[x.element] = from_float<bfloat16>(x.value);
      if (x.tensor == 2) c.f[x.element] = x.value;
      flags[x.tensor] = 1;
      what += " tensor " + std::to_string(x.tensor) + "[" + std::to_string(x.element) +
              "] = " + std::to_string(x.value);
    }
    SCOPED_TRACE("injected:" + what);
    const cuda::GradCheck::Host aligned = check_at_offset(c, 0).got;
    EXPECT_EQ(aligned.nonfinite, flags);
    EXPECT_TRUE(aligned.found_inf);
    for (const int offset : offsets) {
      const cuda::GradCheck::Host got = check_at_offset(c, offset).got;
      EXPECT_EQ(got.nonfinite, aligned.nonfinite) << "offset " << offset;
      EXPECT_EQ(got.found_inf, aligned.found_inf) << "offset " << offset;
    }
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

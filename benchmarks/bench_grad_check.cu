// SPDX-License-Identifier: Apache-2.0
// Pass 1 on the GPU (cuda::GradCheck): fp16 gradients in a model-like list
// (1M-element weights alternating with 1024-element biases) at 2^24, 2^27
// and 2^30 parameters. Reads 2 bytes per parameter; reports GB/s and the
// fraction of a device-to-device copy measured in the same run. CUDA events,
// manual time.
#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "mixprec/cuda/grad_check.cuh"
#include "mixprec/mixprec.hpp"

namespace {

struct Events {
  cudaEvent_t start, stop;
  Events() {
    MIXPREC_CUDA_CHECK(cudaEventCreate(&start));
    MIXPREC_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  double ms() {
    MIXPREC_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    MIXPREC_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    return t;
  }
};

// Device copy of 1 GiB: bytes read + written per second.
void BM_device_copy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{1} << 30;
  mixprec::Buffer a(bytes, mixprec::Device::cuda(0)), b(bytes, mixprec::Device::cuda(0));
  MIXPREC_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
  Events e;
  for (auto _ : state) {
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.start));
    MIXPREC_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice));
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.stop));
    state.SetIterationTime(e.ms() / 1e3);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(2 * bytes));
  state.counters["GBps"] = benchmark::Counter(2.0 * bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_grad_check(benchmark::State& state) {
  if (mixprec::cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const std::int64_t n = state.range(0);
  std::vector<std::unique_ptr<mixprec::Tensor<mixprec::half>>> grads;
  std::vector<mixprec::TensorRef> refs;
  for (std::int64_t left = n, k = 0; left > 0; ++k) {
    const std::int64_t size = std::min<std::int64_t>(left, k % 2 ? 1024 : (1 << 20) - 1024);
    grads.push_back(std::make_unique<mixprec::Tensor<mixprec::half>>(mixprec::Shape{size}, mixprec::Device::cuda(0)));
    mixprec::fill(*grads.back(), 0.5f);  // finite, non-zero
    refs.push_back(*grads.back());
    left -= size;
  }
  mixprec::cuda::TensorList list(refs);
  mixprec::cuda::GradCheck check(list);
  for (int i = 0; i < 3; ++i) check.launch(list);
  Events e;
  for (auto _ : state) {
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.start));
    check.launch(list);
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.stop));
    state.SetIterationTime(e.ms() / 1e3);
  }
  const double bytes = 2.0 * static_cast<double>(n);
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tensors"] = static_cast<double>(refs.size());
}

BENCHMARK(BM_device_copy)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50);
BENCHMARK(BM_grad_check)
    ->Arg(1 << 24)->Arg(1 << 27)->Arg(1 << 30)
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50)->Repetitions(3)
    ->ReportAggregatesOnly(true);

}  // namespace

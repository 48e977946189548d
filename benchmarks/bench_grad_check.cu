// SPDX-License-Identifier: Apache-2.0
// Pass 1 on the GPU (cuda::GradCheck): fp16 gradients in a model-like list
// (1M-element weights alternating with 1024-element biases) at 2^21 (the
// size of the MLP example), 2^24, 2^27 and 2^30 parameters; and the same
// pass counting the monitor's exponent histograms (normal gradients, so
// the counts spread over bins as real ones do). Reads 2 bytes per
// parameter; reports GB/s and the fraction of a device-to-device copy
// measured in the same run. CUDA events, manual time.
#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "gpu_bench.cuh"
#include "mixprec/cuda/grad_check.cuh"
#include "model_list.hpp"
#include "mixprec/mixprec.hpp"

namespace {

using mixprec::bench::BM_device_copy;
using mixprec::bench::time_steps;

void run_check(benchmark::State& state, bool histogram) {
  if (mixprec::cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const std::int64_t n = state.range(0);
  std::vector<std::unique_ptr<mixprec::Tensor<mixprec::half>>> grads;
  std::vector<mixprec::TensorRef> refs;
  for (const std::int64_t size : mixprec::bench::model_tensor_sizes(n)) {
    grads.push_back(std::make_unique<mixprec::Tensor<mixprec::half>>(mixprec::Shape{size}, mixprec::Device::cuda(0)));
    if (histogram) {
      mixprec::fill_normal(*grads.back(), 0.0f, 1e-2f, refs.size());
    } else {
      mixprec::fill(*grads.back(), 0.5f);  // finite, non-zero
    }
    refs.push_back(*grads.back());
  }
  mixprec::cuda::TensorList list(refs);
  mixprec::cuda::GradCheck check(list);
  mixprec::Buffer bins(histogram ? refs.size() * 64 * sizeof(std::uint64_t) : 0, mixprec::Device::cuda(0));
  auto* hist = histogram ? static_cast<std::uint64_t*>(bins.data()) : nullptr;
  for (int i = 0; i < 3; ++i) check.launch(list, nullptr, hist);
  time_steps(state, [&] { check.launch(list, nullptr, hist); });
  const double bytes = 2.0 * static_cast<double>(n);
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tensors"] = static_cast<double>(refs.size());
}

void BM_grad_check(benchmark::State& state) { run_check(state, false); }
void BM_grad_check_histogram(benchmark::State& state) { run_check(state, true); }

BENCHMARK(BM_device_copy)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50);
BENCHMARK(BM_grad_check)
    ->Arg(1 << 21)->Arg(1 << 24)->Arg(1 << 27)->Arg(1 << 30)
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50)->Repetitions(3)
    ->ReportAggregatesOnly(true);
BENCHMARK(BM_grad_check_histogram)
    ->Arg(1 << 21)->Arg(1 << 24)->Arg(1 << 27)
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50)->Repetitions(3)
    ->ReportAggregatesOnly(true);

}  // namespace

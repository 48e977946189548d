// SPDX-License-Identifier: Apache-2.0
// Pass 1 on the GPU (cuda::GradCheck): fp16 gradients in a model-like list
// (1M-element weights alternating with 1024-element biases) at 2^24, 2^27
// and 2^30 parameters. Reads 2 bytes per parameter; reports GB/s and the
// fraction of a device-to-device copy measured in the same run. CUDA events,
// manual time.
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

void BM_grad_check(benchmark::State& state) {
  if (mixprec::cuda_device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const std::int64_t n = state.range(0);
  std::vector<std::unique_ptr<mixprec::Tensor<mixprec::half>>> grads;
  std::vector<mixprec::TensorRef> refs;
  for (const std::int64_t size : mixprec::bench::model_tensor_sizes(n)) {
    grads.push_back(std::make_unique<mixprec::Tensor<mixprec::half>>(mixprec::Shape{size}, mixprec::Device::cuda(0)));
    mixprec::fill(*grads.back(), 0.5f);  // finite, non-zero
    refs.push_back(*grads.back());
  }
  mixprec::cuda::TensorList list(refs);
  mixprec::cuda::GradCheck check(list);
  for (int i = 0; i < 3; ++i) check.launch(list);
  time_steps(state, [&] { check.launch(list); });
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

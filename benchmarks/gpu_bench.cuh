// SPDX-License-Identifier: Apache-2.0
// Shared by the GPU benchmarks: CUDA-event timing and the device-copy
// bandwidth every GPU number is compared with.
#pragma once

#include <benchmark/benchmark.h>

#include <cstddef>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/tensor/memory.hpp"

namespace mixprec::bench {

/// A pair of CUDA events around the work of one iteration.
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
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  /// Seconds between the two events (waits for the second).
  double seconds() {
    MIXPREC_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MIXPREC_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms / 1e3;
  }
};

/// Times `step` (work queued on the default stream) with CUDA events in
/// every benchmark iteration: manual time, the events' elapsed time.
template <class Step>
void time_steps(benchmark::State& state, Step&& step) {
  Events e;
  for (auto _ : state) {
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.start));
    step();
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.stop));
    state.SetIterationTime(e.seconds());
  }
}

/// Device-to-device copy of 1 GiB: bytes read + written per second (GBps).
inline void BM_device_copy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{1} << 30;
  Buffer a(bytes, Device::cuda(0)), b(bytes, Device::cuda(0));
  MIXPREC_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
  time_steps(state, [&] { MIXPREC_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice)); });
  state.counters["GBps"] = benchmark::Counter(2.0 * bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace mixprec::bench

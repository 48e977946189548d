// SPDX-License-Identifier: Apache-2.0
// The CPU optimizer step as a training loop runs it: GradScaler::step (pass
// 1: non-finite check + norm; pass 2: unscale + update of fp32 master and
// state + fp16 weight write-back) and update(), on one thread, fp16 weights
// and gradients. Reports bytes/s for the bytes the step must move and the
// fraction of a same-size memcpy measured in the same run.
//   bench_optim [--benchmark_filter=AdamW]
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "model_list.hpp"

namespace {

using mixprec::half;

// Bytes per parameter: gradient read twice (check, update), master read and
// written, each fp32 state tensor read and written, the fp16 weight written.
constexpr double bytes_per_param(int state_tensors) { return 2 + 2 + 8 + 8.0 * state_tensors + 2; }

void BM_memcpy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{256} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  // Read + written, as for the optimizer.
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes) * 2);
  state.counters["GBps"] = benchmark::Counter(static_cast<double>(bytes) * 2 / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_memcpy)->Unit(benchmark::kMillisecond)->UseRealTime();

// A model-like list: one large weight per 1M elements plus small biases.
struct Model {
  std::vector<std::unique_ptr<mixprec::Tensor<half>>> weights, grads;
  std::vector<mixprec::optim::Param> params;
  explicit Model(std::int64_t n) {
    int k = 0;
    for (const std::int64_t size : mixprec::bench::model_tensor_sizes(n)) {
      weights.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}));
      grads.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}));
      mixprec::fill_normal(*weights.back(), 0, 1, 2 * k);
      mixprec::fill_normal(*grads.back(), 0, 100, 2 * k + 1);
      params.push_back({"p" + std::to_string(k), *weights.back(), *grads.back()});
      ++k;
    }
  }
};

template <class Opt>
void BM_step(benchmark::State& state, int state_tensors, typename Opt::options_type options) {
  const std::int64_t n = state.range(0);
  Model model(n);
  Opt opt(model.params, options);
  mixprec::amp::GradScaler scaler;
  for (auto _ : state) {
    scaler.step(opt);
    scaler.update();
  }
  const double bytes = bytes_per_param(state_tensors) * static_cast<double>(n);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["params"] = static_cast<double>(n);
}

mixprec::optim::SGDOptions sgd_momentum() {
  mixprec::optim::SGDOptions o;
  o.momentum = 0.9;
  return o;
}

void BM_SGD_momentum(benchmark::State& s) { BM_step<mixprec::optim::SGD>(s, 1, sgd_momentum()); }
void BM_Adam(benchmark::State& s) { BM_step<mixprec::optim::Adam>(s, 2, {}); }
void BM_AdamW(benchmark::State& s) { BM_step<mixprec::optim::AdamW>(s, 2, {}); }
void BM_RMSprop(benchmark::State& s) { BM_step<mixprec::optim::RMSprop>(s, 1, {}); }

#define MIXPREC_SIZES ->Arg(1 << 20)->Arg(1 << 24)->Unit(benchmark::kMillisecond)->UseRealTime()
BENCHMARK(BM_SGD_momentum) MIXPREC_SIZES;
BENCHMARK(BM_Adam) MIXPREC_SIZES;
BENCHMARK(BM_AdamW) MIXPREC_SIZES;
BENCHMARK(BM_RMSprop) MIXPREC_SIZES;

}  // namespace

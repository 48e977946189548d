// SPDX-License-Identifier: Apache-2.0
// The whole GPU optimizer step (pass 1 check + norms, pass 2 update, finish)
// over a model-like list (1M-element weights alternating with 1024-element
// biases) of fp16 weights and gradients with fp32 masters and state, from
// 2^21 to 2^30 parameters. Bytes per parameter: 2 (check) + 2
// (gradient) + 8 (master) + 8 per state tensor + 2 (weight). Reports GB/s and
// the fraction of a device-to-device copy measured in the same run.
// BM_<optimizer>_graph: the same step captured once in a CUDA graph and
// replayed, as the examples run it (no host launch cost in the time).
// BM_AdamW_monitored_graph: as the monitor's logged steps run it.
// BM_api_AdamW_layout: the host API step of AdamW on bf16 weights and
// gradients for each lean state layout (optim::StateLayout), its bytes per
// parameter counted from the layout. CUDA events, manual time.
#include <benchmark/benchmark.h>

#include <cstddef>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpu_bench.cuh"
#include "mixprec/cuda/grad_check.cuh"
#include "model_list.hpp"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/cuda/optimizer_step.cuh"
#include "mixprec/mixprec.hpp"

namespace {

using mixprec::bfloat16;
using mixprec::half;

using mixprec::bench::BM_device_copy;
using mixprec::bench::time_steps;

// Bytes a step moves per parameter with 16-bit weights and gradients and
// fp32 masters and state: see the file's first lines.
double fp32_bytes_per_param(int state_tensors) { return 2 + 2 + 8 + 8.0 * state_tensors + 2; }

// `graphed`: the step (check, update, scale) captured once in a CUDA graph
// on a stream and replayed kReplays times between two events an iteration,
// as the examples run it; otherwise each step is launched eagerly and timed
// alone, the host's launch cost included.
constexpr int kReplays = 10;

// `monitored`: every step as the instability monitor's logged step runs it
// (docs/monitor.md): the check pass with the exponent histograms and the
// update with the precursor sums (the second moment: state 1).
// `fused`: pass 1 and the update in one launch (launch_check_and_step, as
// DeviceGradScaler::step runs them when nothing comes between).
template <class Hyper>
void BM_step(benchmark::State& state, Hyper hyper, int state_tensors, double max_norm, bool graphed = false,
             bool monitored = false, bool fused = false) {
  const std::int64_t n = state.range(0);
  std::vector<std::unique_ptr<mixprec::Tensor<half>>> weights, grads;
  std::vector<std::unique_ptr<mixprec::Tensor<float>>> floats;
  std::vector<mixprec::TensorRef> refs;
  std::vector<mixprec::cuda::ParamEntry> entries;
  mixprec::Buffer steps, scalars(8 + sizeof(mixprec::amp::DeviceScalerState), mixprec::Device::cuda(0));
  const std::vector<std::int64_t> sizes = mixprec::bench::model_tensor_sizes(n);
  steps = mixprec::Buffer(sizes.size() * 8, mixprec::Device::cuda(0));
  MIXPREC_CUDA_CHECK(cudaMemset(steps.data(), 0, steps.bytes()));
  MIXPREC_CUDA_CHECK(cudaMemset(scalars.data(), 0, scalars.bytes()));
  auto device_floats = [&](std::int64_t size, float value) {
    floats.push_back(std::make_unique<mixprec::Tensor<float>>(mixprec::Shape{size}, mixprec::Device::cuda(0)));
    mixprec::fill(*floats.back(), value);
    return floats.back()->data();
  };
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    const std::int64_t size = sizes[k];
    weights.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}, mixprec::Device::cuda(0)));
    grads.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}, mixprec::Device::cuda(0)));
    mixprec::fill(*weights.back(), 0.25f);
    mixprec::fill(*grads.back(), 0.5f);
    float* s[3] = {nullptr, nullptr, nullptr};
    for (int t = 0; t < state_tensors; ++t) s[t] = device_floats(size, 0.0f);
    entries.push_back({weights.back()->data(), mixprec::DType::float16, device_floats(size, 0.25f),
                       {s[0], s[1], s[2]}, static_cast<std::int64_t*>(steps.data()) + k});
    if (monitored) {
      entries.back().v_state = 1;
      entries.back().eps2 = 1e-16f;
      entries.back().beta2 = 0.999;
    }
    refs.push_back(*grads.back());
  }
  mixprec::cuda::TensorList list(refs);
  mixprec::cuda::ParamList params(entries);
  mixprec::cuda::GradCheck check(list);
  auto* applied = static_cast<std::int64_t*>(scalars.data());
  auto* scaler = reinterpret_cast<mixprec::amp::DeviceScalerState*>(applied + 1);
  mixprec::amp::DeviceScalerState init;
  MIXPREC_CUDA_CHECK(cudaMemcpy(scaler, &init, sizeof init, cudaMemcpyHostToDevice));
  mixprec::cuda::StepInputs in;
  in.found_inf = check.found_inf();
  in.scale = &scaler->state.scale;
  in.total_sum_squares = max_norm > 0 ? check.total_sum_squares() : nullptr;
  in.max_norm = max_norm;
  in.applied_steps = applied;
  in.any_inf = &scaler->any_inf;
  mixprec::Buffer hist, sums;
  if (monitored) {
    hist = mixprec::Buffer(sizes.size() * 64 * sizeof(std::uint64_t), mixprec::Device::cuda(0));
    sums = mixprec::Buffer(sizes.size() * mixprec::optim::kPrecursorSums * sizeof(double), mixprec::Device::cuda(0));
    MIXPREC_CUDA_CHECK(cudaMemset(hist.data(), 0, hist.bytes()));
    MIXPREC_CUDA_CHECK(cudaMemset(sums.data(), 0, sums.bytes()));
    in.precursors = static_cast<double*>(sums.data());
  }
  mixprec::amp::ScalePolicy policy;
  mixprec::Stream stream;
  const cudaStream_t s = graphed ? stream.get() : nullptr;
  auto step = [&] {
    if (fused) {
      mixprec::cuda::launch_check_and_step(list, params, check, hyper, mixprec::optim::LRSchedule::constant(), in, s,
                                           monitored ? static_cast<std::uint64_t*>(hist.data()) : nullptr);
    } else {
      check.launch(list, s, monitored ? static_cast<std::uint64_t*>(hist.data()) : nullptr);
      mixprec::cuda::launch_step(list, params, hyper, mixprec::optim::LRSchedule::constant(), in, s);
    }
    mixprec::cuda::launch_update_scale(scaler, policy, true, s);
  };
  for (int i = 0; i < 3; ++i) step();
  if (graphed) {
    MIXPREC_CUDA_CHECK(cudaStreamSynchronize(s));
    mixprec::Graph graph;
    graph.capture(s, step);
    for (int i = 0; i < 3; ++i) graph.replay(s);
    mixprec::bench::Events e;
    for (auto _ : state) {
      MIXPREC_CUDA_CHECK(cudaEventRecord(e.start, s));
      for (int r = 0; r < kReplays; ++r) graph.replay(s);
      MIXPREC_CUDA_CHECK(cudaEventRecord(e.stop, s));
      state.SetIterationTime(e.seconds() / kReplays);
    }
  } else {
    time_steps(state, step);
  }
  const double bytes = fp32_bytes_per_param(state_tensors) * static_cast<double>(n);
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

mixprec::cuda::AdamHyper adamw() {
  mixprec::cuda::AdamHyper h;
  h.decoupled = true;
  h.weight_decay = 0.01;
  return h;
}
mixprec::cuda::SgdHyper sgd_momentum() {
  mixprec::cuda::SgdHyper h;
  h.momentum = 0.9;
  return h;
}

void BM_AdamW(benchmark::State& s) { BM_step(s, adamw(), 2, 0); }
void BM_AdamW_clip(benchmark::State& s) { BM_step(s, adamw(), 2, 1.0); }
void BM_Adam(benchmark::State& s) { BM_step(s, mixprec::cuda::AdamHyper{}, 2, 0); }
void BM_SGD_momentum(benchmark::State& s) { BM_step(s, sgd_momentum(), 1, 0); }
void BM_RMSprop(benchmark::State& s) { BM_step(s, mixprec::cuda::RmspropHyper{}, 1, 0); }
void BM_AdamW_graph(benchmark::State& s) { BM_step(s, adamw(), 2, 0, true); }
void BM_SGD_momentum_graph(benchmark::State& s) { BM_step(s, sgd_momentum(), 1, 0, true); }
void BM_RMSprop_graph(benchmark::State& s) { BM_step(s, mixprec::cuda::RmspropHyper{}, 1, 0, true); }
void BM_AdamW_monitored_graph(benchmark::State& s) { BM_step(s, adamw(), 2, 0, true, true); }
void BM_AdamW_monitored_fused_graph(benchmark::State& s) { BM_step(s, adamw(), 2, 0, true, true, true); }
void BM_AdamW_fused(benchmark::State& s) { BM_step(s, adamw(), 2, 0, false, false, true); }
void BM_AdamW_fused_graph(benchmark::State& s) { BM_step(s, adamw(), 2, 0, true, false, true); }
void BM_SGD_momentum_fused_graph(benchmark::State& s) { BM_step(s, sgd_momentum(), 1, 0, true, false, true); }
void BM_RMSprop_fused_graph(benchmark::State& s) { BM_step(s, mixprec::cuda::RmspropHyper{}, 1, 0, true, false, true); }

// The same step through the host API a user calls: an optimizer over
// device parameters and DeviceGradScaler (step + update), which launch the
// kernels above through the DeviceBackend. The difference to BM_step is the
// host API's own cost.
template <class Opt, class W = half>
void BM_api(benchmark::State& state, const typename Opt::options_type& options, double bytes_per_param,
            double max_norm) {
  const std::int64_t n = state.range(0);
  std::vector<mixprec::Tensor<W>> weights, grads;
  std::vector<mixprec::optim::Param> params;
  const std::vector<std::int64_t> sizes = mixprec::bench::model_tensor_sizes(n);
  weights.reserve(sizes.size());
  grads.reserve(sizes.size());
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    weights.emplace_back(mixprec::Shape{sizes[k]}, mixprec::Device::cuda(0));
    grads.emplace_back(mixprec::Shape{sizes[k]}, mixprec::Device::cuda(0));
    mixprec::fill(weights.back(), 0.25f);
    mixprec::fill(grads.back(), 0.5f);
    params.push_back({"p" + std::to_string(k), weights.back(), grads.back()});
  }
  Opt opt(params, options);
  mixprec::amp::DeviceGradScaler scaler;
  auto step = [&] {
    if (max_norm > 0) {
      scaler.step(opt, max_norm);
    } else {
      scaler.step(opt);
    }
    scaler.update();
  };
  for (int i = 0; i < 3; ++i) step();
  time_steps(state, step);
  const double bytes = bytes_per_param * static_cast<double>(n);
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["Bpp"] = bytes_per_param;
}

void BM_api_AdamW(benchmark::State& s) { BM_api<mixprec::optim::AdamW>(s, {}, fp32_bytes_per_param(2), 0); }
void BM_api_AdamW_clip(benchmark::State& s) { BM_api<mixprec::optim::AdamW>(s, {}, fp32_bytes_per_param(2), 1.0); }
void BM_api_SGD_momentum(benchmark::State& s) {
  mixprec::optim::SGDOptions o;
  o.momentum = 0.9;
  BM_api<mixprec::optim::SGD>(s, o, fp32_bytes_per_param(1), 0);
}
void BM_api_RMSprop(benchmark::State& s) { BM_api<mixprec::optim::RMSprop>(s, {}, fp32_bytes_per_param(1), 0); }

// The lean layouts BM_api_AdamW_layout's second argument indexes.
using mixprec::optim::Master;
using mixprec::optim::Moments;
constexpr std::pair<Moments, Master> kLayouts[] = {
    {Moments::fp32, Master::fp32},      {Moments::bf16, Master::fp32},      {Moments::int8, Master::fp32},
    {Moments::fp32, Master::remainder}, {Moments::fp32, Master::none},      {Moments::bf16, Master::remainder},
    {Moments::bf16, Master::none},      {Moments::int8, Master::none},      {Moments::bf16_sr, Master::fp32},
    {Moments::bf16_sr, Master::none},
};

// Bytes one AdamW step over bf16 weights and gradients moves per parameter
// with `layout`, counted from what the kernels read and write: the
// gradient twice (the scaler's finite check, then the step); the weight
// written, and read too unless an fp32 master is its source; the fp32
// master read and written, or the remainder (16 bits) and its tie bit read
// and written; each of the two moments read and written at its size, the
// 8-bit code with one float scale per lean::kBlock values.
double adamw_bytes_per_param(const mixprec::optim::StateLayout& layout) {
  const double gradient = 2 + 2;
  const double weight = layout.master == Master::fp32 ? 2 : 2 + 2;
  const double master = layout.master == Master::fp32        ? 4 + 4
                        : layout.master == Master::remainder ? 2 * (2 + 1.0 / 8)
                                                             : 0;
  const double moment = layout.moments == Moments::fp32                ? 4
                        : mixprec::optim::lean::bf16_moments(layout.moments) ? 2
                                                                           : 1 + 4.0 / mixprec::optim::lean::kBlock;
  return gradient + weight + master + 2 * 2 * moment;
}

void BM_api_AdamW_layout(benchmark::State& s) {
  const auto index = static_cast<std::size_t>(s.range(1));
  mixprec::optim::AdamWOptions o;
  o.layout.moments = kLayouts[index].first;
  o.layout.master = kLayouts[index].second;
  s.SetLabel(std::string("moments ") + to_string(o.layout.moments) + ", master " + to_string(o.layout.master));
  BM_api<mixprec::optim::AdamW, bfloat16>(s, o, adamw_bytes_per_param(o.layout), 0);
}

#define MIXPREC_GPU_SIZES \
  ->Arg(1 << 21)->Arg(1 << 22)->Arg(1 << 24)->Arg(1 << 27)->Arg(1 << 30)->UseManualTime() \
  ->Unit(benchmark::kMillisecond)->Iterations(20)
BENCHMARK(BM_device_copy)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50);
BENCHMARK(BM_AdamW) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_clip) MIXPREC_GPU_SIZES;
BENCHMARK(BM_Adam) MIXPREC_GPU_SIZES;
BENCHMARK(BM_SGD_momentum) MIXPREC_GPU_SIZES;
BENCHMARK(BM_RMSprop) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_SGD_momentum_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_RMSprop_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_monitored_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_monitored_fused_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_fused) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_fused_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_SGD_momentum_fused_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_RMSprop_fused_graph) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_AdamW) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_AdamW_clip) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_SGD_momentum) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_RMSprop) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_AdamW_layout)
    ->ArgsProduct({benchmark::CreateRange(1 << 22, 1 << 30, /*multi=*/4),
                   benchmark::CreateDenseRange(0, static_cast<std::int64_t>(std::size(kLayouts)) - 1, /*step=*/1)})
    ->ArgNames({"n", "layout"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(20);

}  // namespace

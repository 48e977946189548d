// SPDX-License-Identifier: Apache-2.0
// The whole GPU optimizer step (pass 1 check + norms, pass 2 update, finish)
// over a model-like list (1M-element weights alternating with 1024-element
// biases) of fp16 weights and gradients with fp32 masters and state, at
// 2^24, 2^27 and 2^30 parameters. Bytes per parameter: 2 (check) + 2
// (gradient) + 8 (master) + 8 per state tensor + 2 (weight). Reports GB/s and
// the fraction of a device-to-device copy measured in the same run. CUDA
// events, manual time.
#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <vector>

#include "gpu_bench.cuh"
#include "mixprec/cuda/grad_check.cuh"
#include "model_list.hpp"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/cuda/optimizer_step.cuh"
#include "mixprec/mixprec.hpp"

namespace {

using mixprec::half;

using mixprec::bench::BM_device_copy;
using mixprec::bench::time_steps;

template <class Hyper>
void BM_step(benchmark::State& state, Hyper hyper, int state_tensors, double max_norm) {
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
  mixprec::amp::ScalePolicy policy;
  auto step = [&] {
    check.launch(list);
    mixprec::cuda::launch_step(list, params, hyper, mixprec::optim::LRSchedule::constant(), in);
    mixprec::cuda::launch_update_scale(scaler, policy, true);
  };
  for (int i = 0; i < 3; ++i) step();
  time_steps(state, step);
  const double bytes = (2 + 2 + 8 + 8.0 * state_tensors + 2) * static_cast<double>(n);
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

// The same step through the host API a user calls: an optimizer over
// device parameters and DeviceGradScaler (step + update), which launch the
// kernels above through the DeviceBackend. The difference to BM_step is the
// host API's own cost.
template <class Opt>
void BM_api(benchmark::State& state, const typename Opt::options_type& options, int state_tensors,
            double max_norm) {
  const std::int64_t n = state.range(0);
  std::vector<mixprec::Tensor<half>> weights, grads;
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
  const double bytes = (2 + 2 + 8 + 8.0 * state_tensors + 2) * static_cast<double>(n);
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_api_AdamW(benchmark::State& s) { BM_api<mixprec::optim::AdamW>(s, {}, 2, 0); }
void BM_api_AdamW_clip(benchmark::State& s) { BM_api<mixprec::optim::AdamW>(s, {}, 2, 1.0); }
void BM_api_SGD_momentum(benchmark::State& s) {
  mixprec::optim::SGDOptions o;
  o.momentum = 0.9;
  BM_api<mixprec::optim::SGD>(s, o, 1, 0);
}
void BM_api_RMSprop(benchmark::State& s) { BM_api<mixprec::optim::RMSprop>(s, {}, 1, 0); }

#define MIXPREC_GPU_SIZES ->Arg(1 << 24)->Arg(1 << 27)->Arg(1 << 30)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20)
BENCHMARK(BM_device_copy)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50);
BENCHMARK(BM_AdamW) MIXPREC_GPU_SIZES;
BENCHMARK(BM_AdamW_clip) MIXPREC_GPU_SIZES;
BENCHMARK(BM_Adam) MIXPREC_GPU_SIZES;
BENCHMARK(BM_SGD_momentum) MIXPREC_GPU_SIZES;
BENCHMARK(BM_RMSprop) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_AdamW) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_AdamW_clip) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_SGD_momentum) MIXPREC_GPU_SIZES;
BENCHMARK(BM_api_RMSprop) MIXPREC_GPU_SIZES;

}  // namespace

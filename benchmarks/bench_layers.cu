// SPDX-License-Identifier: Apache-2.0
// Forward + backward of the example CNN (below) and of the MLP 784-4096-4096-10 (ReLU fused into the
// hidden Linear layers, softmax cross-entropy writing the scaled gradient),
// batch 1024, fp16 and bf16, through nn::Sequential on the GPU; and one
// square GEMM through the same cuBLASLt path as the ceiling measured in the
// same run. FLOPs: 2 * batch * (sum of in * out) for the forward, twice that
// for the backward (weight and input gradients) less the first layer's
// input gradient, which is not computed. CUDA events, manual time.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "gpu_bench.cuh"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/mixprec.hpp"

namespace {

using mixprec::bench::time_steps;

// Random inputs, labels b % 10 and a fixed loss scale of 1024 on the
// device; three warm-up steps (cuBLASLt plans, chosen as `how` says; cuDNN
// algorithms, scratch), then forward + loss + backward timed per iteration.
// Counters: timed_picks and partials16 (below).
template <class T>
void time_forward_backward(benchmark::State& state, mixprec::nn::Sequential<T>& net,
                           mixprec::nn::GemmAlgorithms how = mixprec::nn::GemmAlgorithms::heuristic) {
  // Planned afresh (a change of setting drops the plans): timed_picks
  // below counts this net's shapes only.
  mixprec::nn::set_gemm_algorithms(how == mixprec::nn::GemmAlgorithms::timed ? mixprec::nn::GemmAlgorithms::heuristic
                                                                             : mixprec::nn::GemmAlgorithms::timed);
  mixprec::nn::set_gemm_algorithms(how);
  const mixprec::Device gpu = net.device();
  const std::int64_t batch = net.input_shape()[0];
  mixprec::Tensor<T> x(net.input_shape(), gpu);
  mixprec::fill_normal(x, 0, 1, 4);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) labels[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b % 10);
  mixprec::Buffer glabels(labels.size() * sizeof(std::int32_t), gpu), scalars(3 * sizeof(float), gpu);
  MIXPREC_CUDA_CHECK(cudaMemcpy(glabels.data(), labels.data(), glabels.bytes(), cudaMemcpyHostToDevice));
  const float init[3] = {1024.0f, 0.0f, 0.0f};  // scale, loss, bad-label flag
  MIXPREC_CUDA_CHECK(cudaMemcpy(scalars.data(), init, sizeof init, cudaMemcpyHostToDevice));
  float* s = static_cast<float*>(scalars.data());
  auto step = [&] {
    mixprec::nn::softmax_cross_entropy<T>(net.forward(x.view()), static_cast<const std::int32_t*>(glabels.data()),
                                          s, net.output_grad(), s + 1, reinterpret_cast<int*>(s + 2));
    net.backward();
  };
  for (int i = 0; i < 3; ++i) step();
  time_steps(state, step);
  // How many of the net's GEMM shapes kept another algorithm than the
  // heuristic's first (timed), and how many keep split-K partial sums in
  // the 16-bit output type (cuBLASLt's INPLACE or OUTPUT_TYPE reduction
  // schemes).
  int picks = 0, partials16 = 0;
  for (const mixprec::nn::GemmPlanInfo& p : mixprec::nn::nn_device_ops().gemm_plans()) {
    picks += p.chosen != 0;
    partials16 += p.dtype != mixprec::DType::float32 && (p.reduction_scheme == CUBLASLT_REDUCTION_SCHEME_INPLACE ||
                                                         p.reduction_scheme == CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
  }
  if (how == mixprec::nn::GemmAlgorithms::timed) state.counters["timed_picks"] = picks;
  state.counters["partials16"] = partials16;
}

// The MLP 784-hidden-hidden-10 at batch range(0), hidden range(1), the
// backward fused (as the examples run it), its GEMMs' algorithms as `How`
// says: the heuristic's first against the fastest of its candidates.
template <class T, mixprec::nn::GemmAlgorithms How>
void BM_mlp_step_gemm(benchmark::State& state) {
  const std::int64_t batch = state.range(0), hidden = state.range(1);
  const mixprec::Device gpu = mixprec::Device::cuda(0);
  mixprec::nn::Sequential<T> net({batch, 784}, gpu, true);
  net.template emplace<mixprec::nn::Linear<T>>(784, hidden, mixprec::nn::Activation::relu, true, gpu, 1);
  net.template emplace<mixprec::nn::Linear<T>>(hidden, hidden, mixprec::nn::Activation::relu, true, gpu, 2);
  net.template emplace<mixprec::nn::Linear<T>>(hidden, 10, mixprec::nn::Activation::none, true, gpu, 3);
  time_forward_backward(state, net, How);
  const double fwd = 2.0 * batch * (784.0 * hidden + double(hidden) * hidden + hidden * 10.0);
  const double flops = 3 * fwd - 2.0 * batch * 784.0 * hidden;
  state.counters["TFLOPs"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
}

template <class T, bool Fused>
void BM_mlp_step(benchmark::State& state) {
  const std::int64_t batch = 1024, hidden = 4096;
  const mixprec::Device gpu = mixprec::Device::cuda(0);
  mixprec::nn::Sequential<T> net({batch, 784}, gpu, Fused);
  net.template emplace<mixprec::nn::Linear<T>>(784, hidden, mixprec::nn::Activation::relu, true, gpu, 1);
  net.template emplace<mixprec::nn::Linear<T>>(hidden, hidden, mixprec::nn::Activation::relu, true, gpu, 2);
  net.template emplace<mixprec::nn::Linear<T>>(hidden, 10, mixprec::nn::Activation::none, true, gpu, 3);
  time_forward_backward(state, net);
  const double fwd = 2.0 * batch * (784.0 * hidden + double(hidden) * hidden + hidden * 10.0);
  const double flops = 3 * fwd - 2.0 * batch * 784.0 * hidden;
  state.counters["TFLOPs"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
}

// The example CNN (examples/, issue 6): [batch, 1, 28, 28] -> Conv2d(1, 32,
// 3, pad 1, relu) -> MaxPool2d(2) -> Conv2d(32, 64, 3, pad 1, relu) ->
// MaxPool2d(2) -> Flatten -> Linear(3136, 128, relu) -> Linear(128, 10),
// batch 256, forward + backward from the loss.
template <class T>
void BM_cnn_step(benchmark::State& state) {
  namespace nn = mixprec::nn;
  const std::int64_t batch = 256;
  const mixprec::Device gpu = mixprec::Device::cuda(0);
  nn::Sequential<T> net({batch, 1, 28, 28}, gpu);
  net.template emplace<nn::Conv2d<T>>(1, 32, 3, 1, 1, true, gpu, 1, nn::Activation::relu);
  net.template emplace<nn::MaxPool2d<T>>(2, 0, gpu);
  net.template emplace<nn::Conv2d<T>>(32, 64, 3, 1, 1, true, gpu, 2, nn::Activation::relu);
  net.template emplace<nn::MaxPool2d<T>>(2, 0, gpu);
  net.template emplace<nn::Flatten<T>>(gpu);
  net.template emplace<nn::Linear<T>>(3136, 128, nn::Activation::relu, true, gpu, 3);
  net.template emplace<nn::Linear<T>>(128, 10, nn::Activation::none, true, gpu, 4);
  time_forward_backward(state, net);
  const double conv1 = 2.0 * batch * 32 * 28 * 28 * 9, conv2 = 2.0 * batch * 64 * 14 * 14 * 32 * 9;
  const double fc = 2.0 * batch * (3136.0 * 128 + 128.0 * 10);
  const double flops = 3 * (conv1 + conv2 + fc) - conv1;  // no input gradient for the first layer
  state.counters["TFLOPs"] = benchmark::Counter(flops / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["images_per_s"] = benchmark::Counter(batch, benchmark::Counter::kIsIterationInvariantRate);
}

// One Linear(in, 10) layer, forward and backward (weight, bias and input
// gradients) at batch range(0), in range(1): mixprec's narrow kernels
// (nn::set_narrow_linear) against cuBLASLt's GEMMs (heuristic) for the
// forward and the weight gradient. 20 forward + backward passes captured in
// one CUDA graph, so launch gaps are not timed; the time is per pass.
// bytes_per_s counts x read twice and dx written, dy read twice and y
// written, W read twice and its gradient written: every array fits in L2
// and is reused pass after pass, so it is an L2 rate, not DRAM's.
template <class T, bool Narrow>
void BM_narrow_linear(benchmark::State& state) {
  namespace nn = mixprec::nn;
  const std::int64_t batch = state.range(0), in = state.range(1), out = 10;
  constexpr int passes = 20;
  const mixprec::Device gpu = mixprec::Device::cuda(0);
  nn::set_gemm_algorithms(nn::GemmAlgorithms::heuristic);
  const bool before = nn::nn_device_ops().narrow_linear();
  nn::set_narrow_linear(Narrow);
  nn::Linear<T> layer(in, out, nn::Activation::none, true, gpu, 1);
  mixprec::Tensor<T> x({batch, in}, gpu), y({batch, out}, gpu), dy({batch, out}, gpu), dx({batch, in}, gpu);
  mixprec::fill_normal(x, 0, 1, 2);
  mixprec::fill_normal(dy, 0, 1, 3);
  mixprec::Stream stream;
  const nn::Context ctx{stream.get()};
  auto pass = [&] {
    layer.forward(x.view(), y.view(), ctx);
    layer.backward(x.view(), y.view(), dy.view(), dx.view(), ctx);
  };
  for (int i = 0; i < 3; ++i) pass();  // plans and scratch, outside the capture
  mixprec::Graph graph;
  graph.capture(stream.get(), [&] {
    for (int i = 0; i < passes; ++i) pass();
  });
  mixprec::bench::Events e;
  for (int i = 0; i < 3; ++i) graph.replay(stream.get());
  for (auto _ : state) {
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.start, stream.get()));
    graph.replay(stream.get());
    MIXPREC_CUDA_CHECK(cudaEventRecord(e.stop, stream.get()));
    state.SetIterationTime(e.seconds() / passes);
  }
  nn::set_narrow_linear(before);
  const double bytes = static_cast<double>(sizeof(T)) * (3.0 * batch * in + 3.0 * batch * out + 3.0 * out * in);
  state.counters["bytes_per_s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

// y = x W^T for x [8192, 8192], W [8192, 8192]: the plain GEMM rate.
template <class T>
void BM_gemm(benchmark::State& state) {
  const std::int64_t n = 8192;
  const mixprec::Device gpu = mixprec::Device::cuda(0);
  mixprec::nn::Linear<T> layer(n, n, mixprec::nn::Activation::none, false, gpu, 1);
  mixprec::Tensor<T> x({n, n}, gpu), y({n, n}, gpu);
  mixprec::fill_normal(x, 0, 1, 2);
  mixprec::nn::set_gemm_algorithms(mixprec::nn::GemmAlgorithms::heuristic);
  for (int i = 0; i < 3; ++i) layer.forward(x.view(), y.view(), {});
  time_steps(state, [&] { layer.forward(x.view(), y.view(), {}); });
  state.counters["TFLOPs"] =
      benchmark::Counter(2.0 * n * n * n / 1e12, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK_TEMPLATE(BM_gemm, mixprec::bfloat16)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50);
BENCHMARK_TEMPLATE(BM_gemm, mixprec::half)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(50);
BENCHMARK_TEMPLATE(BM_mlp_step, mixprec::half, false)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(100);
BENCHMARK_TEMPLATE(BM_mlp_step, mixprec::bfloat16, false)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(100);
// The same with the activation derivative and bias gradient fused into the
// next layer's input-gradient GEMM (Sequential's fuse_linear_backward).
BENCHMARK_TEMPLATE(BM_mlp_step, mixprec::half, true)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(100);
BENCHMARK_TEMPLATE(BM_mlp_step, mixprec::bfloat16, true)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(100);
// The examples' two MLPs (hidden 4096 at batch 1024, hidden 1024 at batch
// 256), GEMM algorithms by heuristic and timed, fp16 and bf16.
#define MIXPREC_BENCH_MLP_GEMM(T, How)                                                              \
  BENCHMARK_TEMPLATE(BM_mlp_step_gemm, T, How)                                                      \
      ->Args({1024, 4096})                                                                          \
      ->Args({256, 1024})                                                                           \
      ->UseManualTime()                                                                             \
      ->Unit(benchmark::kMicrosecond)                                                               \
      ->Iterations(200)
MIXPREC_BENCH_MLP_GEMM(mixprec::half, mixprec::nn::GemmAlgorithms::heuristic);
MIXPREC_BENCH_MLP_GEMM(mixprec::half, mixprec::nn::GemmAlgorithms::timed);
MIXPREC_BENCH_MLP_GEMM(mixprec::bfloat16, mixprec::nn::GemmAlgorithms::heuristic);
MIXPREC_BENCH_MLP_GEMM(mixprec::bfloat16, mixprec::nn::GemmAlgorithms::timed);
#undef MIXPREC_BENCH_MLP_GEMM
// The examples' last layers: the MLPs' (1024 and 4096 inputs) and the CNN's (128).
#define MIXPREC_BENCH_NARROW(T, Narrow)                                                             \
  BENCHMARK_TEMPLATE(BM_narrow_linear, T, Narrow)                                                   \
      ->Args({256, 1024})                                                                           \
      ->Args({1024, 4096})                                                                          \
      ->Args({256, 128})                                                                            \
      ->UseManualTime()                                                                             \
      ->Unit(benchmark::kMicrosecond)                                                               \
      ->Iterations(200)
MIXPREC_BENCH_NARROW(mixprec::half, true);
MIXPREC_BENCH_NARROW(mixprec::half, false);
MIXPREC_BENCH_NARROW(mixprec::bfloat16, true);
MIXPREC_BENCH_NARROW(mixprec::bfloat16, false);
#undef MIXPREC_BENCH_NARROW
BENCHMARK_TEMPLATE(BM_cnn_step, mixprec::half)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(100);
BENCHMARK_TEMPLATE(BM_cnn_step, mixprec::bfloat16)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(100);

}  // namespace

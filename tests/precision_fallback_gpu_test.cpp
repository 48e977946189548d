// SPDX-License-Identifier: Apache-2.0
// A layer in another precision on the GPU (nn::Recast through
// nn::DeviceOps::convert): the boundary conversion kernel gives the host's
// bits, an fp16 network with its first Linear in fp32 computes on the GPU
// what it computes on the CPU (and keeps a weight gradient beyond fp16's
// range finite), and it trains with DeviceGradScaler and AdamW, the fp32
// weights equal to their masters. Skips, saying so, without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

// max |gpu - cpu| <= tol * max |cpu|: the GPU sums in another order.
template <class T>
void expect_close(TensorView<const T> gpu, TensorView<const T> cpu, double tol, const std::string& what) {
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  Tensor<T> g(gpu.shape());
  copy(gpu, g);
  double scale = 0, worst = 0;
  for (std::int64_t i = 0; i < cpu.numel(); ++i) scale = std::fmax(scale, std::fabs(to_float(cpu.data()[i])));
  for (std::int64_t i = 0; i < cpu.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(to_float(g.at(i)))) << what << "[" << i << "]";
    worst = std::fmax(worst, std::fabs(static_cast<double>(to_float(g.at(i))) - to_float(cpu.data()[i])));
  }
  EXPECT_LE(worst, tol * scale) << what;
}

TEST(RecastGpu, TheConversionKernelGivesTheHostsBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t n = 100003;  // not a multiple of any block
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> exponent(-30.0f, 20.0f);
  Tensor<float> src(Shape{n});
  for (std::int64_t i = 0; i < n; ++i) src.at(i) = std::exp2(exponent(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
  src.at(0) = 65520.0f;  // rounds to inf in fp16
  src.at(1) = std::ldexp(1.0f, -25);  // a tie at fp16's bottom
  const Tensor<float> d_src = src.to(Device::cuda(0));
  Tensor<half> d_half(Shape{n}, Device::cuda(0));
  Tensor<bfloat16> d_bf(Shape{n}, Device::cuda(0));
  nn::nn_device_ops().convert(DType::float32, d_src.data(), DType::float16, d_half.data(), n, nullptr);
  nn::nn_device_ops().convert(DType::float16, d_half.data(), DType::bfloat16, d_bf.data(), n, nullptr);
  Tensor<half> h(Shape{n});
  Tensor<bfloat16> b(Shape{n});
  copy(d_half, h);
  copy(d_bf, b);
  for (std::int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(h.at(i).bits, from_float<half>(src.at(i)).bits) << "float -> half [" << i << "]";
    ASSERT_EQ(b.at(i).bits, from_float<bfloat16>(to_float(h.at(i))).bits) << "half -> bfloat16 [" << i << "]";
  }
}

// The same fp16 network on the CPU and the GPU, its first layer in fp32.
struct Net {
  nn::Sequential<half> net;
  explicit Net(Device d) : net(Shape{32, 24}, d) {
    net.emplace<nn::Linear<half>>(24, 16, nn::Activation::relu, true, d, 7);
    net.emplace<nn::Linear<half>>(16, 4, nn::Activation::none, true, d, 8);
    net.set_precision(0, DType::float32);
  }
  nn::Linear<float>& first() {
    return dynamic_cast<nn::Linear<float>&>(dynamic_cast<nn::Recast<half, float>&>(net.layer(0)).inner());
  }
  nn::Linear<half>& second() { return dynamic_cast<nn::Linear<half>&>(net.layer(1)); }
};

TEST(RecastGpu, AnFp32LayerInAnFp16NetworkComputesOnTheGpuWhatItComputesOnTheCpu) {
  MIXPREC_SKIP_WITHOUT_GPU();
  test::OwnedStream stream;
  Net cpu(Device::cpu()), gpu(Device::cuda(0));
  ASSERT_EQ(gpu.net.precision(0), DType::float32);
  // Inputs of ~300 and a loss-scaled gradient: layer 0's weight gradient
  // reaches ~1e6, beyond fp16.
  Tensor<half> x(Shape{32, 24}), dy(Shape{32, 4});
  fill_uniform(x, -300.0f, 300.0f, 1);
  fill_uniform(dy, -2000.0f, 2000.0f, 2);
  const Tensor<half> dx_ = x.to(Device::cuda(0)), ddy = dy.to(Device::cuda(0));
  // Layer 0's weights scaled so that its output, and layer 1's weight
  // gradient (its output times dy, summed over the batch), stay in fp16's
  // range: with 1e-2 the latter overflowed on the CPU as well (max ~9e3 now).
  fill_uniform(cpu.first().weight(), -1e-3f, 1e-3f, 3);
  copy(cpu.first().weight(), gpu.first().weight());
  const nn::Context ctx{stream.s};
  const TensorView<const half> y_cpu = cpu.net.forward(x.view());
  const TensorView<const half> y_gpu = gpu.net.forward(dx_.view(), ctx);
  copy(dy.view(), cpu.net.output_grad());
  copy(ddy.view(), gpu.net.output_grad(), stream.s);
  cpu.net.backward();
  gpu.net.backward(ctx);
  ASSERT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
  // fp16 outputs: 4e-3 of the largest (nn_gpu_test's fp16 tolerance);
  // fp32 gradients: 1e-5 (its fp32 one).
  expect_close(y_gpu, y_cpu, 4e-3, "y");
  expect_close(TensorView<const float>(gpu.first().grad_weight().view()),
               TensorView<const float>(cpu.first().grad_weight().view()), 1e-5, "layer 0 grad_weight (fp32)");
  expect_close(TensorView<const float>(gpu.first().grad_bias().view()),
               TensorView<const float>(cpu.first().grad_bias().view()), 1e-5, "layer 0 grad_bias (fp32)");
  expect_close(TensorView<const half>(gpu.second().grad_weight().view()),
               TensorView<const half>(cpu.second().grad_weight().view()), 4e-3, "layer 1 grad_weight (fp16)");
  float largest = 0;
  for (std::int64_t k = 0; k < cpu.first().grad_weight().numel(); ++k) {
    largest = std::fmax(largest, std::fabs(cpu.first().grad_weight().at(k)));
  }
  EXPECT_GT(largest, 65504.0f) << "the test's gradient must lie beyond fp16's range";
}

TEST(RecastGpu, TrainsWithTheDeviceScalerAndTheFp32WeightsAreTheirMasters) {
  MIXPREC_SKIP_WITHOUT_GPU();
  test::OwnedStream stream;
  Net gpu(Device::cuda(0));
  optim::AdamW opt(gpu.net.parameters());
  opt.set_stream(stream.s);
  amp::DeviceGradScaler scaler({}, Device::cuda(0), stream.s);
  ASSERT_EQ(opt.param(0).weight.dtype(), DType::float32);
  ASSERT_EQ(opt.param(2).weight.dtype(), DType::float16);
  Tensor<half> x(Shape{32, 24});
  fill_uniform(x, -1.0f, 1.0f, 4);
  const Tensor<half> dx_ = x.to(Device::cuda(0));
  std::vector<std::int32_t> labels(32);
  for (int i = 0; i < 32; ++i) labels[i] = i % 4;
  Buffer dlabels(32 * sizeof(std::int32_t), Device::cuda(0));
  ASSERT_EQ(cudaMemcpy(dlabels.data(), labels.data(), 32 * sizeof(std::int32_t), cudaMemcpyHostToDevice), cudaSuccess);
  Buffer scalars(sizeof(float) + sizeof(int), Device::cuda(0));
  ASSERT_EQ(cudaMemset(scalars.data(), 0, scalars.bytes()), cudaSuccess);
  auto* loss = static_cast<float*>(scalars.data());
  auto* bad = reinterpret_cast<int*>(loss + 1);
  const nn::Context ctx{stream.s};
  float first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    nn::softmax_cross_entropy<half>(gpu.net.forward(dx_.view(), ctx), static_cast<const std::int32_t*>(dlabels.data()),
                                    scaler.scale_data(), gpu.net.output_grad(), loss, bad, ctx);
    gpu.net.backward(ctx);
    scaler.step(opt);
    scaler.update();
    ASSERT_EQ(cudaStreamSynchronize(stream.s), cudaSuccess);
    float l = 0;
    ASSERT_EQ(cudaMemcpy(&l, loss, sizeof l, cudaMemcpyDeviceToHost), cudaSuccess);
    if (step == 0) first = l;
    last = l;
  }
  EXPECT_LT(last, first) << "30 AdamW steps on one batch lower its loss";
  // An fp32 weight is its master, bit for bit (the step writes it from
  // the master, and rounding fp32 to fp32 is exact).
  Tensor<float> weight(opt.param(0).weight.shape()), master(opt.param(0).weight.shape());
  copy(opt.param(0).weight.as<float>(), weight);
  copy(opt.master(0), master);
  for (std::int64_t k = 0; k < weight.numel(); ++k) ASSERT_EQ(weight.at(k), master.at(k)) << k;
}

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// The layers on the GPU (cuBLASLt epilogues, mixprec's kernels) against the
// same layers on the CPU (themselves checked against float64 finite
// differences in nn_test), compiled by g++ with device_backend.cu. Same
// seeds give the same weights on both; the tolerances are
// gpu_layer_compare.hpp's.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "conv_cases.hpp"
#include "gpu_layer_compare.hpp"
#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

using nn::Activation;

using test::compare_layer;
using test::expect_close;
using test::on_gpu;
using test::tolerance;

template <class T>
void linear_case(std::int64_t batch, std::int64_t in, std::int64_t out, Activation act, bool bias) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " " + nn::activation_name(act) + " " + std::to_string(batch) +
               "x" + std::to_string(in) + "->" + std::to_string(out) + (bias ? "" : " no bias"));
  nn::Linear<T> cpu(in, out, act, bias, Device::cpu(), 5), gpu(in, out, act, bias, Device::cuda(0), 5);
  Tensor<T> x({batch, in});
  fill_normal(x, 0, 1, 1);
  compare_layer<T>(cpu, gpu, x, 2);
}

template <class T>
void all_linear() {
  for (Activation act : {Activation::none, Activation::relu, Activation::gelu}) {
    linear_case<T>(64, 96, 128, act, true);
    linear_case<T>(33, 40, 10, act, true);  // odd batch, out not a multiple of 8 (no fused GELU)
    linear_case<T>(16, 24, 32, act, false);
  }
}

TEST(NnGpu, LinearHalf) {
  MIXPREC_SKIP_WITHOUT_GPU();
  all_linear<half>();
}
TEST(NnGpu, LinearBfloat16) {
  MIXPREC_SKIP_WITHOUT_GPU();
  all_linear<bfloat16>();
}
TEST(NnGpu, LinearFloat) {
  MIXPREC_SKIP_WITHOUT_GPU();
  all_linear<float>();
}

template <class T>
void activation_case(Activation act) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " " + nn::activation_name(act));
  nn::ActivationLayer<T> cpu(act), gpu(act, Device::cuda(0));
  Tensor<T> x({8, 100});
  fill_normal(x, 0, 2, 3);
  compare_layer<T>(cpu, gpu, x, 4);
}

TEST(NnGpu, Activations) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (Activation act : {Activation::relu, Activation::gelu}) {
    activation_case<half>(act);
    activation_case<bfloat16>(act);
    activation_case<float>(act);
  }
}

template <class T>
void conv_case(std::int64_t stride, std::int64_t pad) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " stride " + std::to_string(stride) + " pad " + std::to_string(pad));
  const std::int64_t n = 4, c = 3, h = 12, w = 10, k = 8, r = 3;
  nn::Conv2d<T> cpu(c, k, r, stride, pad, true, Device::cpu(), 4), gpu(c, k, r, stride, pad, true, Device::cuda(0), 4);
  Tensor<T> x({n, c, h, w});
  fill_normal(x, 0, 1, 5);
  compare_layer<T>(cpu, gpu, x, 6);
}

template <class T>
void pool_case() {
  SCOPED_TRACE(dtype_traits<T>::name);
  const std::int64_t n = 2, c = 4, h = 8, w = 6;
  nn::MaxPool2d<T> cpu(2), gpu(2, 0, Device::cuda(0));
  // Distinct values (k / 512 for a shuffled k < 384, exact in every T): one maximum per window.
  Tensor<T> x({n, c, h, w});
  for (std::int64_t i = 0; i < x.numel(); ++i) x.at(i) = from_float<T>(static_cast<float>((i * 97) % 384) / 512.0f);
  compare_layer<T>(cpu, gpu, x, 7);
}

TEST(NnGpu, Conv2dAndMaxPool2d) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (auto [stride, pad] : {std::pair<std::int64_t, std::int64_t>{1, 1}, {2, 0}}) {
    conv_case<half>(stride, pad);
    conv_case<bfloat16>(stride, pad);
    conv_case<float>(stride, pad);
  }
  pool_case<half>();
  pool_case<bfloat16>();
  pool_case<float>();
}

// The conv bias gradient against a float64 sum of dy, on shapes that split a
// channel over several blocks of images (more than 8192 elements a channel):
// 300 images of 16x16 (32 a block and a last block of 12; a thread a pixel),
// 200 of 40x30 (34 blocks: a warp adds more than 32 partials) and 40 of 29x31
// (a block's threads span image boundaries). A float sum's error bound,
// loosely: 1e-7 of the sum of |dy|, plus the rounding of the result to T.
template <class T>
void conv_bias_case(std::int64_t n, std::int64_t h, std::int64_t w, std::int64_t pad) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " n " + std::to_string(n) + " " + std::to_string(h) + "x" +
               std::to_string(w) + " pad " + std::to_string(pad));
  const std::int64_t c = 2, k = 3;
  nn::Conv2d<T> gpu(c, k, 3, 1, pad, true, Device::cuda(0), 4);
  Tensor<T> x({n, c, h, w});
  fill_normal(x, 0, 1, 5);
  const Shape out = gpu.output_shape(x.shape());
  Tensor<T> dy(out);
  fill_normal(dy, 0, 1, 6);
  Tensor<T> gx = on_gpu(x), gdy = on_gpu(dy), gy(out, Device::cuda(0)), gdx(x.shape(), Device::cuda(0));
  gpu.forward(gx.view(), gy.view(), {});
  gpu.backward(gx.view(), gy.view(), gdy.view(), gdx.view(), {});
  const std::vector<optim::Param> params = gpu.parameters("");
  const auto bias = std::find_if(params.begin(), params.end(), [](const optim::Param& p) { return p.name == "bias"; });
  ASSERT_NE(bias, params.end());
  Tensor<T> db(Shape{k});
  copy(bias->grad.template as<const T>("bias grad"), db);
  const std::int64_t pq = out[2] * out[3];
  const double rounding = std::is_same_v<T, float> ? 0x1p-24 : std::is_same_v<T, half> ? 0x1p-11 : 0x1p-8;
  for (std::int64_t ch = 0; ch < k; ++ch) {
    double sum = 0, magnitude = 0;
    for (std::int64_t image = 0; image < n; ++image) {
      for (std::int64_t pixel = 0; pixel < pq; ++pixel) {
        const double v = to_float(dy.at((image * k + ch) * pq + pixel));
        sum += v;
        magnitude += std::fabs(v);
      }
    }
    EXPECT_NEAR(to_float(db.at(ch)), sum, 1e-7 * magnitude + rounding * std::fabs(sum)) << "channel " << ch;
  }
}

TEST(NnGpu, Conv2dBiasGradientSplitOverImages) {
  MIXPREC_SKIP_WITHOUT_GPU();
  conv_bias_case<float>(300, 16, 16, 1);
  conv_bias_case<half>(300, 16, 16, 1);
  conv_bias_case<bfloat16>(200, 40, 30, 1);
  conv_bias_case<float>(200, 40, 30, 1);
  conv_bias_case<float>(40, 31, 33, 0);
}

TEST(NnGpu, Conv2dFusedReluIsTheLayerPair) {
  MIXPREC_SKIP_WITHOUT_GPU();
  // c = 1 and 3: the direct kernels (9 and 27 taps a filter); c = 8: cuDNN
  // with mixprec's bias + ReLU and bias-gradient kernels.
  for (std::int64_t c : {1, 3, 8}) {
    for (bool first : {true, false}) {
      test::expect_fused_relu_is_the_pair<half>(Device::cuda(0), c, 1, 1, first);
      test::expect_fused_relu_is_the_pair<bfloat16>(Device::cuda(0), c, 2, 0, first);
      test::expect_fused_relu_is_the_pair<float>(Device::cuda(0), c, 1, 1, first);
    }
  }
}

// A Conv2d's output may be a view that starts anywhere (here one element
// into a buffer): the bias + ReLU pass then takes an element at a time
// instead of 4-element packs, with the same bits as into an aligned tensor.
template <class T>
void unaligned_output_case() {
  SCOPED_TRACE(dtype_traits<T>::name);
  const Device gpu = Device::cuda(0);
  nn::Conv2d<T> conv(8, 4, 3, 1, 1, true, gpu, 3, Activation::relu);  // 72 taps: the cuDNN path
  Tensor<T> hx({2, 8, 12, 12});
  fill_normal(hx, 0, 1, 4);
  Tensor<T> x = hx.to(gpu);
  const Shape out = conv.output_shape(x.shape());  // 12 x 12: pq % 4 == 0
  Tensor<T> aligned(out, gpu), buffer(Shape{out.numel() + 1}, gpu);
  const TensorView<T> shifted(buffer.data() + 1, out, gpu);
  conv.forward(x.view(), aligned.view(), {});
  conv.forward(x.view(), shifted, {});
  test::expect_same_bits<T>(TensorView<const T>(shifted), aligned.view(), "y");
}

TEST(NnGpu, Conv2dOutputViewAtAnyOffset) {
  MIXPREC_SKIP_WITHOUT_GPU();
  unaligned_output_case<half>();
  unaligned_output_case<float>();
}

TEST(NnGpu, MaxPool2dGivesTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  // Non-overlapping windows of 2 and 3 (the tiled kernels; the last row
  // and column of 7x9 and the last column of 9x10 in no window), overlapping
  // ones (stride < window: the general kernels), and the example's shape.
  for (auto [window, stride, h, w] : {std::tuple<int, int, int, int>{2, 2, 7, 9}, {3, 3, 9, 10}, {3, 2, 9, 8},
                                      {3, 1, 6, 7}, {2, 2, 28, 28}}) {
    test::expect_pool_gives_the_cpu_bits<half>(Device::cuda(0), window, stride, h, w);
    test::expect_pool_gives_the_cpu_bits<bfloat16>(Device::cuda(0), window, stride, h, w);
    test::expect_pool_gives_the_cpu_bits<float>(Device::cuda(0), window, stride, h, w);
  }
}

// A first layer (no dx asked for) with few taps a filter takes the direct
// kernels: its weight and bias gradients against float64 sums of dz * x,
// dz = dy * relu'(y) with the GPU's own y (so a value at the ReLU's kink
// cannot flip the mask). 40 images of 28x28 (31,360 positions: 62 blocks
// of 512, the last one partly filled, chunks of 32 that span images) or of
// 70x70. Bound: 1e-6 of the sum of |terms| (float sums of thousands of
// terms) plus the rounding of the result to T.
template <class T>
void direct_wgrad_case(std::int64_t c, std::int64_t stride, std::int64_t pad, Activation act, std::int64_t side = 28) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " c " + std::to_string(c) + " stride " + std::to_string(stride) +
               " " + nn::activation_name(act) + " side " + std::to_string(side));
  const std::int64_t n = 40, h = side, w = side, k = 5, r = 3;
  nn::Conv2d<T> conv(c, k, r, stride, pad, true, Device::cuda(0), 7, act);
  Tensor<T> x({n, c, h, w});
  fill_normal(x, 0, 1, 9);
  const Shape out = conv.output_shape(x.shape());
  Tensor<T> dy(out);
  fill_normal(dy, 0, 1, 10);
  Tensor<T> gx = on_gpu(x), gdy = on_gpu(dy), gy(out, Device::cuda(0));
  conv.forward(gx.view(), gy.view(), {});
  conv.backward(gx.view(), gy.view(), gdy.view(), TensorView<T>(), {});
  const std::vector<T> y = test::host_copy<T>(gy.view()), gw = test::host_copy<T>(conv.grad_weight().view()),
                       gb = test::host_copy<T>(conv.grad_bias().view());
  const std::int64_t p = out[2], q = out[3];
  const double rounding = std::is_same_v<T, float> ? 0x1p-24 : std::is_same_v<T, half> ? 0x1p-11 : 0x1p-8;
  for (std::int64_t f = 0; f < k; ++f) {
    for (std::int64_t j = 0; j <= c * r * r; ++j) {  // j = c * r * r: the bias
      const std::int64_t ch = j / (r * r), u = j / r % r, v = j % r;
      double sum = 0, magnitude = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t a = 0; a < p; ++a) {
          for (std::int64_t e = 0; e < q; ++e) {
            const std::int64_t o = ((i * k + f) * p + a) * q + e;
            double g = to_float(dy.at(o));
            if (act == Activation::relu && !(to_float(y[static_cast<std::size_t>(o)]) > 0.0f)) g = 0;
            double term = g;
            if (j < c * r * r) {
              const std::int64_t hh = a * stride - pad + u, ww = e * stride - pad + v;
              term = hh >= 0 && hh < h && ww >= 0 && ww < w ? g * to_float(x.at(((i * c + ch) * h + hh) * w + ww)) : 0;
            }
            sum += term;
            magnitude += std::fabs(term);
          }
        }
      }
      const double got = to_float(j < c * r * r ? gw[static_cast<std::size_t>(f * c * r * r + j)]
                                                 : gb[static_cast<std::size_t>(f)]);
      EXPECT_NEAR(got, sum, 1e-6 * magnitude + rounding * std::fabs(sum)) << "filter " << f << " entry " << j;
    }
  }
}

TEST(NnGpu, Conv2dFirstLayerGradientsAgainstFloat64) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (Activation act : {Activation::none, Activation::relu}) {
    direct_wgrad_case<float>(1, 1, 1, act);
    direct_wgrad_case<half>(1, 1, 1, act);
    direct_wgrad_case<bfloat16>(3, 1, 1, act);
    direct_wgrad_case<float>(3, 2, 0, act);
    direct_wgrad_case<half>(1, 1, 1, act, 70);
    direct_wgrad_case<float>(3, 2, 1, act, 70);
  }
}

using test::fused_case;

TEST(NnGpu, FusedBackwardOfConsecutiveLinearLayers) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (auto [a, b] : {std::pair{Activation::relu, Activation::gelu}, std::pair{Activation::gelu, Activation::relu}}) {
    fused_case<half>(a, b, 200, 96);   // 200: the mask's ld is rounded up to 256 bits
    fused_case<bfloat16>(a, b, 128, 64);
    fused_case<float>(a, b, 72, 40);
  }
  fused_case<half>(Activation::gelu, Activation::none, 36, 24);  // GELU with out % 8 != 0: not fused
}

// Device scalars: the scale in, the loss and the bad-label flag out.
struct Scalars {
  Buffer buf{3 * sizeof(float), Device::cuda(0)};
  explicit Scalars(float scale) {
    const float init[3] = {scale, 0.0f, 0.0f};
    EXPECT_EQ(cudaMemcpy(buf.data(), init, sizeof init, cudaMemcpyHostToDevice), cudaSuccess);
  }
  const float* scale() { return static_cast<float*>(buf.data()); }
  float* loss() { return static_cast<float*>(buf.data()) + 1; }
  int* bad() { return reinterpret_cast<int*>(static_cast<float*>(buf.data()) + 2); }
  float read(const void* p) {
    float v = 0;
    EXPECT_EQ(cudaMemcpy(&v, p, sizeof v, cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

template <class T>
void xent_case(float scale) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " scale " + std::to_string(scale));
  const std::int64_t batch = 37, classes = 10;
  Tensor<T> z({batch, classes}), dz({batch, classes});
  fill_normal(z, 0, 3, 6);
  std::vector<std::int32_t> labels(batch);
  for (std::int64_t b = 0; b < batch; ++b) labels[b] = static_cast<std::int32_t>((b * 7) % classes);
  const float want = nn::softmax_cross_entropy<T>(z.view(), labels.data(), scale, dz.view());
  Tensor<T> gz = on_gpu(z), gdz({batch, classes}, Device::cuda(0));
  Buffer glabels(batch * sizeof(std::int32_t), Device::cuda(0));
  ASSERT_EQ(cudaMemcpy(glabels.data(), labels.data(), glabels.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  Scalars s(scale);
  nn::softmax_cross_entropy<T>(gz.view(), static_cast<const std::int32_t*>(glabels.data()), s.scale(), gdz.view(),
                               s.loss(), s.bad());
  EXPECT_NEAR(s.read(s.loss()), want, 1e-5 * std::fabs(want));
  EXPECT_EQ(s.read(s.bad()), 0.0f);
  expect_close<T>(gdz.view(), dz.view(), "dlogits");
}

// The loss's mean is taken by the softmax kernel's last block to finish:
// a batch of many blocks, its loss the CPU's, and the same bits on every
// call whichever block finished last (the counter is left at zero for the
// next call).
TEST(NnGpu, SoftmaxLossMeanByTheLastBlockRepeatsItsBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 1000, classes = 10;  // 125 blocks of 8 rows
  Tensor<half> z({batch, classes}), dz({batch, classes});
  fill_normal(z, 0, 3, 11);
  std::vector<std::int32_t> labels(batch);
  for (std::int64_t b = 0; b < batch; ++b) labels[b] = static_cast<std::int32_t>((b * 3) % classes);
  const float want = nn::softmax_cross_entropy<half>(z.view(), labels.data(), 1.0f, dz.view());
  Tensor<half> gz = on_gpu(z), gdz({batch, classes}, Device::cuda(0));
  Buffer glabels(batch * sizeof(std::int32_t), Device::cuda(0));
  ASSERT_EQ(cudaMemcpy(glabels.data(), labels.data(), glabels.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  Scalars s(1.0f);
  std::vector<float> got;
  for (int call = 0; call < 20; ++call) {
    ASSERT_EQ(cudaMemset(s.loss(), 0xff, sizeof(float)), cudaSuccess);  // NaN: a call that wrote nothing shows
    nn::softmax_cross_entropy<half>(gz.view(), static_cast<const std::int32_t*>(glabels.data()), s.scale(),
                                    gdz.view(), s.loss(), s.bad());
    got.push_back(s.read(s.loss()));
  }
  EXPECT_NEAR(got[0], want, 1e-5 * std::fabs(want));
  for (std::size_t k = 1; k < got.size(); ++k) {
    EXPECT_EQ(std::memcmp(&got[k], &got[0], sizeof(float)), 0) << "call " << k << ": " << got[k] << " vs " << got[0];
  }
}

TEST(NnGpu, SoftmaxCrossEntropyAndMse) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (float scale : {1.0f, 1024.0f, 65536.0f}) {
    xent_case<half>(scale);
    xent_case<bfloat16>(scale);
    xent_case<float>(scale);
  }
  // An out-of-range label sets the flag.
  Tensor<float> z({2, 3}, Device::cuda(0)), dz({2, 3}, Device::cuda(0));
  fill(z, 0.0f);
  const std::int32_t bad[2] = {0, 3};
  Buffer glabels(sizeof bad, Device::cuda(0));
  ASSERT_EQ(cudaMemcpy(glabels.data(), bad, sizeof bad, cudaMemcpyHostToDevice), cudaSuccess);
  Scalars s(1.0f);
  nn::softmax_cross_entropy<float>(z.view(), static_cast<const std::int32_t*>(glabels.data()), s.scale(), dz.view(),
                                   s.loss(), s.bad());
  int flag = 0;
  ASSERT_EQ(cudaMemcpy(&flag, s.bad(), sizeof flag, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(flag, 1);
  // MSE.
  Tensor<half> y({300, 7}), t({300, 7}), dy({300, 7});
  fill_normal(y, 0, 1, 8);
  fill_normal(t, 0, 1, 9);
  const float want = nn::mse<half>(y.view(), t.view(), 512.0f, dy.view());
  Tensor<half> gy = on_gpu(y), gt = on_gpu(t), gdy({300, 7}, Device::cuda(0));
  Scalars m(512.0f);
  nn::mse<half>(gy.view(), gt.view(), m.scale(), gdy.view(), m.loss());
  EXPECT_NEAR(m.read(m.loss()), want, 1e-5 * want);
  expect_close<half>(gdy.view(), dy.view(), "mse dy");
}

// A whole MLP with the loss scale read from a DeviceGradScaler: forward,
// loss, backward and AdamW steps on the GPU against the CPU.
TEST(NnGpu, MlpTrainingStepsMatchTheCpu) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::int64_t batch = 64, in = 32, hidden = 64, classes = 10;
  auto build = [&](Device d) {
    auto net = std::make_unique<nn::Sequential<float>>(Shape{batch, in}, d);
    net->emplace<nn::Linear<float>>(in, hidden, Activation::relu, true, d, 1);
    net->emplace<nn::Linear<float>>(hidden, hidden, Activation::gelu, true, d, 2);
    net->emplace<nn::Linear<float>>(hidden, classes, Activation::none, true, d, 3);
    return net;
  };
  auto cpu = build(Device::cpu()), gpu = build(Device::cuda(0));
  optim::AdamW cpu_opt(cpu->parameters()), gpu_opt(gpu->parameters());
  amp::GradScaler cpu_scaler;
  amp::DeviceGradScaler gpu_scaler;
  Tensor<float> x({batch, in});
  std::vector<std::int32_t> labels(batch);
  Buffer glabels(batch * sizeof(std::int32_t), Device::cuda(0)), scalars(2 * sizeof(float), Device::cuda(0));
  ASSERT_EQ(cudaMemset(scalars.data(), 0, scalars.bytes()), cudaSuccess);
  for (int step = 0; step < 5; ++step) {
    fill_normal(x, 0, 1, 100 + step);
    for (std::int64_t b = 0; b < batch; ++b) labels[b] = static_cast<std::int32_t>((b + step) % classes);
    Tensor<float> gx = on_gpu(x);
    ASSERT_EQ(cudaMemcpy(glabels.data(), labels.data(), glabels.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    const float loss = nn::softmax_cross_entropy<float>(cpu->forward(x.view()), labels.data(), cpu_scaler.scale(),
                                                         cpu->output_grad());
    cpu->backward();
    cpu_scaler.step(cpu_opt);
    cpu_scaler.update();
    float* gloss = static_cast<float*>(scalars.data());
    nn::softmax_cross_entropy<float>(gpu->forward(gx.view()), static_cast<const std::int32_t*>(glabels.data()),
                                     gpu_scaler.scale_data(), gpu->output_grad(), gloss,
                                     reinterpret_cast<int*>(gloss + 1));
    gpu->backward();
    gpu_scaler.step(gpu_opt);
    gpu_scaler.update();
    float have = 0;
    ASSERT_EQ(cudaMemcpy(&have, gloss, sizeof have, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_NEAR(have, loss, 1e-4 * loss) << "step " << step;
  }
  for (std::size_t i = 0; i < cpu_opt.num_params(); ++i) {
    const Tensor<float> g = gpu_opt.master(i).to(Device::cpu());
    double worst = 0, scale = 0;
    for (std::int64_t e = 0; e < g.numel(); ++e) {
      worst = std::max(worst, std::fabs(double(g.at(e)) - cpu_opt.master(i).at(e)));
      scale = std::max(scale, std::fabs(double(cpu_opt.master(i).at(e))));
    }
    EXPECT_LE(worst, 1e-4 * scale) << cpu_opt.param(i).name;
  }
}

// Forward, loss, backward, DeviceGradScaler step and update captured in one
// CUDA graph (after one eager step, which makes the cuBLASLt plans) and
// replayed with fresh inputs: the same bits as the eager run.
TEST(NnGpu, WholeTrainingStepInACudaGraph) {
  MIXPREC_SKIP_WITHOUT_GPU();
  test::OwnedStream owner;
  const Device gpu = Device::cuda(0);
  const std::int64_t batch = 128, in = 64, hidden = 256, classes = 10;
  struct Model {
    nn::Sequential<half> net;
    std::unique_ptr<optim::AdamW> opt;
    std::unique_ptr<amp::DeviceGradScaler> scaler;
    Tensor<half> x;
    Buffer labels, scalars;
    Model(Device d, cudaStream_t stream, std::int64_t batch, std::int64_t in, std::int64_t hidden, std::int64_t classes)
        : net({batch, in}, d, /*fuse_linear_backward=*/true), x({batch, in}, d), labels(batch * 4, d), scalars(8, d) {
      net.emplace<nn::Linear<half>>(in, hidden, Activation::relu, true, d, 1);
      net.emplace<nn::Linear<half>>(hidden, hidden, Activation::gelu, true, d, 2);
      net.emplace<nn::Linear<half>>(hidden, classes, Activation::none, true, d, 3);
      opt = std::make_unique<optim::AdamW>(net.parameters());
      amp::GradScalerOptions so;
      so.growth_interval = 4;
      scaler = std::make_unique<amp::DeviceGradScaler>(so, d, stream);
      EXPECT_EQ(cudaMemset(scalars.data(), 0, scalars.bytes()), cudaSuccess);
    }
    void step(cudaStream_t stream) {
      float* s = static_cast<float*>(scalars.data());
      const nn::Context ctx{stream};
      nn::softmax_cross_entropy<half>(net.forward(x.view(), ctx), static_cast<const std::int32_t*>(labels.data()),
                                      scaler->scale_data(), net.output_grad(), s, reinterpret_cast<int*>(s + 1), ctx);
      net.backward(ctx);
      scaler->step(*opt, 1.0);
      scaler->update();
    }
    void data(int it, cudaStream_t stream) {
      Tensor<half> hx({x.shape()[0], x.shape()[1]});
      fill_normal(hx, 0, 1, 500 + it);
      copy(hx, x, stream);
      std::vector<std::int32_t> l(static_cast<std::size_t>(x.shape()[0]));
      for (std::size_t b = 0; b < l.size(); ++b) l[b] = static_cast<std::int32_t>((b * 3 + it) % 10);
      EXPECT_EQ(cudaMemcpyAsync(labels.data(), l.data(), labels.bytes(), cudaMemcpyHostToDevice, stream), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    }
  };
  Model eager(gpu, owner.s, batch, in, hidden, classes), graphed(gpu, owner.s, batch, in, hidden, classes);
  for (Model* m : {&eager, &graphed}) {  // the warm-up step
    m->data(0, owner.s);
    m->step(owner.s);
  }
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaStreamBeginCapture(owner.s, cudaStreamCaptureModeGlobal), cudaSuccess);
  graphed.step(owner.s);
  ASSERT_EQ(cudaStreamEndCapture(owner.s, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int it = 1; it <= 30; ++it) {
    eager.data(it, owner.s);
    graphed.data(it, owner.s);
    eager.step(owner.s);
    ASSERT_EQ(cudaGraphLaunch(exec, owner.s), cudaSuccess);
  }
  ASSERT_EQ(cudaStreamSynchronize(owner.s), cudaSuccess);
  EXPECT_EQ(graphed.opt->applied_steps(), eager.opt->applied_steps());
  EXPECT_EQ(graphed.scaler->scale(), eager.scaler->scale());
  EXPECT_GT(eager.scaler->scale(), 65536.0f);  // the scale grew: growth_interval 4
  for (std::size_t i = 0; i < eager.opt->num_params(); ++i) {
    const Tensor<float> a = eager.opt->master(i).to(Device::cpu()), b = graphed.opt->master(i).to(Device::cpu());
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.bytes()), 0) << eager.opt->param(i).name;
  }
  float la = 0, lb = 0;
  ASSERT_EQ(cudaMemcpy(&la, eager.scalars.data(), 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(&lb, graphed.scalars.data(), 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(la, lb);
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
}

// Batches on the device serve the same rows and labels as on the host, for
// rows of 16-byte words (vector copies) and of 6 bytes (byte copies); a graph
// that captured next(), count_correct and accumulate serves a new batch per
// replay; the tallies come back through pinned memory behind an Event.
template <class T>
void check_device_batches(std::int64_t width) {
  const std::int64_t n = 37, batch = 8;
  Tensor<T> rows({n, width});
  fill_normal(rows, 0, 1, 77);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r) labels[static_cast<std::size_t>(r)] = static_cast<std::int32_t>((r * 5) % width);
  Stream stream;
  const nn::Context ctx{stream.get()};
  data::Batches<T> host(rows.view(), labels, batch), dev(rows.view(), labels, batch, Device::cuda(0), stream.get());
  std::mt19937_64 rng_a(3), rng_b(3);
  host.shuffle(rng_a);
  dev.shuffle(rng_b);
  Buffer tallies(16, Device::cuda(0));  // float loss-like sum, then int64 correct count
  ASSERT_EQ(cudaMemset(tallies.data(), 0, 16), cudaSuccess);
  auto* sum = static_cast<float*>(tallies.data());
  auto* correct = reinterpret_cast<std::int64_t*>(static_cast<char*>(tallies.data()) + 8);
  Buffer one(sizeof(float), Device::cuda(0));
  const float one_host = 1.0f;
  detail::copy_raw(one.data(), Device::cuda(0), &one_host, Device::cpu(), sizeof one_host);
  auto device_step = [&] {
    dev.next();
    nn::count_correct<T>(dev.x(), dev.labels(), batch, correct, ctx);  // the rows as logits
    nn::accumulate(Device::cuda(0), sum, static_cast<const float*>(one.data()), ctx);
  };
  device_step();  // eager first call
  Graph graph;
  graph.capture(stream.get(), device_step);
  std::int64_t expected_correct = 0;
  PinnedBuffer snapshot(16);
  Event done;
  for (int k = 0; k < 7; ++k) {  // 7 * 8 = 56 > 37 rows: the order wraps
    if (k > 0) graph.replay(stream.get());
    host.next();
    expected_correct += nn::count_correct<T>(host.x(), host.labels(), batch);
    Tensor<T> got({batch, width});
    stream.synchronize();
    copy(dev.x(), got);
    ASSERT_EQ(std::memcmp(got.data(), host.x().data(), got.bytes()), 0) << "batch " << k;
    std::vector<std::int32_t> got_labels(static_cast<std::size_t>(batch));
    detail::copy_raw(got_labels.data(), Device::cpu(), dev.labels(), Device::cuda(0), got_labels.size() * 4);
    for (std::int64_t b = 0; b < batch; ++b) EXPECT_EQ(got_labels[static_cast<std::size_t>(b)], host.labels()[b]);
  }
  copy_to_host_async(snapshot, 0, tallies.data(), 16, stream.get());
  done.record(stream.get());
  done.synchronize();
  EXPECT_TRUE(done.ready());
  float got_sum = 0;
  std::int64_t got_correct = 0;
  std::memcpy(&got_sum, snapshot.data(), 4);
  std::memcpy(&got_correct, static_cast<const char*>(snapshot.data()) + 8, 8);
  EXPECT_EQ(got_sum, 7.0f);
  EXPECT_EQ(got_correct, expected_correct);
  EXPECT_GT(expected_correct, 0);
  EXPECT_THROW(copy_to_host_async(snapshot, 8, tallies.data(), 16, stream.get()), Error);
}

TEST(NnGpu, DeviceBatchesGraphsAndPinnedSnapshots) {
  MIXPREC_SKIP_WITHOUT_GPU();
  check_device_batches<half>(8);   // 16-byte rows
  check_device_batches<float>(3);  // 12-byte rows
  check_device_batches<bfloat16>(3);
}

// A capture whose body synchronises fails with CUDA's reason, whether the
// body throws or ignores the refusal; the graph captured before stays and
// replays, the stream is usable, and the next launch is not blamed for the
// failure. (CUDA reports the refused calls as API errors: gpu-check.sh
// leaves this test out of the sanitizer runs.)
TEST(NnGpu, GraphCaptureThatSynchronisesFailsClearly) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Graph graph;
  EXPECT_THROW(graph.replay(nullptr), Error);
  EXPECT_THROW(graph.capture(nullptr, [] {}), Error);
  Stream stream;
  Buffer b(8, Device::cuda(0));
  ASSERT_EQ(cudaMemset(b.data(), 0, 8), cudaSuccess);
  float* sum = static_cast<float*>(b.data());
  const float one = 1.0f;
  detail::copy_raw(sum + 1, Device::cuda(0), &one, Device::cpu(), sizeof one);
  const nn::Context ctx{stream.get()};
  graph.capture(stream.get(), [&] { nn::accumulate(Device::cuda(0), sum, sum + 1, ctx); });
  int host = 0;
  try {
    graph.capture(stream.get(),
                  [&] { detail::copy_raw(&host, Device::cpu(), b.data(), Device::cuda(0), 4, stream.get()); });
    FAIL() << "a synchronising capture succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaErrorStreamCapture"), std::string::npos) << e.what();
  }
  try {
    graph.capture(stream.get(), [&] { (void)cudaStreamSynchronize(stream.get()); });  // refusal ignored
    FAIL() << "an invalidated capture succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaStreamEndCapture"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_FALSE(graph.empty());
  graph.replay(stream.get());  // the first capture: sum += 1, twice
  nn::accumulate(Device::cuda(0), sum, sum + 1, ctx);  // an eager launch, checked
  float got = 0;
  detail::copy_raw(&got, Device::cpu(), sum, Device::cuda(0), sizeof got, stream.get());
  EXPECT_EQ(got, 2.0f);
}

TEST(NnGpu, DeviceMismatchIsAClearError) {
  MIXPREC_SKIP_WITHOUT_GPU();
  nn::Sequential<half> net({4, 8}, Device::cuda(0));
  try {
    net.emplace<nn::Linear<half>>(8, 4);  // a CPU layer into a GPU Sequential
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is on cpu, the Sequential on cuda:0"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mixprec

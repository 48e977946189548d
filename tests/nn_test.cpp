// SPDX-License-Identifier: Apache-2.0
// The CPU layers and losses against an independent float64 reference
// (written here from the definitions) and central finite differences on
// that reference: every layer, activation and loss, and a whole network.
// Then loss scaling through a real backward: gradients scale with S, an S
// that overflows fp16 makes the scaler skip, and a gradient that underflows
// fp16 at S = 1 survives at S = 2^16. Then bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "conv_cases.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using nn::Activation;
using Vec = std::vector<double>;

// --- the float64 reference ---------------------------------------------------

double act_ref(Activation a, double z) {
  if (a == Activation::relu) return z > 0 ? z : 0;
  if (a == Activation::gelu) {
    const double c = std::sqrt(2.0 / M_PI);
    return 0.5 * z * (1 + std::tanh(c * (z + 0.044715 * z * z * z)));
  }
  return z;
}

// y[b, o] = act(sum_i x[b, i] w[o, i] + bias[o])
Vec linear_ref(const Vec& x, const Vec& w, const Vec& bias, int batch, int in, int out, Activation a) {
  Vec y(static_cast<std::size_t>(batch * out));
  for (int b = 0; b < batch; ++b) {
    for (int o = 0; o < out; ++o) {
      double z = bias.empty() ? 0 : bias[o];
      for (int i = 0; i < in; ++i) z += x[b * in + i] * w[o * in + i];
      y[b * out + o] = act_ref(a, z);
    }
  }
  return y;
}

double xent_ref(const Vec& z, const std::vector<std::int32_t>& labels, int batch, int classes) {
  double total = 0;
  for (int b = 0; b < batch; ++b) {
    double m = -INFINITY, s = 0;
    for (int c = 0; c < classes; ++c) m = std::max(m, z[b * classes + c]);
    for (int c = 0; c < classes; ++c) s += std::exp(z[b * classes + c] - m);
    total += m + std::log(s) - z[b * classes + labels[b]];
  }
  return total / batch;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of f at v, every element.
Vec finite_differences(const std::function<double(const Vec&)>& f, Vec v, double h = 1e-6) {
  Vec g(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const double keep = v[i];
    v[i] = keep + h;
    const double up = f(v);
    v[i] = keep - h;
    const double down = f(v);
    v[i] = keep;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

Vec random_vec(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  Vec v(n);
  for (double& x : v) x = d(rng);
  return v;
}

template <class T>
Tensor<T> tensor_of(const Vec& v, Shape shape) {
  Tensor<T> t(std::move(shape));
  for (std::size_t i = 0; i < v.size(); ++i) t.at(static_cast<std::int64_t>(i)) = from_float<T>(static_cast<float>(v[i]));
  return t;
}
template <class T>
Vec vec_of(const Tensor<T>& t) {
  Vec v(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = to_float(t.at(static_cast<std::int64_t>(i)));
  return v;
}
// The values the float layer actually sees (inputs rounded to float).
Vec rounded(Vec v) {
  for (double& x : v) x = static_cast<float>(x);
  return v;
}

void expect_close(const Vec& have, const Vec& want, double rtol, double atol, const char* what) {
  ASSERT_EQ(have.size(), want.size()) << what;
  for (std::size_t i = 0; i < have.size(); ++i) {
    ASSERT_LE(std::fabs(have[i] - want[i]), atol + rtol * std::fabs(want[i]))
        << what << "[" << i << "]: " << have[i] << " vs " << want[i];
  }
}

// --- gradient checks -----------------------------------------------------------

class LinearGradcheck : public ::testing::TestWithParam<Activation> {};

TEST_P(LinearGradcheck, MatchesFiniteDifferences) {
  const Activation a = GetParam();
  const int batch = 4, in = 6, out = 5;
  nn::Linear<float> layer(in, out, a, true, Device::cpu(), 7);
  const Vec x = rounded(random_vec(batch * in, 1)), dy = rounded(random_vec(batch * out, 2));
  const Vec w = vec_of(layer.weight()), b = vec_of(layer.bias());
  Tensor<float> xt = tensor_of<float>(x, {batch, in}), yt({batch, out}), dyt = tensor_of<float>(dy, {batch, out}),
                dxt({batch, in});
  layer.forward(xt.view(), yt.view(), {});
  expect_close(vec_of(yt), linear_ref(x, w, b, batch, in, out, a), 1e-5, 1e-6, "y");
  layer.backward(xt.view(), yt.view(), dyt.view(), dxt.view(), {});
  // L = sum(dy * y): its gradients are what backward computes from dy.
  const auto loss_w = [&](const Vec& v) { return dot(dy, linear_ref(x, v, b, batch, in, out, a)); };
  const auto loss_b = [&](const Vec& v) { return dot(dy, linear_ref(x, w, v, batch, in, out, a)); };
  const auto loss_x = [&](const Vec& v) { return dot(dy, linear_ref(v, w, b, batch, in, out, a)); };
  expect_close(vec_of(layer.grad_weight()), finite_differences(loss_w, w), 1e-4, 1e-5, "grad_weight");
  expect_close(vec_of(layer.grad_bias()), finite_differences(loss_b, b), 1e-4, 1e-5, "grad_bias");
  expect_close(vec_of(dxt), finite_differences(loss_x, x), 1e-4, 1e-5, "dx");
}
INSTANTIATE_TEST_SUITE_P(Activations, LinearGradcheck,
                         ::testing::Values(Activation::none, Activation::relu, Activation::gelu));

class ActivationGradcheck : public ::testing::TestWithParam<Activation> {};

TEST_P(ActivationGradcheck, MatchesFiniteDifferences) {
  const Activation a = GetParam();
  nn::ActivationLayer<float> layer(a);
  const Vec x = rounded(random_vec(64, 3, 2.0)), dy = rounded(random_vec(64, 4));
  Tensor<float> xt = tensor_of<float>(x, {8, 8}), yt({8, 8}), dyt = tensor_of<float>(dy, {8, 8}), dxt({8, 8});
  layer.forward(xt.view(), yt.view(), {});
  Vec want(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) want[i] = act_ref(a, x[i]);
  expect_close(vec_of(yt), want, 1e-5, 1e-6, "y");
  layer.backward(xt.view(), yt.view(), dyt.view(), dxt.view(), {});
  const auto loss = [&](const Vec& v) {
    double s = 0;
    for (std::size_t i = 0; i < v.size(); ++i) s += dy[i] * act_ref(a, v[i]);
    return s;
  };
  expect_close(vec_of(dxt), finite_differences(loss, x), 1e-4, 1e-5, "dx");
}
INSTANTIATE_TEST_SUITE_P(Activations, ActivationGradcheck, ::testing::Values(Activation::relu, Activation::gelu));

TEST(LossGradcheck, SoftmaxCrossEntropy) {
  const int batch = 5, classes = 7;
  const Vec z = rounded(random_vec(batch * classes, 5, 3.0));
  const std::vector<std::int32_t> labels = {0, 6, 3, 3, 1};
  Tensor<float> zt = tensor_of<float>(z, {batch, classes}), dz({batch, classes});
  for (float scale : {1.0f, 1024.0f}) {
    const float loss = nn::softmax_cross_entropy<float>(zt.view(), labels.data(), scale, dz.view());
    EXPECT_NEAR(loss, xent_ref(z, labels, batch, classes), 1e-6);
    Vec unscaled = vec_of(dz);
    for (double& g : unscaled) g /= scale;
    const auto f = [&](const Vec& v) { return xent_ref(v, labels, batch, classes); };
    expect_close(unscaled, finite_differences(f, z), 1e-4, 1e-6, "dlogits / scale");
  }
}

TEST(LossGradcheck, SoftmaxCrossEntropyIsStableForHugeLogits) {
  // exp(1000) overflows anything; the max-subtracted softmax does not.
  Tensor<float> z({1, 3}), dz({1, 3});
  z.at(0) = 1000.0f;
  z.at(1) = 990.0f;
  z.at(2) = -1000.0f;
  const std::int32_t label = 1;
  const float loss = nn::softmax_cross_entropy<float>(z.view(), &label, 1.0f, dz.view());
  EXPECT_NEAR(loss, 10.0 + std::log1p(std::exp(-10.0)), 1e-5);
  for (int c = 0; c < 3; ++c) EXPECT_TRUE(std::isfinite(dz.at(c)));
}

TEST(LossGradcheck, MeanSquaredError) {
  const Vec y = rounded(random_vec(12, 6)), t = rounded(random_vec(12, 7));
  Tensor<float> yt = tensor_of<float>(y, {3, 4}), tt = tensor_of<float>(t, {3, 4}), dy({3, 4});
  const float loss = nn::mse<float>(yt.view(), tt.view(), 8.0f, dy.view());
  const auto f = [&](const Vec& v) {
    double s = 0;
    for (std::size_t i = 0; i < v.size(); ++i) s += (v[i] - t[i]) * (v[i] - t[i]);
    return s / static_cast<double>(v.size());
  };
  EXPECT_NEAR(loss, f(y), 1e-6);
  Vec unscaled = vec_of(dy);
  for (double& g : unscaled) g /= 8.0;
  expect_close(unscaled, finite_differences(f, y), 1e-4, 1e-6, "dy / scale");
}

// conv2d in float64: x [n, c, h, w], w [k, c, r, r], zero padding.
Vec conv_ref(const Vec& x, const Vec& w, const Vec& b, int n, int c, int h, int wd, int k, int r, int stride,
             int pad) {
  const int p = (h + 2 * pad - r) / stride + 1, q = (wd + 2 * pad - r) / stride + 1;
  Vec y(static_cast<std::size_t>(n * k * p * q));
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < k; ++o)
      for (int a = 0; a < p; ++a)
        for (int e = 0; e < q; ++e) {
          double acc = b.empty() ? 0 : b[o];
          for (int ch = 0; ch < c; ++ch)
            for (int u = 0; u < r; ++u)
              for (int v = 0; v < r; ++v) {
                const int hh = a * stride - pad + u, ww = e * stride - pad + v;
                if (hh >= 0 && hh < h && ww >= 0 && ww < wd) {
                  acc += x[((i * c + ch) * h + hh) * wd + ww] * w[((o * c + ch) * r + u) * r + v];
                }
              }
          y[((i * k + o) * p + a) * q + e] = acc;
        }
  return y;
}

TEST(ConvGradcheck, MatchesFiniteDifferences) {
  for (const auto& setting : {std::pair{1, 0}, std::pair{1, 1}, std::pair{2, 1}}) {
    const int stride = setting.first, pad = setting.second;  // lambdas below capture them (no bindings: C++17)
    SCOPED_TRACE("stride " + std::to_string(stride) + " pad " + std::to_string(pad));
    const int n = 2, c = 3, h = 6, wd = 5, k = 4, r = 3;
    nn::Conv2d<float> conv(c, k, r, stride, pad, true, Device::cpu(), 9);
    const Shape out = conv.output_shape({n, c, h, wd});
    const Vec x = rounded(random_vec(n * c * h * wd, 10)), dy = rounded(random_vec(out.numel(), 11));
    const Vec w = vec_of(conv.weight()), b = vec_of(conv.bias());
    Tensor<float> xt = tensor_of<float>(x, {n, c, h, wd}), yt(out), dyt = tensor_of<float>(dy, out),
                  dxt({n, c, h, wd});
    conv.forward(xt.view(), yt.view(), {});
    expect_close(vec_of(yt), conv_ref(x, w, b, n, c, h, wd, k, r, stride, pad), 1e-5, 1e-6, "y");
    conv.backward(xt.view(), yt.view(), dyt.view(), dxt.view(), {});
    const auto lw = [&](const Vec& v) { return dot(dy, conv_ref(x, v, b, n, c, h, wd, k, r, stride, pad)); };
    const auto lb = [&](const Vec& v) { return dot(dy, conv_ref(x, w, v, n, c, h, wd, k, r, stride, pad)); };
    const auto lx = [&](const Vec& v) { return dot(dy, conv_ref(v, w, b, n, c, h, wd, k, r, stride, pad)); };
    expect_close(vec_of(conv.grad_weight()), finite_differences(lw, w), 1e-4, 1e-5, "grad_weight");
    expect_close(vec_of(conv.grad_bias()), finite_differences(lb, b), 1e-4, 1e-5, "grad_bias");
    expect_close(vec_of(dxt), finite_differences(lx, x), 1e-4, 1e-5, "dx");
  }
}

// A fused ReLU gives the bits of the layer pair (which the gradchecks here
// check against float64) on the CPU; nn_gpu_test runs the same case on a GPU.
TEST(ConvFusedRelu, IsTheConvolutionThenAReluLayer) {
  for (std::int64_t c : {1, 3}) {
    for (bool first : {true, false}) {
      test::expect_fused_relu_is_the_pair<float>(Device::cpu(), c, 1, 1, first);
      test::expect_fused_relu_is_the_pair<half>(Device::cpu(), c, 2, 0, first);
      test::expect_fused_relu_is_the_pair<bfloat16>(Device::cpu(), c, 1, 1, first);
    }
  }
}

TEST(PoolGradcheck, MatchesFiniteDifferences) {
  const int n = 2, c = 3, h = 6, wd = 4;
  nn::MaxPool2d<float> pool(2);
  // Distinct values, so every window has one maximum and the gradient is defined.
  Vec x = random_vec(n * c * h * wd, 12);
  x = rounded(x);
  const Vec dy = rounded(random_vec(n * c * 3 * 2, 13));
  const auto ref = [&](const Vec& v) {
    Vec y;
    for (int i = 0; i < n * c; ++i)
      for (int a = 0; a < 3; ++a)
        for (int e = 0; e < 2; ++e) {
          double m = -INFINITY;
          for (int u = 0; u < 2; ++u)
            for (int t = 0; t < 2; ++t) m = std::max(m, v[(i * h + 2 * a + u) * wd + 2 * e + t]);
          y.push_back(m);
        }
    return y;
  };
  Tensor<float> xt = tensor_of<float>(x, {n, c, h, wd}), yt({n, c, 3, 2}), dyt = tensor_of<float>(dy, {n, c, 3, 2}),
                dxt({n, c, h, wd});
  pool.forward(xt.view(), yt.view(), {});
  expect_close(vec_of(yt), ref(x), 0, 0, "y");
  pool.backward(xt.view(), yt.view(), dyt.view(), dxt.view(), {});
  expect_close(vec_of(dxt), finite_differences([&](const Vec& v) { return dot(dy, ref(v)); }, x), 1e-6, 1e-6, "dx");
}

// A whole network: Linear(relu) -> Linear(gelu) -> Linear -> cross-entropy,
// every parameter's gradient against finite differences of the reference.
TEST(SequentialGradcheck, WholeNetwork) {
  const int batch = 3, in = 5, h1 = 6, h2 = 4, classes = 3;
  nn::Sequential<float> net({batch, in});
  auto& l1 = net.emplace<nn::Linear<float>>(in, h1, Activation::relu, true, Device::cpu(), 11);
  auto& l2 = net.emplace<nn::Linear<float>>(h1, h2, Activation::gelu, true, Device::cpu(), 12);
  auto& l3 = net.emplace<nn::Linear<float>>(h2, classes, Activation::none, true, Device::cpu(), 13);
  const Vec x = rounded(random_vec(batch * in, 8));
  const std::vector<std::int32_t> labels = {2, 0, 1};
  Tensor<float> xt = tensor_of<float>(x, {batch, in});
  const TensorView<const float> logits = net.forward(xt.view());
  nn::softmax_cross_entropy<float>(logits, labels.data(), 1.0f, net.output_grad());
  net.backward();
  std::vector<Vec> params;
  for (nn::Linear<float>* l : {&l1, &l2, &l3}) {
    params.push_back(vec_of(l->weight()));
    params.push_back(vec_of(l->bias()));
  }
  const auto loss = [&](const std::vector<Vec>& p) {
    const Vec a1 = linear_ref(x, p[0], p[1], batch, in, h1, Activation::relu);
    const Vec a2 = linear_ref(a1, p[2], p[3], batch, h1, h2, Activation::gelu);
    return xent_ref(linear_ref(a2, p[4], p[5], batch, h2, classes, Activation::none), labels, batch, classes);
  };
  const std::vector<optim::Param> ps = net.parameters();
  ASSERT_EQ(ps.size(), 6u);
  EXPECT_EQ(ps[0].name, "0.weight");
  EXPECT_EQ(ps[5].name, "2.bias");
  for (std::size_t k = 0; k < params.size(); ++k) {
    const auto f = [&](const Vec& v) {
      std::vector<Vec> p = params;
      p[k] = v;
      return loss(p);
    };
    nn::Linear<float>* layers[] = {&l1, &l2, &l3};
    const Vec have = vec_of(k % 2 ? layers[k / 2]->grad_bias() : layers[k / 2]->grad_weight());
    expect_close(have, finite_differences(f, params[k]), 1e-4, 1e-6, ps[k].name.c_str());
  }
}

// --- loss scaling through a real backward --------------------------------------

// An fp16 MLP and its fp32 twin (same weights); both trained one backward
// from the same batch, the fp16 one with the loss scaled by S.
struct TwinMlp {
  static constexpr int batch = 8, in = 16, hidden = 32, classes = 4;
  nn::Sequential<half> h{Shape{batch, in}};
  nn::Sequential<float> f{Shape{batch, in}};
  Tensor<half> xh{Shape{batch, in}};
  Tensor<float> xf{Shape{batch, in}};
  std::vector<std::int32_t> labels = {0, 1, 2, 3, 3, 2, 1, 0};
  TwinMlp() {
    h.emplace<nn::Linear<half>>(in, hidden, Activation::relu, true, Device::cpu(), 21);
    h.emplace<nn::Linear<half>>(hidden, classes, Activation::none, true, Device::cpu(), 22);
    f.emplace<nn::Linear<float>>(in, hidden, Activation::relu, true, Device::cpu(), 21);
    f.emplace<nn::Linear<float>>(hidden, classes, Activation::none, true, Device::cpu(), 22);
    // The fp32 twin gets the fp16 weights exactly.
    const std::vector<optim::Param> ph = h.parameters(), pf = f.parameters();
    for (std::size_t i = 0; i < ph.size(); ++i) {
      convert(ph[i].weight.as<half>("w"), pf[i].weight.as<float>("w"));
    }
    fill_normal(xh, 0, 1, 5);
    convert(xh, xf);
  }
  void backward(float scale) {
    nn::softmax_cross_entropy<half>(h.forward(xh.view()), labels.data(), scale, h.output_grad());
    h.backward();
    nn::softmax_cross_entropy<float>(f.forward(xf.view()), labels.data(), 1.0f, f.output_grad());
    f.backward();
  }
};

TEST(LossScaling, GradientsScaleWithS) {
  for (float scale : {1.0f, 1024.0f, 65536.0f}) {
    TwinMlp m;
    m.backward(scale);
    const std::vector<optim::Param> ph = m.h.parameters(), pf = m.f.parameters();
    for (std::size_t i = 0; i < ph.size(); ++i) {
      const TensorView<const half> gh = ph[i].grad.as<const half>("g");
      const TensorView<const float> gf = pf[i].grad.as<const float>("g");
      double worst = 0, norm = 0;
      for (std::int64_t e = 0; e < gh.numel(); ++e) {
        worst = std::max(worst, static_cast<double>(std::fabs(to_float(gh.data()[e]) / scale - gf.data()[e])));
        norm = std::max(norm, static_cast<double>(std::fabs(gf.data()[e])));
      }
      // fp16 activations and gradients: a few roundings of 2^-11 relative.
      EXPECT_LE(worst, 1e-2 * norm + 1e-6) << ph[i].name << " at S = " << scale;
    }
  }
}

TEST(LossScaling, AnOverflowingScaleMakesTheScalerSkip) {
  TwinMlp m;
  // dlogits = S (p - onehot) / batch; at S = 2^22 that reaches 2^19 > 65504.
  m.backward(4194304.0f);
  optim::AdamW opt(m.h.parameters());
  amp::GradScalerOptions so;
  so.init_scale = 4194304.0;
  amp::GradScaler scaler(so);
  const Tensor<float> before = opt.master(0).clone();
  EXPECT_FALSE(scaler.step(opt));
  EXPECT_FALSE(scaler.nonfinite_params(opt).empty());
  scaler.update();
  EXPECT_EQ(scaler.scale(), 2097152.0f);
  EXPECT_EQ(std::memcmp(before.data(), opt.master(0).data(), before.bytes()), 0);
}

TEST(LossScaling, AGradientThatUnderflowsAtS1SurvivesAtS65536) {
  // y = x W^T with x = 1 and tiny weights: y ~ 9.5e-7, target 0, so
  // dL/dy = S * 2 y / 256 = S * 7.4e-9, below half of fp16's smallest
  // subnormal (5.96e-8) at S = 1: it rounds to 0 and the weight gets no
  // gradient at all. At S = 2^16 it is 4.9e-4 and the gradient is there.
  const int n = 256;
  auto weight_grad = [&](float scale) {
    nn::Sequential<half> net({n, 4});
    auto& l = net.emplace<nn::Linear<half>>(4, 1, Activation::none, false);
    fill(l.weight(), 2.5e-7f);
    Tensor<half> x({n, 4}), target({n, 1});
    fill(x, 1.0f);
    fill(target, 0.0f);
    nn::mse<half>(net.forward(x.view()), target.view(), scale, net.output_grad());
    net.backward();
    return to_float(l.grad_weight().at(0)) / scale;
  };
  // The true gradient: d/dw_j mean((sum_i w x_i)^2) = 2 (4 w) x_j = 8 w,
  // with w = fp16(2.5e-7).
  const double truth = 8.0 * to_float(from_float<half>(2.5e-7f));
  EXPECT_EQ(weight_grad(1.0f), 0.0f);
  EXPECT_NEAR(weight_grad(65536.0f), truth, 0.01 * truth);
}

// --- bad input --------------------------------------------------------------

TEST(NnErrors, ShapesBatchAndLabels) {
  nn::Sequential<float> net({4, 10});
  net.emplace<nn::Linear<float>>(10, 8, Activation::relu);
  test::expect_error([&] { net.emplace<nn::Linear<float>>(9, 3); },
                     {"Linear(9, 3)", "input shape [4, 8]", "expected [batch, 9]"});
  EXPECT_EQ(net.size(), 1u);  // the refused layer was not added
  Tensor<float> x({5, 10});
  fill(x, 1.0f);
  test::expect_error([&] { net.forward(x.view()); }, {"Sequential::forward", "[5, 10]", "[4, 10]", "batch size"});
  test::expect_error([] { nn::Linear<float>(0, 3); }, {"Linear", "in_features = 0"});
  test::expect_error([] { nn::Sequential<float>({4}); }, {"Sequential", "[4]"});
  Tensor<float> z({2, 3}), dz({2, 3});
  fill(z, 0.0f);
  const std::int32_t bad[2] = {1, 3};
  test::expect_error([&] { nn::softmax_cross_entropy<float>(z.view(), bad, 1.0f, dz.view()); },
                     {"labels[1] = 3", "[0, 3)"});
  test::expect_error([&] { nn::softmax_cross_entropy<float>(z.view(), bad, -1.0f, dz.view()); }, {"scale = -1"});
  Tensor<float> wrong({3, 2});
  test::expect_error([&] { nn::mse<float>(z.view(), wrong.view(), 1.0f, dz.view()); },
                     {"mse", "target shape [3, 2]"});
  test::expect_error([] { nn::ActivationLayer<float> layer(Activation::none); }, {"activation = none"});
  test::expect_error([] { nn::Conv2d<float>(3, 8, 0); }, {"Conv2d", "kernel = 0"});
  test::expect_error([] { nn::Conv2d<float>(3, 8, 3, 1, 0, true, Device::cpu(), 0, Activation::gelu); },
                     {"Conv2d", "activation = gelu", "ActivationLayer"});
  nn::Conv2d<float> conv(3, 8, 5);
  test::expect_error([&] { (void)conv.output_shape({2, 4, 28, 28}); }, {"Conv2d(3, 8", "[2, 4, 28, 28]", "[batch, 3"});
  test::expect_error([&] { (void)conv.output_shape({2, 3, 4, 4}); }, {"smaller than the kernel"});
  test::expect_error([] { nn::MaxPool2d<float>(0); }, {"MaxPool2d", "window = 0"});
}

TEST(NnErrors, DeviceLayerWithoutKernelsOrDevice) {
  if (!built_with_cuda()) {
    test::expect_error([] { nn::Linear<half>(4, 4, Activation::none, true, Device::cuda(0)); },
                       {"Linear", "cuda:0", "without CUDA"});
    return;
  }
  // A CUDA build without backend.cuh in the program (this test links none).
  test::expect_error([] { nn::Linear<half>(4, 4, Activation::relu, true, Device::cuda(0)); },
                     {"Linear(4, 4, relu)", "cuda:0", "<mixprec/cuda/backend.cuh>"});
}

}  // namespace
}  // namespace mixprec

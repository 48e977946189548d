// SPDX-License-Identifier: Apache-2.0
// A layer on the GPU against the same layer on the CPU (nn_gpu_test,
// gemm_algorithms_gpu_test): same seeds give the same weights on both.
// Tolerances, as a fraction of the largest reference value of each tensor:
// fp32 1e-5, fp16 4e-3, bf16 3e-2 (outputs are rounded to T once on both
// sides, but the GPU sums the products in another order and may round bias
// + activation in its own order, so 16-bit results may differ by a few ulp).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec::test {

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, half> ? 4e-3 : 3e-2;
}

// A tensor's elements, copied to the host.
template <class T>
std::vector<T> host(const TensorView<const T>& t) {
  Tensor<T> h(t.shape());
  copy(t, h);
  return std::vector<T>(h.data(), h.data() + h.numel());
}

template <class T>
void expect_close(const TensorView<const T>& gpu, const TensorView<const T>& cpu, const std::string& what) {
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  Tensor<T> g(gpu.shape());
  copy(gpu, g);
  double scale = 0, worst = 0;
  for (std::int64_t i = 0; i < cpu.numel(); ++i) scale = std::max(scale, std::fabs(double(to_float(cpu.data()[i]))));
  for (std::int64_t i = 0; i < cpu.numel(); ++i) {
    const double a = to_float(g.at(i)), b = to_float(cpu.data()[i]);
    ASSERT_TRUE(std::isfinite(a)) << what << "[" << i << "]";
    worst = std::max(worst, std::fabs(a - b));
  }
  EXPECT_LE(worst, tolerance<T>() * scale + 1e-30) << what << " (" << dtype_traits<T>::name << ")";
}

template <class T>
Tensor<T> on_gpu(const Tensor<T>& t) {
  return t.to(Device::cuda(0));
}

// The same layer on the CPU and the GPU, same weights: forward on x,
// backward from a random dy; compares y, dx and every parameter gradient.
template <class T>
void compare_layer(nn::Layer<T>& cpu, nn::Layer<T>& gpu, const Tensor<T>& x, std::uint64_t seed) {
  const Shape out = cpu.output_shape(x.shape());
  Tensor<T> dy(out), y(out), dx(x.shape());
  fill_normal(dy, 0, 1, seed);
  Tensor<T> gx = on_gpu(x), gdy = on_gpu(dy), gy(out, Device::cuda(0)), gdx(x.shape(), Device::cuda(0));
  cpu.forward(x.view(), y.view(), {});
  gpu.forward(gx.view(), gy.view(), {});
  expect_close<T>(gy.view(), y.view(), "y");
  cpu.backward(x.view(), y.view(), dy.view(), dx.view(), {});
  gpu.backward(gx.view(), gy.view(), gdy.view(), gdx.view(), {});
  expect_close<T>(gdx.view(), dx.view(), "dx");
  const std::vector<optim::Param> pc = cpu.parameters(""), pg = gpu.parameters("");
  ASSERT_EQ(pc.size(), pg.size());
  for (std::size_t i = 0; i < pc.size(); ++i) {
    expect_close<T>(pg[i].grad.as<const T>("g"), pc[i].grad.as<const T>("g"), "grad of " + pc[i].name);
  }
}

// Consecutive Linear layers in a Sequential fuse on the GPU: the second's
// input-gradient GEMM applies the first's ReLU or GELU derivative (DRELU /
// DGELU epilogues, ReLU through a bit mask whose leading dimension is
// rounded up to 128 bits) and writes its bias gradient. Against the CPU.
template <class T>
void fused_case(nn::Activation first, nn::Activation second, std::int64_t h1, std::int64_t h2) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " " + nn::activation_name(first) + "(" + std::to_string(h1) +
               ") " + nn::activation_name(second) + "(" + std::to_string(h2) + ")");
  const std::int64_t batch = 48, in = 40, out = 16;
  auto build = [&](Device d) {
    auto net = std::make_unique<nn::Sequential<T>>(Shape{batch, in}, d, /*fuse_linear_backward=*/true);
    net->template emplace<nn::Linear<T>>(in, h1, first, true, d, 1);
    net->template emplace<nn::Linear<T>>(h1, h2, second, true, d, 2);
    net->template emplace<nn::Linear<T>>(h2, out, nn::Activation::none, true, d, 3);
    return net;
  };
  auto cpu = build(Device::cpu()), gpu = build(Device::cuda(0));
  Tensor<T> x({batch, in}), dy({batch, out});
  fill_normal(x, 0, 1, 11);
  fill_normal(dy, 0, 1, 12);
  Tensor<T> gx = on_gpu(x);
  cpu->forward(x.view());
  gpu->forward(gx.view());
  copy(dy, cpu->output_grad());
  copy(dy, gpu->output_grad());
  cpu->backward();
  gpu->backward();
  const std::vector<optim::Param> pc = cpu->parameters(), pg = gpu->parameters();
  for (std::size_t i = 0; i < pc.size(); ++i) {
    expect_close<T>(pg[i].grad.as<const T>("g"), pc[i].grad.as<const T>("g"), pc[i].name);
  }
}

// A device Linear layer's forward + backward on x [batch, in] and a random
// dy, called 4 times eagerly and once as a replayed CUDA graph, every output
// (y, dx, each parameter gradient) overwritten with noise in between: each
// call gives the first call's bits. The first call makes any plan.
template <class T>
void expect_same_bits_every_call(nn::Linear<T>& layer, std::int64_t batch, std::uint64_t seed) {
  const std::int64_t in = layer.in_features(), out = layer.out_features();
  const Device gpu = layer.device();
  Tensor<T> x({batch, in}), dy({batch, out});
  fill_normal(x, 0, 1, seed);
  fill_normal(dy, 0, 1, seed + 1);
  Tensor<T> gx = x.to(gpu), gdy = dy.to(gpu), gy({batch, out}, gpu), gdx({batch, in}, gpu);
  Stream stream;
  const nn::Context ctx{stream.get()};
  const auto step = [&] {
    layer.forward(gx.view(), gy.view(), ctx);
    layer.backward(gx.view(), gy.view(), gdy.view(), gdx.view(), ctx);
  };
  const std::vector<optim::Param> params = layer.parameters("");
  const auto outputs = [&] {
    stream.synchronize();
    std::vector<Tensor<T>> all;
    all.push_back(Tensor<T>(gy.shape()));
    copy(gy, all.back());
    all.push_back(Tensor<T>(gdx.shape()));
    copy(gdx, all.back());
    for (const optim::Param& p : params) {
      const TensorView<const T> g = p.grad.as<const T>("grad");
      all.push_back(Tensor<T>(g.shape()));
      copy(g, all.back());
    }
    return all;
  };
  const auto scribble = [&](std::uint64_t s) {  // outputs overwritten, not accumulated
    fill_normal(gy, 0, 1, s);
    fill_normal(gdx, 0, 1, s + 1);
    for (const optim::Param& p : params) {
      TensorView<T> g = p.grad.as<T>("grad");
      Tensor<T> noise(g.shape());
      fill_normal(noise, 0, 1, s + 2);
      copy(noise, g);
    }
  };
  step();
  const std::vector<Tensor<T>> first = outputs();
  const auto same = [&](const char* when) {
    const std::vector<Tensor<T>> got = outputs();
    ASSERT_EQ(got.size(), first.size());
    for (std::size_t t = 0; t < first.size(); ++t) {
      EXPECT_EQ(std::memcmp(got[t].data(), first[t].data(), first[t].numel() * sizeof(T)), 0)
          << when << ": tensor " << t << " (y, dx, then the parameters' gradients)";
    }
  };
  for (int i = 0; i < 3; ++i) {
    scribble(seed + 10 * (i + 1));
    step();
    same("an eager call");
  }
  Graph graph;
  graph.capture(stream.get(), step);
  scribble(seed + 100);
  graph.replay(stream.get());
  same("a graph replay");
}

}  // namespace mixprec::test

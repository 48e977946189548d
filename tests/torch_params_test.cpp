// SPDX-License-Identifier: Apache-2.0
// The libtorch adapter (mixprec/torch/params.hpp): its views alias torch's
// storage (a step through them gives the torch tensors exactly the bits the
// same optimizer gives mixprec's own tensors with the same values), the
// module helpers, and every error message.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "mixprec/torch/params.hpp"
#include "test_util.hpp"

namespace {

using mixprec::Device;
using mixprec::DType;
using mixprec::Tensor;
using mixprec::test::expect_error;
namespace optim = mixprec::optim;
namespace amp = mixprec::amp;
namespace libtorch = mixprec::libtorch;

template <class T>
constexpr torch::ScalarType torch_type();
template <>
constexpr torch::ScalarType torch_type<mixprec::half>() { return torch::kHalf; }
template <>
constexpr torch::ScalarType torch_type<mixprec::bfloat16>() { return torch::kBFloat16; }
template <>
constexpr torch::ScalarType torch_type<float>() { return torch::kFloat; }

// A torch tensor holding exactly the bits of a mixprec tensor.
template <class T>
torch::Tensor torch_copy(const Tensor<T>& t) {
  std::vector<std::int64_t> sizes(t.shape().dims().begin(), t.shape().dims().end());
  torch::Tensor out = torch::empty(sizes, torch::TensorOptions().dtype(torch_type<T>()));
  std::memcpy(out.data_ptr(), t.data(), t.bytes());
  return out;
}

bool same_bits(const torch::Tensor& a, const void* b, std::size_t bytes) {
  return a.is_contiguous() && static_cast<std::size_t>(a.numel() * a.element_size()) == bytes &&
         std::memcmp(a.data_ptr(), b, bytes) == 0;
}

template <class T>
class TorchParams : public ::testing::Test {};
using ElementTypes = ::testing::Types<mixprec::half, mixprec::bfloat16, float>;
TYPED_TEST_SUITE(TorchParams, ElementTypes);

TYPED_TEST(TorchParams, ViewsAliasTheTensorAndItsGrad) {
  using T = TypeParam;
  torch::Tensor w = torch::randn({3, 5}).to(torch_type<T>()).requires_grad_();
  w.mutable_grad() = torch::randn({3, 5}).to(torch_type<T>());
  const optim::Param p = libtorch::param("fc.weight", w);
  EXPECT_EQ(p.name, "fc.weight");
  EXPECT_EQ(p.weight.data(), w.data_ptr());
  EXPECT_EQ(p.grad.data(), w.grad().data_ptr());
  EXPECT_EQ(p.weight.dtype(), mixprec::dtype_of<T>);
  EXPECT_EQ(p.grad.dtype(), mixprec::dtype_of<T>);
  EXPECT_EQ(p.weight.shape(), mixprec::Shape({3, 5}));
  EXPECT_EQ(p.weight.device(), Device::cpu());
  EXPECT_FALSE(p.weight.read_only());
  // A write through the view is a write to the torch tensor: the same bits.
  p.weight.as<T>().at(7) = T(2.5f);
  EXPECT_EQ(w.flatten()[7].item<float>(), 2.5f);
}

// The central claim: a step through the views changes the torch tensors'
// bits exactly as the same optimizer changes mixprec's own tensors that
// start with the same values, including a skipped (overflowing) step.
TYPED_TEST(TorchParams, AStepThroughTheViewsGivesTheBitsOfMixprecOwnTensors) {
  using T = TypeParam;
  const std::vector<mixprec::Shape> shapes = {{17, 33}, {33}, {4, 3, 5}};
  std::vector<Tensor<T>> own_w, own_g;
  std::vector<torch::Tensor> tw;
  std::vector<optim::Param> own_params, torch_params;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    own_w.emplace_back(shapes[i]);
    own_g.emplace_back(shapes[i]);
    mixprec::fill_normal(own_w.back(), 0.0f, 1.0f, /*seed=*/100 + i);
    tw.push_back(torch_copy(own_w.back()).requires_grad_());
    tw.back().mutable_grad() = torch::zeros_like(tw.back());
  }
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::string name = "p" + std::to_string(i);
    own_params.push_back({name, own_w[i], own_g[i]});
    torch_params.push_back(libtorch::param(name, tw[i]));
  }
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.amsgrad = true;
  optim::AdamW own(own_params, o), via_torch(torch_params, o);
  amp::GradScaler own_scaler, torch_scaler;  // dynamic, 65536, whatever T is

  const Tensor<T> initial = own_w[0].clone();
  int applied = 0;
  for (int step = 0; step < 6; ++step) {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      // Scaled gradients of ~1e-3 * 65536; step 3 overflows in one element.
      mixprec::fill_normal(own_g[i], 0.0f, 64.0f, /*seed=*/1000 + 10 * step + i);
      if (step == 3 && i == 1) own_g[i].view().at(5) = T(std::numeric_limits<float>::infinity());
      std::memcpy(tw[i].grad().data_ptr(), own_g[i].data(), own_g[i].bytes());
    }
    const bool a = own_scaler.step(own), b = torch_scaler.step(via_torch);
    own_scaler.update();
    torch_scaler.update();
    ASSERT_EQ(a, b) << "step " << step;
    applied += a;
    ASSERT_EQ(own_scaler.scale(), torch_scaler.scale()) << "step " << step;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      ASSERT_TRUE(same_bits(tw[i], own_w[i].data(), own_w[i].bytes())) << "step " << step << ", p" << i;
      ASSERT_EQ(std::memcmp(own.master(i).data(), via_torch.master(i).data(), own.master(i).bytes()), 0)
          << "step " << step << ", p" << i;
    }
  }
  EXPECT_EQ(applied, 5);  // step 3 skipped in both
  EXPECT_FALSE(same_bits(tw[0], initial.data(), initial.bytes())) << "the steps changed nothing";
}

// With gradients from a real torch backward: allocate_grads() before the
// first backward, and autograd adds into those tensors in place, so the
// views made before training still see every later gradient.
TEST(TorchModule, GradientsFromBackwardAreSeenThroughViewsMadeBeforeIt) {
  torch::manual_seed(1);
  torch::nn::Sequential net(torch::nn::Linear(6, 8), torch::nn::ReLU(), torch::nn::Linear(8, 3));
  net->to(torch::kBFloat16);
  libtorch::allocate_grads(*net);
  std::vector<optim::Param> ps = libtorch::params(*net);
  ASSERT_EQ(ps.size(), 4u);
  EXPECT_EQ(ps[0].name, "0.weight");
  EXPECT_EQ(ps[1].name, "0.bias");
  EXPECT_EQ(ps[2].name, "2.weight");
  EXPECT_EQ(ps[3].name, "2.bias");
  optim::AdamW opt(ps, optim::AdamWOptions{});
  amp::GradScaler scaler;

  const torch::Tensor x = torch::randn({16, 6}).to(torch::kBFloat16);
  const torch::Tensor y = torch::randint(0, 3, {16});
  for (int step = 0; step < 3; ++step) {
    net->zero_grad(/*set_to_none=*/false);
    const torch::Tensor loss = torch::cross_entropy_loss(net->forward(x).to(torch::kFloat), y);
    (loss * scaler.scale()).backward();
    libtorch::check_views(opt, *net);
    // A mixprec-owned twin of this step's state: the same weights, gradients,
    // masters and moments (through a saved state), stepped alike.
    std::vector<Tensor<mixprec::bfloat16>> w, g;
    std::vector<optim::Param> twin_params;
    for (std::size_t i = 0; i < opt.num_params(); ++i) {
      const torch::Tensor t = net->named_parameters()[opt.param(i).name];
      mixprec::Shape s(std::vector<std::int64_t>(t.sizes().begin(), t.sizes().end()));
      w.emplace_back(s);
      g.emplace_back(s);
      std::memcpy(w.back().data(), t.data_ptr(), w.back().bytes());
      std::memcpy(g.back().data(), t.grad().data_ptr(), g.back().bytes());
      float magnitude = 0;
      for (std::int64_t k = 0; k < g.back().numel(); ++k) magnitude += std::fabs(float(g.back().data()[k]));
      ASSERT_NE(magnitude, 0.0f) << "no gradient reached " << opt.param(i).name;
    }
    for (std::size_t i = 0; i < w.size(); ++i) twin_params.push_back({opt.param(i).name, w[i], g[i]});
    optim::AdamW twin(twin_params, optim::AdamWOptions{});
    twin.load_state(opt.save_state());  // masters, moments and step counts
    // The twin steps at the same scale, held by a scaler in static mode.
    amp::GradScalerOptions fixed_options;
    fixed_options.mode = amp::ScalingMode::static_scale;
    fixed_options.init_scale = scaler.scale();
    amp::GradScaler fixed(fixed_options);
    ASSERT_TRUE(scaler.step(opt));
    scaler.update();
    ASSERT_TRUE(fixed.step(twin));
    for (std::size_t i = 0; i < w.size(); ++i) {
      const torch::Tensor t = net->named_parameters()[opt.param(i).name];
      ASSERT_TRUE(same_bits(t, w[i].data(), w[i].bytes())) << "step " << step << ", " << opt.param(i).name;
    }
  }
}

TEST(TorchModule, FrozenParametersAreLeftOutAndTiedOnesGivenOnce) {
  struct Net : torch::nn::Module {
    Net() {
      a = register_module("a", torch::nn::Linear(4, 4));
      b = register_module("b", torch::nn::Linear(4, 4));
      b->bias.set_requires_grad(false);
      shared = register_parameter("shared", a->weight);  // the same tensor under a second name
    }
    torch::nn::Linear a{nullptr}, b{nullptr};
    torch::Tensor shared;
  };
  Net net;
  libtorch::allocate_grads(net);
  EXPECT_FALSE(net.b->bias.grad().defined()) << "a frozen parameter got a gradient";
  std::vector<std::string> names;
  for (const optim::Param& p : libtorch::params(net)) names.push_back(p.name);
  // Whatever named_parameters()' order, "shared" and "a.weight" (one tensor)
  // appear once between them, and the frozen "b.bias" not at all.
  int tied = 0;
  for (const std::string& n : names) tied += n == "shared" || n == "a.weight";
  EXPECT_EQ(tied, 1);
  EXPECT_EQ(std::count(names.begin(), names.end(), "b.bias"), 0);
  EXPECT_EQ(names.size(), 3u);
  optim::SGD opt(libtorch::params(net), optim::SGDOptions{});  // no overlap refused
}

TEST(TorchModule, AGradReplacedByTorchIsCaughtAndRebindFixesIt) {
  torch::nn::Linear net(3, 2);
  libtorch::allocate_grads(*net);
  optim::SGD opt(libtorch::params(*net), optim::SGDOptions{});
  libtorch::check_views(opt, *net);
  net->zero_grad(/*set_to_none=*/false);  // in place: still the same tensors
  libtorch::check_views(opt, *net);
  net->zero_grad(/*set_to_none=*/true);
  expect_error([&] { libtorch::check_views(opt, *net); },
               {"SGD: parameter \"weight\": its .grad() is now undefined", "zero_grad(/*set_to_none=*/false)",
                "mixprec::libtorch::rebind(opt, module)"});
  net->forward(torch::randn({4, 3})).sum().backward();  // torch makes new .grad() tensors
  expect_error([&] { libtorch::check_views(opt, *net); },
               {"parameter \"weight\": its .grad() was replaced by another tensor"});
  libtorch::rebind(opt, *net);
  libtorch::check_views(opt, *net);
  EXPECT_EQ(opt.param(opt.find("weight")).grad.data(), net->weight.grad().data_ptr());
  {
    torch::NoGradGuard no_grad;
    net->weight.set_data(net->weight.clone());
  }
  expect_error([&] { libtorch::check_views(opt, *net); },
               {"parameter \"weight\": the tensor's data moved since it was viewed"});
}

TEST(TorchErrors, EachNamesTheParameterAndTheProblem) {
  // Not contiguous.
  torch::Tensor t = torch::randn({4, 6}).t().requires_grad_();
  t.mutable_grad() = torch::zeros({6, 4});
  expect_error([&] { libtorch::param("fc.weight", t); },
               {"parameter \"fc.weight\": the tensor is not contiguous (sizes [6, 4], strides [1, 6])",
                "make it contiguous"});
  // A contiguous weight whose gradient is not.
  torch::Tensor u = torch::randn({6, 4}).requires_grad_();
  u.mutable_grad() = torch::zeros({4, 6}).t();
  expect_error([&] { libtorch::param("fc.weight", u); },
               {"parameter \"fc.weight\" (its gradient): the tensor is not contiguous"});
  // No gradient yet: how to get one.
  torch::Tensor v = torch::randn({5}).requires_grad_();
  expect_error([&] { libtorch::param("fc.bias", v); },
               {"parameter \"fc.bias\": has no gradient yet (.grad() is undefined)",
                "run one forward and backward pass", "allocate_grads(module)", "mutable_grad()"});
  expect_error([&] { libtorch::param("frozen", torch::randn({5})); },
               {"parameter \"frozen\": has no gradient yet", "does not require grad"});
  // Unsupported dtypes.
  torch::Tensor d = torch::randn({5}, torch::kDouble).requires_grad_();
  d.mutable_grad() = torch::zeros_like(d);
  expect_error([&] { libtorch::param("fc.bias", d); },
               {"parameter \"fc.bias\": dtype Double is not supported", "Half (fp16), BFloat16 and Float (fp32)"});
  expect_error([&] { libtorch::view(torch::zeros({3}, torch::kInt), "counts"); },
               {"counts: dtype Int is not supported"});
  // A device mixprec cannot view, and a gradient on another device.
  expect_error([&] { libtorch::view(torch::empty({3}, torch::Device(torch::kMeta)), "w"); },
               {"w: the tensor is on meta", "the CPU and on CUDA devices"});
  torch::Tensor x = torch::randn({3}).requires_grad_();
  x.mutable_grad() = torch::empty({3}, torch::Device(torch::kMeta));
  expect_error([&] { libtorch::param("x", x); },
               {"parameter \"x\": the weight is on cpu but its gradient is on meta", "one device"});
  // Sparse tensors.
  expect_error([&] { libtorch::view(torch::eye(3).to_sparse(), "s"); }, {"s: layout Sparse is not supported"});
  expect_error([&] { libtorch::view(torch::Tensor(), "nothing"); }, {"nothing: the tensor is undefined"});
#if MIXPREC_WITH_CUDA
  EXPECT_EQ(libtorch::device_of(torch::Device(torch::kCUDA, 1), "w"), Device::cuda(1));
#else
  expect_error([&] { libtorch::device_of(torch::Device(torch::kCUDA, 0), "parameter \"w\""); },
               {"parameter \"w\": the tensor is on cuda:0, but mixprec was built without CUDA",
                "mixprec::cuda", "<mixprec/cuda/backend.cuh>"});
#endif
}

// An empty parameter (zero elements) is a valid view; torch may give it a
// null data pointer.
TEST(TorchErrors, EmptyTensorsAreViewed) {
  torch::Tensor e = torch::empty({0, 4}).requires_grad_();
  e.mutable_grad() = torch::empty({0, 4});
  const optim::Param p = libtorch::param("empty", e);
  EXPECT_EQ(p.weight.numel(), 0);
  EXPECT_EQ(p.weight.shape(), mixprec::Shape({0, 4}));
}

}  // namespace

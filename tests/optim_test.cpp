// SPDX-License-Identifier: Apache-2.0
// Optimizer behaviour that the PyTorch trajectories do not pin down: argument
// checks (nothing changes on a rejected call), masters and write-back, step
// counts, groups added later, schedules on skipped steps, gradients never
// written, a one-step check against float64 arithmetic, and weight and
// gradient dtypes mixed in one optimizer against separate fp32 optimizers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;
using test::first_difference;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

/// Asserts that two parameters' saved states hold the same bits: step
/// count, master, and every state tensor (and which of them exist).
void assert_same_param(const optim::ParamState& want, const optim::ParamState& have, const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(have.step, want.step) << "step count";
  ASSERT_EQ(first_difference(have.master, want.master), -1) << "master";
  ASSERT_EQ(have.state.size(), want.state.size());
  for (std::size_t k = 0; k < want.state.size(); ++k) {
    ASSERT_EQ(have.state[k].has_value(), want.state[k].has_value()) << "state tensor " << k;
    if (want.state[k]) {
      ASSERT_EQ(first_difference(*have.state[k], *want.state[k]), -1) << "state tensor " << k;
    }
  }
}

/// The same for whole optimizer states, with applied steps and base lrs.
void assert_same_state(const optim::OptimizerState& want, const optim::OptimizerState& have,
                       const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(have.applied_steps, want.applied_steps);
  ASSERT_EQ(have.lrs, want.lrs);
  ASSERT_EQ(have.params.size(), want.params.size());
  for (std::size_t i = 0; i < want.params.size(); ++i) {
    ASSERT_NO_FATAL_FAILURE(assert_same_param(want.params[i], have.params[i], "parameter " + std::to_string(i)));
  }
}

struct Net {
  Tensor<half> w{Shape{6, 5}}, gw{Shape{6, 5}};
  Tensor<bfloat16> b{Shape{5}}, gb{Shape{5}};
  Tensor<float> c{Shape{300}}, gc{Shape{300}};
  Net() {
    fill_normal(w, 0, 1, 1);
    fill_normal(gw, 0, 1, 2);
    fill_normal(b, 0, 1, 3);
    fill_normal(gb, 0, 1, 4);
    fill_normal(c, 0, 1, 5);
    fill_normal(gc, 0, 1, 6);
  }
  std::vector<optim::Param> params() { return {{"w", w, gw}, {"b", b, gb}, {"c", c, gc}}; }
};

TEST(OptimizerArguments, RejectedWithNameAndValue) {
  Net net;
  auto adamw = [&](auto tweak) {
    optim::AdamWOptions o;
    tweak(o);
    optim::AdamW opt(net.params(), o);
  };
  expect_error([&] { adamw([](auto& o) { o.lr = kNaN; }); }, {"AdamW", "lr = nan"});
  expect_error([&] { adamw([](auto& o) { o.lr = kInf; }); }, {"AdamW", "lr = inf"});
  expect_error([&] { adamw([](auto& o) { o.lr = -1e-3; }); }, {"AdamW", "lr = -0.001"});
  expect_error([&] { adamw([](auto& o) { o.eps = -1e-8; }); }, {"AdamW", "eps = -1e-08"});
  expect_error([&] { adamw([](auto& o) { o.betas[0] = 1.0; }); }, {"AdamW", "betas[0] = 1", "[0, 1)"});
  expect_error([&] { adamw([](auto& o) { o.betas[1] = -0.1; }); }, {"AdamW", "betas[1] = -0.1"});
  expect_error([&] { adamw([](auto& o) { o.weight_decay = -0.1; }); }, {"AdamW", "weight_decay = -0.1"});
  auto sgd = [&](auto tweak) {
    optim::SGDOptions o;
    tweak(o);
    optim::SGD opt(net.params(), o);
  };
  expect_error([&] { sgd([](auto& o) { o.nesterov = true; }); }, {"SGD", "nesterov", "momentum = 0"});
  expect_error([&] {
    sgd([](auto& o) {
      o.nesterov = true;
      o.momentum = 0.9;
      o.dampening = 0.1;
    });
  }, {"SGD", "nesterov", "dampening = 0.1"});
  expect_error([&] { sgd([](auto& o) { o.momentum = -0.5; }); }, {"SGD", "momentum = -0.5"});
  expect_error([&] {
    optim::RMSpropOptions o;
    o.alpha = 1.5;
    optim::RMSprop opt(net.params(), o);
  }, {"RMSprop", "alpha = 1.5"});
  expect_error([] { optim::Adam opt({}); }, {"Adam", "empty"});
  expect_error([&] { optim::SGD opt({{"w", net.w, net.gb}}); }, {"SGD", "\"w\"", "[6, 5]", "[5]"});
  expect_error([&] { optim::SGD opt({{"w", net.w, net.gw}, {"w", net.b, net.gb}}); },
               {"SGD", "\"w\"", "used twice"});
  expect_error([&] { optim::SGD opt({{"", net.w, net.gw}}); }, {"SGD", "empty name"});
}

TEST(OptimizerArguments, RejectedSettersChangeNothing) {
  Net net;
  optim::Adam opt(net.params());
  optim::AdamOptions bad = opt.options(0);
  bad.betas[1] = 1.0;
  expect_error([&] { opt.set_options(0, bad); }, {"Adam", "betas[1] = 1"});
  EXPECT_EQ(opt.options(0).betas[1], 0.999);
  expect_error([&] { opt.set_lr(0, -2.0); }, {"Adam", "lr = -2"});
  EXPECT_EQ(opt.lr(0), 1e-3);
  expect_error([&] { opt.set_lr(3, 1.0); }, {"group = 3"});
  // A bad second group adds nothing.
  Tensor<float> x({4}), gx({4});
  expect_error([&] { opt.add_param_group({{"x", x, gx}, {"c", net.c, net.gc}}, {}); },
               {"\"c\"", "used twice"});
  EXPECT_EQ(opt.num_params(), 3u);
  EXPECT_EQ(opt.num_groups(), 1u);
}

TEST(Optimizer, MastersStartFromTheModelAndWriteBackRounded) {
  Net net;
  optim::SGD opt(net.params(), {});
  for (std::size_t i = 0; i < opt.num_params(); ++i) EXPECT_EQ(opt.master(i).numel(), opt.param(i).weight.numel());
  for (std::int64_t e = 0; e < net.w.numel(); ++e) EXPECT_EQ(opt.master(0).at(e), to_float(net.w.at(e)));
  opt.step();
  for (std::int64_t e = 0; e < net.w.numel(); ++e) {
    EXPECT_EQ(to_bits(net.w.at(e)), to_bits(from_float<half>(opt.master(0).at(e))));
  }
  for (std::int64_t e = 0; e < net.b.numel(); ++e) {
    EXPECT_EQ(to_bits(net.b.at(e)), to_bits(from_float<bfloat16>(opt.master(1).at(e))));
  }
}

TEST(Optimizer, GradientsAreNeverWritten) {
  Net net;
  std::vector<std::uint16_t> before;
  for (std::int64_t e = 0; e < net.gw.numel(); ++e) before.push_back(to_bits(net.gw.at(e)));
  optim::Adam opt(net.params());
  amp::GradScaler scaler;
  ASSERT_TRUE(scaler.step(opt, /*max_norm=*/0.5));
  scaler.update();
  for (std::int64_t e = 0; e < net.gw.numel(); ++e) ASSERT_EQ(to_bits(net.gw.at(e)), before[e]);
}

TEST(Optimizer, OneAdamStepAgainstFloat64) {
  // After one step from zero moments, Adam moves each weight by
  // lr * g / (|g| + eps') with eps' = eps * sqrt(1 - beta2) / sqrt(1 - beta2)
  // folded the way the formula folds it: computed here in double.
  Tensor<float> w({1000}), g({1000});
  fill_normal(w, 0, 1, 11);
  fill_normal(g, 0, 1, 12);
  std::vector<float> w0(w.data(), w.data() + 1000);
  optim::AdamOptions o;
  o.lr = 0.01;
  optim::Adam opt({{"w", w, g}}, o);
  opt.step();
  for (int e = 0; e < 1000; ++e) {
    const double gd = g.at(e);
    const double m = 0.1 * gd / 0.1, v = 0.001 * gd * gd / 0.001;
    const double want = w0[e] - 0.01 * m / (std::sqrt(v) + 1e-8);
    EXPECT_NEAR(opt.master(0).at(e), want, 2e-7 * std::fabs(want) + 1e-9) << e;
  }
}

TEST(Optimizer, StepCountsAndGroupsAddedLater) {
  Net net;
  optim::SGDOptions o;
  o.momentum = 0.9;
  optim::SGD opt({{"w", net.w, net.gw}}, o);
  opt.step();
  opt.step();
  o.lr = 0.5;
  opt.add_param_group({{"b", net.b, net.gb}}, o);
  opt.step();
  EXPECT_EQ(opt.step_count(opt.find("w")), 3);
  EXPECT_EQ(opt.step_count(opt.find("b")), 1);
  EXPECT_EQ(opt.group_of(opt.find("b")), 1u);
  EXPECT_EQ(opt.lr(1), 0.5);
  EXPECT_EQ(opt.applied_steps(), 3);
  expect_error([&] { (void)opt.find("nope"); }, {"SGD", "no parameter named \"nope\""});
}

// An empty parameter ahead of a 37-element one (the 8-lane pass and the
// tail): every element of the other parameter is what an optimizer without
// the empty one computes, bit for bit, and what float64 arithmetic gives;
// the empty parameter counts its steps and keeps (empty) state like any
// other; a save_state / load_state round trip with it resumes bit-exactly.
TEST(Optimizer, ZeroSizeParametersAreFine) {
  constexpr std::int64_t n = 37;
  constexpr int kSteps = 3;
  Tensor<half> e({0}), ge({0});
  Tensor<float> x({n}), gx({n}), y({n}), gy({n});
  fill_normal(x, 0, 1, 31);
  copy(x, y);
  optim::RMSprop opt({{"empty", e, ge}, {"x", x, gx}});
  optim::RMSprop alone({{"x", y, gy}});  // the same without the empty parameter
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  amp::GradScaler alone_scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  // torch.optim.RMSprop with its defaults (lr 1e-2, alpha 0.99, eps 1e-8) in float64.
  std::vector<double> p(x.data(), x.data() + n), sq(n, 0.0);
  for (int step = 0; step < kSteps; ++step) {
    fill_normal(gx, 0, 1, 40 + step);
    copy(gx, gy);
    ASSERT_TRUE(scaler.step(opt));
    scaler.update();
    ASSERT_TRUE(alone_scaler.step(alone));
    alone_scaler.update();
    for (std::int64_t k = 0; k < n; ++k) {
      const double g = gx.at(k);
      sq[k] = 0.99 * sq[k] + 0.01 * g * g;
      p[k] -= 1e-2 * g / (std::sqrt(sq[k]) + 1e-8);
    }
  }
  const optim::OptimizerState st = opt.save_state();
  ASSERT_NO_FATAL_FAILURE(assert_same_param(alone.save_state().params[0], st.params[1], "x against alone"));
  for (std::int64_t k = 0; k < n; ++k) {
    EXPECT_EQ(to_bits(x.at(k)), to_bits(y.at(k))) << k;  // the weight (fp32: the master itself)
    // Each step moves an element by about lr * g / sqrt(1 - alpha) ~ 0.1;
    // the fp32 path rounds ~8 operations per step and the master, each to
    // 2^-24 relative, so 3 steps stay within 1e-6 (1 + |x|), with room.
    EXPECT_NEAR(x.at(k), p[k], 1e-6 * (1 + std::fabs(p[k]))) << k;
  }
  // The empty parameter: its step count, an empty master, and the same
  // state tensors as the other parameter, all empty.
  EXPECT_EQ(opt.step_count(0), kSteps);
  EXPECT_EQ(st.params[0].step, kSteps);
  EXPECT_TRUE(st.params[0].master.empty());
  ASSERT_EQ(st.params[0].state.size(), st.params[1].state.size());
  for (std::size_t k = 0; k < st.params[0].state.size(); ++k) {
    EXPECT_EQ(st.params[0].state[k].has_value(), st.params[1].state[k].has_value()) << "state tensor " << k;
    if (st.params[0].state[k]) {
      EXPECT_TRUE(st.params[0].state[k]->empty()) << "state tensor " << k;
    }
  }
  ASSERT_TRUE(st.params[1].state[0].has_value());  // square_avg
  EXPECT_EQ(st.applied_steps, kSteps);

  // As a checkpoint would: the state into a fresh optimizer over a copy of
  // the weights; both go on and stay equal.
  Tensor<half> e2({0}), ge2({0});
  Tensor<float> x2({n}), gx2({n});
  copy(x, x2);
  optim::RMSprop resumed({{"empty", e2, ge2}, {"x", x2, gx2}});
  resumed.load_state(st);
  ASSERT_NO_FATAL_FAILURE(assert_same_state(st, resumed.save_state(), "right after load_state"));
  EXPECT_EQ(resumed.step_count(0), kSteps);
  amp::GradScaler resumed_scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  resumed_scaler.load_state(scaler.state(), scaler.applied_steps(), scaler.skipped_steps());
  for (int step = kSteps; step < kSteps + 2; ++step) {
    fill_normal(gx, 0, 1, 40 + step);
    copy(gx, gx2);
    ASSERT_TRUE(scaler.step(opt));
    scaler.update();
    ASSERT_TRUE(resumed_scaler.step(resumed));
    resumed_scaler.update();
  }
  ASSERT_NO_FATAL_FAILURE(assert_same_state(opt.save_state(), resumed.save_state(), "two steps after resuming"));
  EXPECT_EQ(resumed.step_count(0), kSteps + 2);
  for (std::int64_t k = 0; k < n; ++k) EXPECT_EQ(to_bits(x2.at(k)), to_bits(x.at(k))) << k;
}

TEST(Schedule, AdvancesOnAppliedStepsOnly) {
  Tensor<half> w({4}), g({4});
  fill(w, 1.0f);
  fill(g, 1.0f);
  optim::SGDOptions o;
  o.lr = 0.1;
  optim::SGD opt({{"w", w, g}}, o);
  opt.set_schedule(optim::LRSchedule::step_decay(1, 0.5));
  amp::GradScaler scaler;
  EXPECT_DOUBLE_EQ(opt.lr(0), 0.1);
  ASSERT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_DOUBLE_EQ(opt.lr(0), 0.05);
  g.at(2) = from_float<half>(NAN);
  ASSERT_FALSE(scaler.step(opt));
  scaler.update();
  EXPECT_DOUBLE_EQ(opt.lr(0), 0.05);  // the skipped step did not move it
  EXPECT_EQ(opt.applied_steps(), 1);
}

TEST(Schedule, RejectsBadArguments) {
  expect_error([] { optim::LRSchedule::linear_warmup(0); }, {"warmup_steps = 0"});
  expect_error([] { optim::LRSchedule::linear_warmup(5, 0.0); }, {"start_factor = 0"});
  expect_error([] { optim::LRSchedule::cosine(-1); }, {"total_steps = -1"});
  expect_error([] { optim::LRSchedule::cosine(10, 2.0); }, {"min_factor = 2"});
  expect_error([] { optim::LRSchedule::step_decay(3, 0.0); }, {"gamma = 0"});
}

// A 13-element parameter runs elements 0-7 through the fused 8-lane pass (on
// CPUs with AVX2) and 8-12 through the chunked 4-lane and scalar path. With
// the same master and gradient at i and i + 8, both paths must produce the
// same bits, step after step, for every optimizer and dtype.
template <class T>
void check_paths_agree() {
  Tensor<T> w({13}), g({13});
  fill_normal(w, 0, 1, 7);
  for (int i = 0; i < 5; ++i) w.at(i + 8) = w.at(i);
  std::vector<std::unique_ptr<optim::Optimizer>> opts;
  optim::SGDOptions sgd;
  sgd.momentum = 0.9;
  sgd.nesterov = true;
  sgd.weight_decay = 0.01;
  optim::AdamOptions adam;
  adam.amsgrad = true;
  adam.weight_decay = 0.1;
  optim::RMSpropOptions rms;
  rms.centered = true;
  rms.momentum = 0.5;
  rms.maximize = true;
  std::vector<Tensor<T>> weights;
  for (int k = 0; k < 4; ++k) weights.push_back(w.clone());
  opts.push_back(std::make_unique<optim::SGD>(std::vector<optim::Param>{{"w", weights[0], g}}, sgd));
  opts.push_back(std::make_unique<optim::Adam>(std::vector<optim::Param>{{"w", weights[1], g}}, adam));
  opts.push_back(std::make_unique<optim::AdamW>(std::vector<optim::Param>{{"w", weights[2], g}}));
  opts.push_back(std::make_unique<optim::RMSprop>(std::vector<optim::Param>{{"w", weights[3], g}}, rms));
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  amp::GradScaler scaler(so);
  for (int step = 0; step < 6; ++step) {
    fill_normal(g, 0, 300, 100 + step);
    for (int i = 0; i < 5; ++i) g.at(i + 8) = g.at(i);
    for (auto& opt : opts) ASSERT_TRUE(scaler.step(*opt, /*max_norm=*/step % 2 ? 0.5 : 1e9));
    scaler.update();
    for (std::size_t k = 0; k < opts.size(); ++k) {
      for (int i = 0; i < 5; ++i) {
        ASSERT_EQ(to_bits(opts[k]->master(0).at(i)), to_bits(opts[k]->master(0).at(i + 8)))
            << opts[k]->name() << " step " << step << " element " << i;
        ASSERT_EQ(to_bits(weights[k].at(i)), to_bits(weights[k].at(i + 8)));
      }
    }
  }
}

// The check pass sums squares in one documented order on every path (see
// Optimizer::sum_block); restated here independently, for 2 full blocks of
// 1024 and a tail. Run in this binary (AVX2 where the CPU has it) and in
// optim_portable_test (SIMD compiled out): both must give these bits.
TEST(Optimizer, CheckPassSumsInTheDocumentedOrder) {
  Tensor<float> w({2 * 1024 + 77}), g({2 * 1024 + 77});
  fill(w, 0.0f);
  fill_normal(g, 0, 3, 21);
  optim::SGD opt({{"w", w, g}});
  double want = 0;
  for (int block = 0; block < 2; ++block) {
    float p[32] = {};
    for (int j = 0; j < 1024; ++j) {
      const float x = g.at(block * 1024 + j);
      p[j % 32] += math::mul(x, x);  // rounded, then added, whatever this file's flags
    }
    float part = 0;
    for (int l = 0; l < 8; ++l) part += (p[l] + p[8 + l]) + (p[16 + l] + p[24 + l]);
    want += part;
  }
  float tail = 0;
  for (int j = 2048; j < 2048 + 77; ++j) tail += math::mul(g.at(j), g.at(j));
  want += tail;
  const optim::GradStats stats = opt.check_grads();
  EXPECT_EQ(stats.sum_squares[0], want);
  EXPECT_FALSE(stats.nonfinite[0]);
  g.at(1500) = INFINITY;
  EXPECT_TRUE(opt.check_grads().nonfinite[0]);
}

TEST(OptimizerArguments, ReadOnlyAndOverlappingBuffersRejected) {
  Tensor<float> a({8}), ga({8}), b({8}), gb({8});
  expect_error([&] { optim::SGD opt({{"a", TensorView<const float>(a.view()), ga}}); },
               {"SGD", "\"a\"", "read-only"});
  expect_error([&] {
    optim::SGD opt({{"a", a, ga}, {"b", TensorView<float>(a.data() + 4, {4}), TensorView<float>(gb.data(), {4})}});
  }, {"\"a\"", "\"b\"", "share memory"});
  expect_error([&] { optim::SGD opt({{"a", a, TensorView<float>(a.data(), {8})}}); },
               {"weight of \"a\"", "gradient of \"a\""});
  optim::SGD opt({{"a", a, ga}});
  // A new gradient that is an existing weight's memory is refused whole.
  expect_error([&] { opt.add_param_group({{"b", b, TensorView<float>(a.data(), {8})}}, {}); },
               {"weight of \"a\"", "gradient of \"b\""});
  EXPECT_EQ(opt.num_params(), 1u);
  EXPECT_NO_THROW(opt.add_param_group({{"b", b, gb}}, {}));
}

TEST(Schedule, FieldByFieldSchedulesAreValidated) {
  Tensor<float> w({4}), g({4});
  optim::SGD opt({{"w", w, g}});
  optim::LRSchedule s = optim::LRSchedule::cosine(10);
  s.steps = 0;
  expect_error([&] { opt.set_schedule(s); }, {"steps = 0"});
  s = optim::LRSchedule::step_decay(3);
  s.gamma = -1;
  expect_error([&] { opt.set_schedule(s); }, {"gamma = -1"});
  EXPECT_EQ(opt.schedule().kind, optim::LRSchedule::Kind::constant);
}

TEST(Optimizer, VectorAndScalarPathsGiveTheSameBits) {
  check_paths_agree<half>();
  check_paths_agree<bfloat16>();
  check_paths_agree<float>();
}

/// A host tensor whose dtype is chosen at run time.
class AnyTensor {
 public:
  AnyTensor(DType dtype, std::int64_t n) : dtype_(dtype) {
    visit([&](auto& t) { t = std::decay_t<decltype(t)>(Shape{n}); });
  }
  template <class F>
  void visit(F&& f) {
    switch (dtype_) {
      case DType::float16:
        f(h16_);
        return;
      case DType::bfloat16:
        f(b16_);
        return;
      case DType::float32:
        f(f32_);
        return;
    }
  }
  TensorRef ref() {
    TensorRef r;
    visit([&](auto& t) { r = TensorRef(t); });
    return r;
  }

 private:
  DType dtype_;
  Tensor<half> h16_;
  Tensor<bfloat16> b16_;
  Tensor<float> f32_;
};

// One optimizer over weights and gradients of every dtype pairing (and an
// empty parameter), against one optimizer per parameter over fp32 copies of
// the same values (widening is exact), driven with the same unscale and clip
// factors: after every step the masters, every state tensor and the step
// counts have the same bits, and each model weight is its master rounded to
// nearest even. So a parameter's update depends on its dtypes only at the
// storage boundary, and not at all on the other parameters of its
// optimizer. Dynamic scaling, clipping (active: the coefficient is checked
// below 1), two skipped steps (an inf in an fp16 gradient, a NaN in an fp32
// one). Sizes cover the 8-lane pass, the 4-lane chunks and scalar tails.
template <class Opt>
void mixed_dtypes_match_separate_fp32(const typename Opt::options_type& options, const char* what) {
  SCOPED_TRACE(what);
  struct Spec {
    DType weight, grad;
    std::int64_t size;
  };
  const std::vector<Spec> specs = {
      {DType::bfloat16, DType::bfloat16, 7}, {DType::float32, DType::float16, 1029},
      {DType::float16, DType::float32, 0},   {DType::float16, DType::float16, 1000},
      {DType::bfloat16, DType::float32, 4099}, {DType::float32, DType::bfloat16, 33},
      {DType::float16, DType::bfloat16, 13}, {DType::bfloat16, DType::float16, 1024},
  };
  std::vector<AnyTensor> w, g;
  std::vector<Tensor<float>> rw, rg;  // the fp32 copies
  std::vector<optim::Param> params;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    w.emplace_back(specs[i].weight, specs[i].size);
    g.emplace_back(specs[i].grad, specs[i].size);
    rw.emplace_back(Shape{specs[i].size});
    rg.emplace_back(Shape{specs[i].size});
    w.back().visit([&](auto& t) {
      fill_normal(t, 0, 1, 40 + i);
      convert(t, rw.back());
    });
  }
  for (std::size_t i = 0; i < specs.size(); ++i) params.push_back({"p" + std::to_string(i), w[i].ref(), g[i].ref()});
  Opt mixed(params, options);
  std::vector<std::unique_ptr<Opt>> separate;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    separate.push_back(std::make_unique<Opt>(std::vector<optim::Param>{{"p" + std::to_string(i), rw[i], rg[i]}},
                                             options));
  }
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  so.growth_interval = 3;
  amp::GradScaler scaler(so);
  const double max_norm = 5.0;  // the unscaled norm is about 0.125 * sqrt(7205) = 10.6
  for (int step = 0; step < 8; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const float scale = scaler.scale();
    for (std::size_t i = 0; i < specs.size(); ++i) {
      g[i].visit([&](auto& t) {
        using T = typename std::decay_t<decltype(t)>::value_type;
        fill_normal(t, 0, 0.125f * scale, 900 + 10 * step + i);
        if (step == 3 && i == 1) t.at(1028) = from_float<T>(INFINITY);  // fp16
        if (step == 6 && i == 4) t.at(0) = from_float<T>(NAN);          // fp32
        convert(t, rg[i]);
      });
    }
    scaler.unscale(mixed);
    const float inv_scale = scaler.inv_scale(mixed);
    const float norm = scaler.clip_grad_norm(mixed, max_norm);
    const bool applied = scaler.step(mixed);
    scaler.update();
    ASSERT_EQ(applied, step != 3 && step != 6);
    if (applied) {
      // GradScaler::clip_grad_norm's coefficient, torch's
      // min(1, max_norm / (norm + 1e-6)) with its two float roundings.
      const float coef = std::min(1.0f, (1.0f / (norm + 1e-6f)) * static_cast<float>(max_norm));
      ASSERT_LT(coef, 1.0f);
      for (auto& opt : separate) opt->apply({inv_scale, coef});
    }
    const optim::OptimizerState have = mixed.save_state();
    ASSERT_EQ(have.applied_steps, separate[0]->applied_steps());
    for (std::size_t i = 0; i < specs.size(); ++i) {
      const optim::OptimizerState want = separate[i]->save_state();
      ASSERT_NO_FATAL_FAILURE(assert_same_param(want.params[0], have.params[i], "parameter " + std::to_string(i)));
      w[i].visit([&](auto& t) {
        using T = typename std::decay_t<decltype(t)>::value_type;
        for (std::int64_t e = 0; e < t.numel(); ++e) {
          ASSERT_EQ(to_bits(t.at(e)), to_bits(from_float<T>(want.params[0].master[e])))
              << "weight p" << i << "[" << e << "]";
        }
      });
    }
  }
  EXPECT_EQ(scaler.skipped_steps(), 2);
  EXPECT_EQ(mixed.applied_steps(), 6);
}

TEST(Optimizer, MixedDtypesMatchSeparateFloatOptimizers) {
  optim::SGDOptions sgd;
  sgd.lr = 0.01;
  sgd.momentum = 0.9;
  sgd.dampening = 0.1;
  sgd.weight_decay = 1e-3;
  mixed_dtypes_match_separate_fp32<optim::SGD>(sgd, "SGD momentum dampening wd");
  sgd.dampening = 0;
  sgd.nesterov = true;
  mixed_dtypes_match_separate_fp32<optim::SGD>(sgd, "SGD nesterov wd");
  optim::AdamOptions adam;
  adam.amsgrad = true;
  adam.weight_decay = 0.1;
  mixed_dtypes_match_separate_fp32<optim::Adam>(adam, "Adam amsgrad wd");
  mixed_dtypes_match_separate_fp32<optim::AdamW>(optim::AdamWOptions{}, "AdamW");
  optim::RMSpropOptions rms;
  rms.lr = 1e-3;
  rms.centered = true;
  rms.momentum = 0.9;
  rms.weight_decay = 0.01;
  mixed_dtypes_match_separate_fp32<optim::RMSprop>(rms, "RMSprop centered momentum wd");
}

}  // namespace
}  // namespace mixprec

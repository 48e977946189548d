// SPDX-License-Identifier: Apache-2.0
// Optimizer behaviour that the PyTorch trajectories do not pin down: argument
// checks (nothing changes on a rejected call), masters and write-back, step
// counts, groups added later, schedules on skipped steps, gradients never
// written, and a one-step check against float64 arithmetic.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

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

TEST(Optimizer, ZeroSizeParametersAreFine) {
  Tensor<half> e({0}), ge({0});
  Tensor<float> x({3}), gx({3});
  fill(gx, 1.0f);
  fill(x, 0.0f);
  optim::RMSprop opt({{"empty", e, ge}, {"x", x, gx}});
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_LT(x.at(0), 0.0f);
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
      p[j % 32] += x * x;
    }
    float part = 0;
    for (int l = 0; l < 8; ++l) part += (p[l] + p[8 + l]) + (p[16 + l] + p[24 + l]);
    want += part;
  }
  float tail = 0;
  for (int j = 2048; j < 2048 + 77; ++j) tail += g.at(j) * g.at(j);
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

}  // namespace
}  // namespace mixprec

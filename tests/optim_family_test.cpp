// SPDX-License-Identifier: Apache-2.0
// The optimizer family (optim/family.hpp): Lion against a float64
// reference written here, a user's own optimizer defined outside mixprec as
// one rule (user_adagrad.hpp: Adagrad, against float64 too), and the
// family's shared behaviour on them: a skipped step leaves every state bit
// alone, checkpoints resume bit-exactly, bad options and loaded states are
// refused by name. Built twice: with the SIMD CPU paths and without.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"
#include "user_adagrad.hpp"

namespace mixprec {
namespace {

using test::expect_error;
using test::first_difference;

// A fp16 weight and gradient of n elements, the gradients of step s drawn
// from a fixed normal (never zero-mean tiny, so no sign is borderline).
struct Param16 {
  Tensor<half> w, g;
  explicit Param16(std::int64_t n) : w(Shape{n}), g(Shape{n}) { fill_normal(w, 0, 1, 7); }
  void gradients(int s, float scale = 1.0f) { fill_normal(g, 0, 0.5f * scale, 100 + static_cast<std::uint64_t>(s)); }
  std::vector<optim::Param> params() { return {{"w", w, g}}; }
};

// Lion in float64 from the paper's Algorithm 2: c = b1 m + (1 - b1) g,
// theta = theta - lr (sign(c) + wd theta), m = b2 m + (1 - b2) g.
TEST(Lion, MatchesAFloat64ReferenceOverTwentySteps) {
  const std::int64_t n = 1000;
  Param16 p(n);
  optim::LionOptions o;
  o.lr = 1e-3;
  o.weight_decay = 0.1;
  optim::Lion opt(p.params(), o);
  std::vector<double> theta(n), m(n, 0.0);
  for (std::int64_t e = 0; e < n; ++e) theta[e] = to_float(p.w.at(e));
  const int steps = 20;
  for (int s = 0; s < steps; ++s) {
    p.gradients(s);
    opt.step();
    for (std::int64_t e = 0; e < n; ++e) {
      const double g = to_float(p.g.at(e));
      const double c = 0.9 * m[e] + 0.1 * g;
      const double sgn = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
      theta[e] = theta[e] - 1e-3 * (sgn + 0.1 * theta[e]);
      m[e] = 0.99 * m[e] + 0.01 * g;
    }
  }
  const Tensor<float>& master = opt.master(0);
  const optim::OptimizerState st = opt.save_state();
  double worst = 0, moved = 0;
  for (std::int64_t e = 0; e < n; ++e) {
    worst = std::max(worst, std::fabs(master.at(e) - theta[e]));
    moved = std::max(moved, std::fabs(theta[e] - to_float(p.w.at(e))));
    ASSERT_NEAR((*st.params[0].state[0])[static_cast<std::size_t>(e)], m[e], 1e-6) << "exp_avg " << e;
  }
  // Each step rounds theta twice (decay, sign step): a few float ulps of |theta| <= 4.
  EXPECT_LT(worst, steps * 4 * 4.8e-7) << "worst master distance";
  EXPECT_GT(moved, 0) << "the weights were written";
  EXPECT_EQ(opt.step_count(0), steps);
}

TEST(Lion, DefaultsAreThePapers) {
  const optim::LionOptions o;
  EXPECT_EQ(o.lr, 1e-4);
  EXPECT_EQ(o.betas[0], 0.9);
  EXPECT_EQ(o.betas[1], 0.99);
  EXPECT_EQ(o.weight_decay, 0.0);
}

TEST(Lion, BadOptionsAreRefusedByName) {
  Param16 p(4);
  optim::LionOptions o;
  o.betas[1] = 1.5;
  expect_error([&] { optim::Lion opt(p.params(), o); }, {"Lion", "betas[1] = 1.5", "[0, 1]"});
  o = {};
  o.lr = -1;
  expect_error([&] { optim::Lion opt(p.params(), o); }, {"Lion", "lr = -1"});
  optim::Lion ok(p.params(), optim::LionOptions{});
  o = {};
  o.weight_decay = std::nan("");
  expect_error([&] { ok.set_options(0, o); }, {"Lion", "weight_decay"});
  EXPECT_EQ(ok.options(0).weight_decay, 0.0);  // nothing changed
}

// Adagrad, a rule defined in this file, in float64 from torch's formula.
TEST(OwnOptimizer, AdagradMatchesAFloat64Reference) {
  const std::int64_t n = 777;
  Param16 p(n);
  user::AdagradOptions o;
  o.lr = 0.05;
  o.lr_decay = 0.01;
  user::Adagrad opt(p.params(), o);
  std::vector<double> theta(n), sum(n, 0.0);
  for (std::int64_t e = 0; e < n; ++e) theta[e] = to_float(p.w.at(e));
  for (int s = 1; s <= 15; ++s) {
    p.gradients(s);
    opt.step();
    const double clr = 0.05 / (1.0 + (s - 1) * 0.01);
    for (std::int64_t e = 0; e < n; ++e) {
      const double g = to_float(p.g.at(e));
      sum[e] += g * g;
      theta[e] -= clr * g / (std::sqrt(sum[e]) + 1e-10);
    }
  }
  double worst = 0;
  for (std::int64_t e = 0; e < n; ++e) worst = std::max(worst, std::fabs(opt.master(0).at(e) - theta[e]));
  EXPECT_LT(worst, 15 * 8 * 6e-8 * 4) << "worst master distance";
  EXPECT_STREQ(opt.name(), "Adagrad");
  EXPECT_EQ(opt.state_names(), std::vector<std::string>{"sum"});
}

// Shared family behaviour, for each optimizer: a skipped step (an inf in
// the gradients) leaves masters, state, weights and counts bit-identical;
// a checkpoint resumes with the bits of a run that never stopped.
template <class Opt>
void skip_and_resume(const typename Opt::options_type& o, const std::string& file) {
  Param16 straight(300), first(300), resumed(300);
  Opt a(straight.params(), o), b(first.params(), o);
  amp::GradScalerOptions so;
  so.init_scale = 1024;  // gradients of 0.5 x 1024: only the planted inf overflows
  amp::GradScaler sa(so), sb(so);
  auto step = [](Param16& p, Opt& opt, amp::GradScaler& sc, int s) {
    p.gradients(s, sc.scale());
    if (s == 3) p.g.at(7) = from_float<half>(INFINITY);
    sc.step(opt);
    sc.update();
  };
  for (int s = 0; s < 6; ++s) step(straight, a, sa, s);
  for (int s = 0; s < 3; ++s) step(first, b, sb, s);
  // The skip: nothing moves.
  const optim::OptimizerState before = b.save_state();
  const std::vector<half> weights_before(first.w.data(), first.w.data() + first.w.numel());
  step(first, b, sb, 3);
  const optim::OptimizerState after = b.save_state();
  ASSERT_EQ(after.params[0].step, before.params[0].step);
  ASSERT_EQ(first_difference(after.params[0].master, before.params[0].master), -1);
  ASSERT_EQ(first_difference(*after.params[0].state[0], *before.params[0].state[0]), -1);
  for (std::int64_t e = 0; e < first.w.numel(); ++e) ASSERT_EQ(to_bits(first.w.at(e)), to_bits(weights_before[e]));
  EXPECT_EQ(sb.skipped_steps(), 1);
  // Save after step 3, resume into a fresh optimizer, go on to step 5.
  const std::string path = test::temp_path(file);
  io::save_checkpoint(path, b, sb);
  Opt c(resumed.params(), o);
  amp::GradScaler sc(so);
  io::load_checkpoint(path, c, sc);
  for (int s = 4; s < 6; ++s) step(resumed, c, sc, s);
  const optim::OptimizerState want = a.save_state(), have = c.save_state();
  ASSERT_EQ(first_difference(have.params[0].master, want.params[0].master), -1);
  ASSERT_EQ(first_difference(*have.params[0].state[0], *want.params[0].state[0]), -1);
  ASSERT_EQ(have.params[0].step, want.params[0].step);
  EXPECT_EQ(sc.scale(), sa.scale());
  std::remove(path.c_str());
}

TEST(Family, LionSkipsAndResumesBitExactly) {
  optim::LionOptions o;
  o.weight_decay = 0.1;
  skip_and_resume<optim::Lion>(o, "lion_resume.safetensors");
}
TEST(Family, OwnOptimizerSkipsAndResumesBitExactly) {
  skip_and_resume<user::Adagrad>(user::AdagradOptions{}, "adagrad_resume.safetensors");
}

// A loaded Adagrad sum must be >= 0: the rule's nonnegative_states.
TEST(Family, OwnOptimizerStateIsCheckedOnLoad) {
  Param16 p(10);
  user::Adagrad opt(p.params(), user::AdagradOptions{});
  p.gradients(0);
  opt.step();
  optim::OptimizerState st = opt.save_state();
  (*st.params[0].state[0])[4] = -1.0f;
  expect_error([&] { opt.load_state(st); }, {"Adagrad", "sum[4] = -1", ">= 0"});
}

// kStates (the device step's register budget: state a kernel part never
// uses is never held) is each built-in optimizer's count of state tensors;
// a kernel part without it, like the user's Adagrad, counts as 3.
TEST(Family, KernelStatesAreTheStateTensorCount) {
  Param16 p(10);
  const auto count = [](const optim::Optimizer& o) { return static_cast<int>(o.state_names().size()); };
  EXPECT_EQ(optim::kernel_states_v<optim::SgdKernel>, count(optim::SGD(p.params(), optim::SGDOptions{})));
  EXPECT_EQ(optim::kernel_states_v<optim::AdamKernel>, count(optim::AdamW(p.params(), optim::AdamWOptions{})));
  EXPECT_EQ(optim::kernel_states_v<optim::AdamKernel>, count(optim::Adam(p.params(), optim::AdamOptions{})));
  EXPECT_EQ(optim::kernel_states_v<optim::RmspropKernel>, count(optim::RMSprop(p.params(), optim::RMSpropOptions{})));
  EXPECT_EQ(optim::kernel_states_v<optim::LionKernel>, count(optim::Lion(p.params(), optim::LionOptions{})));
  EXPECT_EQ(optim::kernel_states_v<optim::LambKernel>, count(optim::LAMB(p.params(), optim::LambOptions{})));
  EXPECT_EQ(optim::kernel_states_v<user::AdagradKernel>, 3);
}

}  // namespace
}  // namespace mixprec

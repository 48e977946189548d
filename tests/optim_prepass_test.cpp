// SPDX-License-Identifier: Apache-2.0
// The optimizers that need per-tensor sums before their update (the family's
// pre-pass, optim/family.hpp): LAMB (Apex FusedLAMB semantics) and Adam /
// AdamW with update clipping (StableAdamW), each against a float64
// reference written here from the paper / Apex, over several steps, on fp16
// and bf16 weights; a skipped step leaves every bit alone, checkpoints
// resume bit-exactly, bad options are refused by name before any change;
// update clipping off (or never triggered) gives AdamW's bits. Built twice:
// with the SIMD CPU paths and without.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;
using test::first_difference;

// Three parameters of weight type T: one over two device chunks (2^16
// elements) with a tail that is not a multiple of 4, and two small ones.
template <class T>
struct Model {
  std::vector<std::int64_t> sizes = {70001, 333, 1000};
  std::vector<Tensor<T>> w, g;
  Model() {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      w.emplace_back(Shape{sizes[i]});
      g.emplace_back(Shape{sizes[i]});
      fill_normal(w.back(), 0, 1, 7 + i);
    }
  }
  // Step s's gradients: N(0, sd(s, i)^2), fresh each step.
  template <class Sd>
  void gradients(int s, Sd sd, float scale = 1.0f) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      fill_normal(g[i], 0, sd(s, i) * scale, 1000 * static_cast<std::uint64_t>(s) + 10 * i + 3);
    }
  }
  std::vector<optim::Param> params() {
    std::vector<optim::Param> p;
    for (std::size_t i = 0; i < sizes.size(); ++i) p.push_back({"p" + std::to_string(i), w[i], g[i]});
    return p;
  }
  std::vector<std::vector<double>> weights() const {
    std::vector<std::vector<double>> out;
    for (const Tensor<T>& t : w) {
      std::vector<double> v(static_cast<std::size_t>(t.numel()));
      for (std::int64_t e = 0; e < t.numel(); ++e) v[static_cast<std::size_t>(e)] = to_float(t.at(e));
      out.push_back(v);
    }
    return out;
  }
  std::vector<std::vector<double>> grads() const {
    std::vector<std::vector<double>> out;
    for (const Tensor<T>& t : g) {
      std::vector<double> v(static_cast<std::size_t>(t.numel()));
      for (std::int64_t e = 0; e < t.numel(); ++e) v[static_cast<std::size_t>(e)] = to_float(t.at(e));
      out.push_back(v);
    }
    return out;
  }
};

// --- LAMB: Apex's FusedLAMB in float64 ---------------------------------------------------------

// apex.optimizers.FusedLAMB.step with multi_tensor_lamb's two stages,
// transcribed in double: the global norm of every gradient, its clamp, the
// moments, the direction u, the per-tensor norms and the trust ratio.
struct LambReference {
  optim::LambOptions o;
  std::vector<std::vector<double>> w, m, v;
  int step = 0;
  LambReference(const optim::LambOptions& opts, std::vector<std::vector<double>> weights) : o(opts), w(weights) {
    for (const auto& x : w) {
      m.emplace_back(x.size(), 0.0);
      v.emplace_back(x.size(), 0.0);
    }
  }
  void apply(const std::vector<std::vector<double>>& g) {
    ++step;
    double total = 0;
    for (const auto& t : g) {
      for (double x : t) total += x * x;
    }
    const double norm = std::sqrt(total);
    const double clipped = o.max_grad_norm > 0 && norm > o.max_grad_norm ? norm / o.max_grad_norm : 1.0;
    const double b1 = o.betas[0], b2 = o.betas[1], wd = o.weight_decay;
    const double bc1 = o.bias_correction ? 1 - std::pow(b1, step) : 1.0;
    const double bc2 = o.bias_correction ? 1 - std::pow(b2, step) : 1.0;
    const double b3 = o.grad_averaging ? 1 - b1 : 1.0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      std::vector<double> u(w[i].size());
      double wn = 0, un = 0;
      for (std::size_t e = 0; e < w[i].size(); ++e) {
        double sg = g[i][e] / clipped;
        if (!o.adam_w_mode) sg += wd * w[i][e];
        m[i][e] = b1 * m[i][e] + b3 * sg;
        v[i][e] = b2 * v[i][e] + (1 - b2) * sg * sg;
        u[e] = (m[i][e] / bc1) / (std::sqrt(v[i][e] / bc2) + o.eps);
        if (o.adam_w_mode) u[e] += wd * w[i][e];
        wn += w[i][e] * w[i][e];
        un += u[e] * u[e];
      }
      wn = std::sqrt(wn);
      un = std::sqrt(un);
      double ratio = o.lr;
      if (o.use_nvlamb || wd != 0) ratio = (wn != 0 && un != 0) ? o.lr * (wn / un) : o.lr;
      for (std::size_t e = 0; e < w[i].size(); ++e) w[i][e] -= ratio * u[e];
    }
  }
};

template <class T>
class LambTest : public ::testing::Test {};
using WeightTypes = ::testing::Types<half, bfloat16>;
TYPED_TEST_SUITE(LambTest, WeightTypes);

// Steps of LAMB against the reference; returns the largest master distance
// relative to the step's typical size.
template <class T>
void lamb_matches(const optim::LambOptions& o, float grad_sd, const char* what) {
  Model<T> model;
  optim::LAMB opt(model.params(), o);
  LambReference ref(o, model.weights());
  const int steps = 8;
  for (int s = 0; s < steps; ++s) {
    model.gradients(s, [&](int, std::size_t i) { return grad_sd * (1.0f + static_cast<float>(i)); });
    opt.step();
    ref.apply(model.grads());
  }
  const optim::OptimizerState st = opt.save_state();
  double worst = 0, moved = 0;
  for (std::size_t i = 0; i < model.sizes.size(); ++i) {
    const std::vector<float>& master = st.params[i].master;
    const std::vector<float>& m = *st.params[i].state[0];
    const std::vector<float>& v = *st.params[i].state[1];
    const std::vector<double> start = Model<T>().weights()[i];
    for (std::size_t e = 0; e < master.size(); ++e) {
      worst = std::max(worst, std::fabs(master[e] - ref.w[i][e]));
      moved = std::max(moved, std::fabs(ref.w[i][e] - start[e]));
      // Moments: float against double, a few ulps of their terms' size
      // (in L2 mode g + wd * w may nearly cancel).
      ASSERT_NEAR(m[e], ref.m[i][e], 1e-5 * (std::fabs(ref.m[i][e]) + 1e-2)) << what << " exp_avg " << i << "," << e;
      ASSERT_NEAR(v[e], ref.v[i][e], 1e-5 * (std::fabs(ref.v[i][e]) + 1e-4)) << what << " exp_avg_sq " << i << ","
                                                                            << e;
    }
    EXPECT_EQ(st.params[i].step, steps);
  }
  // The masters (|w| <= ~5) round each step: a few float ulps (4.8e-7 at
  // |w| < 4, 9.5e-7 to 8) a step, plus the float sums' relative error
  // (~1e-6) on a trust-ratio step of lr * ||w|| / ||u|| ~ lr.
  EXPECT_LT(worst, steps * 4e-6) << what << ": worst master distance";
  EXPECT_GT(moved, 100 * steps * 4e-6) << what << ": the steps moved the weights well beyond the tolerance";
}

TYPED_TEST(LambTest, ApexDefaultsMatchAFloat64Reference) {
  // Defaults: bias correction, weight decay 0.01 (so the trust ratio),
  // max_grad_norm 1 against a global norm near 50: the clamp acts.
  optim::LambOptions o;
  o.lr = 1e-2;
  lamb_matches<TypeParam>(o, 0.1f, "defaults");
}

TYPED_TEST(LambTest, WithoutBiasCorrectionOrClampMatches) {
  optim::LambOptions o;
  o.lr = 1e-2;
  o.bias_correction = false;
  o.max_grad_norm = 0;  // no clamp
  o.weight_decay = 0.1;
  lamb_matches<TypeParam>(o, 0.1f, "no bias correction, no clamp");
}

TYPED_TEST(LambTest, WithoutWeightDecayTheRatioIsOffUnlessNvlamb) {
  optim::LambOptions o;
  o.lr = 1e-3;
  o.weight_decay = 0;
  o.max_grad_norm = 1000;  // above the global norm: no clamp, but the round runs
  lamb_matches<TypeParam>(o, 0.1f, "no weight decay (plain lr)");
  o.use_nvlamb = true;
  lamb_matches<TypeParam>(o, 0.1f, "no weight decay, nvlamb");
}

TYPED_TEST(LambTest, L2ModeWithoutGradAveragingMatches) {
  optim::LambOptions o;
  o.lr = 1e-3;
  o.adam_w_mode = false;
  o.grad_averaging = false;
  o.weight_decay = 0.05;
  o.max_grad_norm = 5;
  lamb_matches<TypeParam>(o, 0.1f, "L2 mode");
}

// Two groups with different options in one optimizer: the gradient norm
// is over every parameter (Apex's), each group clamps with its own
// max_grad_norm and applies its own trust ratio; under a cosine schedule.
TEST(Lamb, GroupsShareTheGlobalNormAndKeepTheirOwnOptions) {
  Model<half> model;
  std::vector<optim::Param> all = model.params();
  optim::LambOptions a, b;
  a.lr = 1e-2;  // Apex's defaults otherwise: trust ratio, clamp at 1
  b.lr = 5e-3;
  b.weight_decay = 0;  // plain lr
  b.max_grad_norm = 0;  // no clamp
  b.bias_correction = false;
  optim::LAMB opt({all[0], all[1]}, a);
  opt.add_param_group({all[2]}, b);
  opt.set_schedule(optim::LRSchedule::cosine(10, 0.1));
  const std::vector<optim::LambOptions> per_tensor = {a, a, b};
  std::vector<std::vector<double>> w = model.weights(), m, v;
  for (const auto& x : w) {
    m.emplace_back(x.size(), 0.0);
    v.emplace_back(x.size(), 0.0);
  }
  const int steps = 6;
  int clamped = 0;  // steps where group 0's clamp acted
  for (int s = 1; s <= steps; ++s) {
    model.gradients(s, [](int, std::size_t i) { return 0.1f * (1.0f + static_cast<float>(i)); });
    const double lr_a = opt.lr(0), lr_b = opt.lr(1);  // the schedule's lrs for this step
    opt.step();
    const std::vector<std::vector<double>> g = model.grads();
    double total = 0;
    for (const auto& t : g) {
      for (double x : t) total += x * x;
    }
    const double norm = std::sqrt(total);
    clamped += norm > a.max_grad_norm ? 1 : 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const optim::LambOptions& o = per_tensor[i];
      const double lr = i < 2 ? lr_a : lr_b;
      const double c = o.max_grad_norm > 0 && norm > o.max_grad_norm ? norm / o.max_grad_norm : 1.0;
      const double bc1 = o.bias_correction ? 1 - std::pow(0.9, s) : 1.0;
      const double bc2 = o.bias_correction ? 1 - std::pow(0.999, s) : 1.0;
      std::vector<double> u(w[i].size());
      double wn = 0, un = 0;
      for (std::size_t e = 0; e < w[i].size(); ++e) {
        const double sg = g[i][e] / c;
        m[i][e] = 0.9 * m[i][e] + 0.1 * sg;
        v[i][e] = 0.999 * v[i][e] + 0.001 * sg * sg;
        u[e] = (m[i][e] / bc1) / (std::sqrt(v[i][e] / bc2) + o.eps) + o.weight_decay * w[i][e];
        wn += w[i][e] * w[i][e];
        un += u[e] * u[e];
      }
      const double ratio = o.weight_decay != 0 ? lr * std::sqrt(wn) / std::sqrt(un) : lr;
      for (std::size_t e = 0; e < w[i].size(); ++e) w[i][e] -= ratio * u[e];
    }
  }
  EXPECT_EQ(clamped, steps) << "group 0's clamp acts at every step (the norm is ~28)";
  const optim::OptimizerState st = opt.save_state();
  double worst = 0, moved = 0;
  const std::vector<std::vector<double>> start = Model<half>().weights();
  for (std::size_t i = 0; i < w.size(); ++i) {
    for (std::size_t e = 0; e < w[i].size(); ++e) {
      worst = std::max(worst, std::fabs(st.params[i].master[e] - w[i][e]));
      moved = std::max(moved, std::fabs(w[i][e] - start[i][e]));
    }
  }
  EXPECT_LT(worst, steps * 4e-6) << "worst master distance";
  EXPECT_GT(moved, 100 * steps * 4e-6);
}

TEST(Lamb, DefaultsAreApexs) {
  const optim::LambOptions o;
  EXPECT_EQ(o.lr, 1e-3);
  EXPECT_TRUE(o.bias_correction);
  EXPECT_EQ(o.betas[0], 0.9);
  EXPECT_EQ(o.betas[1], 0.999);
  EXPECT_EQ(o.eps, 1e-6);
  EXPECT_EQ(o.weight_decay, 0.01);
  EXPECT_TRUE(o.adam_w_mode);
  EXPECT_TRUE(o.grad_averaging);
  EXPECT_EQ(o.max_grad_norm, 1.0);
  EXPECT_FALSE(o.use_nvlamb);
}

TEST(Lamb, BadOptionsAreRefusedByNameBeforeAnyChange) {
  Model<half> p;
  optim::LambOptions o;
  o.betas[0] = 1.0;
  expect_error([&] { optim::LAMB opt(p.params(), o); }, {"LAMB", "betas[0] = 1", "[0, 1)"});
  o = {};
  o.max_grad_norm = -2;
  expect_error([&] { optim::LAMB opt(p.params(), o); }, {"LAMB", "max_grad_norm = -2"});
  o = {};
  o.max_grad_norm = 1e-50;  // 0 as a float, yet not 0: neither off nor a usable clamp
  expect_error([&] { optim::LAMB opt(p.params(), o); }, {"LAMB", "max_grad_norm = 1e-50"});
  o = {};
  o.eps = 0;
  expect_error([&] { optim::LAMB opt(p.params(), o); }, {"LAMB", "eps = 0"});
  optim::LAMB ok(p.params(), optim::LambOptions{});
  const std::vector<std::uint32_t> before = test::state_bits(ok);
  o = {};
  o.weight_decay = -1;
  expect_error([&] { ok.set_options(0, o); }, {"LAMB", "weight_decay = -1"});
  EXPECT_EQ(ok.options(0).weight_decay, 0.01);
  EXPECT_EQ(test::state_bits(ok), before);
}

// --- Adam / AdamW with update clipping: StableAdamW in float64 ---------------------------------

// torch's AdamW with Wortsman et al.'s Algorithm 2 clipping, in double:
// RMS = sqrt(mean(g^2 / max(v_hat, eps^2))) with v_hat this step's
// bias-corrected second moment; lr_t = lr / max(1, RMS) scales the step
// and the decoupled decay.
struct StableAdamWReference {
  optim::AdamWOptions o;
  std::vector<std::vector<double>> w, m, v;
  int step = 0;
  int clipped_steps = 0;  // (tensor, step) pairs with RMS > 1
  StableAdamWReference(const optim::AdamWOptions& opts, std::vector<std::vector<double>> weights)
      : o(opts), w(weights) {
    for (const auto& x : w) {
      m.emplace_back(x.size(), 0.0);
      v.emplace_back(x.size(), 0.0);
    }
  }
  void apply(const std::vector<std::vector<double>>& g) {
    ++step;
    const double b1 = o.betas[0], b2 = o.betas[1];
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    for (std::size_t i = 0; i < w.size(); ++i) {
      double sum = 0;
      for (std::size_t e = 0; e < w[i].size(); ++e) {
        m[i][e] = b1 * m[i][e] + (1 - b1) * g[i][e];
        v[i][e] = b2 * v[i][e] + (1 - b2) * g[i][e] * g[i][e];
        sum += g[i][e] * g[i][e] / std::max(v[i][e] / bc2, o.eps * o.eps);
      }
      const double rms = std::sqrt(sum / static_cast<double>(w[i].size()));
      const double lr = o.update_clipping ? o.lr / std::max(1.0, rms) : o.lr;
      clipped_steps += rms > 1.0 ? 1 : 0;
      for (std::size_t e = 0; e < w[i].size(); ++e) {
        w[i][e] *= 1 - lr * o.weight_decay;
        w[i][e] -= lr * (m[i][e] / bc1) / (std::sqrt(v[i][e] / bc2) + o.eps);
      }
    }
  }
};

template <class T>
class StableAdamWTest : public ::testing::Test {};
TYPED_TEST_SUITE(StableAdamWTest, WeightTypes);

template <class T, class Sd>
optim::OptimizerState stable_adamw_run(const optim::AdamWOptions& o, Sd sd, int steps, int* clipped,
                                       double* worst_out) {
  Model<T> model;
  optim::AdamW opt(model.params(), o);
  StableAdamWReference ref(o, model.weights());
  for (int s = 0; s < steps; ++s) {
    model.gradients(s, sd);
    opt.step();
    ref.apply(model.grads());
  }
  const optim::OptimizerState st = opt.save_state();
  double worst = 0, worst_v = 0;
  for (std::size_t i = 0; i < model.sizes.size(); ++i) {
    for (std::size_t e = 0; e < st.params[i].master.size(); ++e) {
      worst = std::max(worst, std::fabs(st.params[i].master[e] - ref.w[i][e]));
      worst_v = std::max(worst_v, std::fabs((*st.params[i].state[1])[e] - ref.v[i][e]) / (ref.v[i][e] + 1e-12));
    }
  }
  // The second moment, float against double: a few ulps relative.
  EXPECT_LT(worst_v, 1e-5) << "exp_avg_sq";
  *clipped = ref.clipped_steps;
  *worst_out = worst;
  return st;
}

TYPED_TEST(StableAdamWTest, ClipsWhenGradientsJumpAndMatchesAFloat64Reference) {
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.1;
  o.update_clipping = true;
  // Small gradients for 4 steps, then 30x larger: g^2 / v_hat jumps far
  // above 1 (RMS ~ 10 at step 5), and decays back as v catches up.
  auto sd = [](int s, std::size_t) { return s < 4 ? 0.01f : 0.3f; };
  const int steps = 10;
  int clipped = 0;
  double worst = 0;
  const optim::OptimizerState with = stable_adamw_run<TypeParam>(o, sd, steps, &clipped, &worst);
  EXPECT_GE(clipped, 3) << "RMS > 1 must have happened for the test to mean anything";
  // Per step a few ulps of |w| < ~5 (Adam's own rounding, as the PyTorch
  // trajectories), and the clip's lr / RMS with RMS from float sums.
  EXPECT_LT(worst, steps * 4e-6) << "worst master distance";
  // And it is not AdamW's trajectory.
  o.update_clipping = false;
  int unused = 0;
  double worst_plain = 0;
  const optim::OptimizerState without = stable_adamw_run<TypeParam>(o, sd, steps, &unused, &worst_plain);
  EXPECT_NE(first_difference(with.params[0].master, without.params[0].master), -1);
  EXPECT_LT(worst_plain, steps * 4e-6) << "the reference without clipping is AdamW's";
}

TYPED_TEST(StableAdamWTest, WithoutAJumpItIsAdamWBitForBit) {
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.update_clipping = true;
  // Shrinking gradients: g^2 < v_hat after the first step, so RMS <= 1
  // (the first step's RMS is 1 in exact arithmetic).
  auto sd = [](int s, std::size_t i) { return 0.5f * std::pow(0.6f, static_cast<float>(s)) * (1.0f + i); };
  const int steps = 8;
  int clipped = 0;
  double worst = 0;
  const optim::OptimizerState with = stable_adamw_run<TypeParam>(o, sd, steps, &clipped, &worst);
  EXPECT_EQ(clipped, 0);
  EXPECT_LT(worst, steps * 4e-6);
  o.update_clipping = false;
  double unused = 0;
  const optim::OptimizerState without = stable_adamw_run<TypeParam>(o, sd, steps, &clipped, &unused);
  // The first step's RMS may round to just above 1 (by ~1e-7): those
  // coefficients are then lr / 1.0000001, a different last bit. From then
  // on RMS < 1 and nothing is clipped; so compare the moments (clipping
  // never touches them) bit for bit, and the masters to 1e-6.
  for (std::size_t i = 0; i < with.params.size(); ++i) {
    ASSERT_EQ(first_difference(*with.params[i].state[0], *without.params[i].state[0]), -1);
    ASSERT_EQ(first_difference(*with.params[i].state[1], *without.params[i].state[1]), -1);
    for (std::size_t e = 0; e < with.params[i].master.size(); ++e) {
      ASSERT_NEAR(with.params[i].master[e], without.params[i].master[e], 1e-6);
    }
  }
}

// Adam (L2 decay, amsgrad) takes the option too; RMS uses the gradient the
// moments see and the moment the update divides by.
TEST(StableAdam, AdamWithAmsgradAndL2Clips) {
  Model<half> a, b;
  optim::AdamOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.01;
  o.amsgrad = true;
  optim::Adam plain(a.params(), o);
  o.update_clipping = true;
  optim::Adam clipped(b.params(), o);
  auto sd = [](int s, std::size_t) { return s < 3 ? 0.01f : 0.3f; };
  // Each step's movement sum |w_t - w_{t-1}| of parameter 1.
  auto movement = [](const optim::Optimizer& opt, std::vector<float>& prev) {
    const std::vector<float> now = opt.save_state().params[1].master;
    double d = 0;
    for (std::size_t e = 0; e < now.size(); ++e) d += std::fabs(now[e] - prev[e]);
    prev = now;
    return d;
  };
  std::vector<float> pa = plain.save_state().params[1].master, pb = pa;
  for (int s = 0; s < 5; ++s) {
    a.gradients(s, sd);
    b.gradients(s, sd);
    plain.step();
    clipped.step();
    const double dp = movement(plain, pa), dc = movement(clipped, pb);
    if (s == 0) {
      EXPECT_EQ(dc, dp) << "step 1: RMS = 1, nothing to clip";
    }
    // The jump: Adam's step is ~lr per element whatever the gradient's size;
    // clipping scales it by 1 / RMS (~0.5 here).
    if (s >= 3) {
      EXPECT_LT(dc, 0.7 * dp) << "step " << s;
    }
    EXPECT_GT(dc, 0.0);
  }
}

TEST(StableAdam, UpdateClippingIsOffByDefault) {
  EXPECT_FALSE(optim::AdamOptions{}.update_clipping);
  EXPECT_FALSE(optim::AdamWOptions{}.update_clipping);
}

TEST(StableAdam, AnEpsWhoseSquareIsZeroIsRefusedByName) {
  Model<half> p;
  optim::AdamWOptions o;
  o.eps = 1e-30;
  optim::AdamW fine(p.params(), o);  // without clipping it is fine
  o.update_clipping = true;
  expect_error([&] { optim::AdamW opt(p.params(), o); }, {"AdamW", "eps = 1e-30", "update_clipping"});
  const std::vector<std::uint32_t> before = test::state_bits(fine);
  expect_error([&] { fine.set_options(0, o); }, {"AdamW", "eps = 1e-30"});
  EXPECT_FALSE(fine.options(0).update_clipping);
  EXPECT_EQ(test::state_bits(fine), before);
}

// --- the pre-pass's order -----------------------------------------------------------------------

// The documented order of the sums (optim/family.hpp), transcribed here: a
// tensor in 2^16-element chunks; in a chunk, element e to partial e % 256
// in float; per 32 partials x[l] += x[l + h], h = 16 .. 1; the 8 results in
// order from 0; chunks in double. The device kernel implements this order
// (it is what makes the GPU's bits the CPU's); here the CPU must too.
double documented_sum(const std::vector<float>& terms) {
  double total = 0;
  const std::size_t chunk = std::size_t{1} << 16;
  for (std::size_t begin = 0; begin < terms.size(); begin += chunk) {
    float lanes[256] = {};
    for (std::size_t e = begin; e < std::min(begin + chunk, terms.size()); ++e) lanes[(e - begin) % 256] += terms[e];
    float sum = 0.0f;
    for (int w = 0; w < 8; ++w) {
      float* x = lanes + 32 * w;
      for (int h = 16; h > 0; h /= 2) {
        for (int l = 0; l < h; ++l) x[l] = x[l] + x[l + h];
      }
      sum = sum + x[0];
    }
    total += static_cast<double>(sum);
  }
  return total;
}

// LAMB's first step from zero moments, in float as the formula rounds it,
// with the trust ratio from sums in the documented order: the master must
// have these bits exactly. (Summed in plain sequence instead, the ratio
// differs in its last bits for this tensor: checked below, so the test can
// tell the orders apart.)
TEST(Prepass, SumsFollowTheDocumentedOrder) {
  const std::int64_t n = 200001;  // 4 chunks, the last one short, a tail not a multiple of 4
  Tensor<bfloat16> w(Shape{n}), g(Shape{n});
  fill_normal(w, 0, 1, 11);
  fill_normal(g, 0, 0.1f, 12);
  optim::LambOptions o;
  o.lr = 1e-2;
  o.max_grad_norm = 0;
  optim::LAMB opt({{"w", w, g}}, o);
  const float beta3 = static_cast<float>(1.0 - 0.9), omb2 = static_cast<float>(1.0 - 0.999);
  const float bc1 = static_cast<float>(1.0 - 0.9), bc2 = static_cast<float>(1.0 - 0.999);
  const float eps = static_cast<float>(1e-6), decay = static_cast<float>(0.01);
  std::vector<float> p(static_cast<std::size_t>(n)), u(p.size()), pp(p.size()), uu(p.size());
  for (std::size_t e = 0; e < p.size(); ++e) {
    p[e] = to_float(w.at(static_cast<std::int64_t>(e)));
    const float ge = to_float(g.at(static_cast<std::int64_t>(e)));
    volatile float m = beta3 * ge;  // 0 * beta1 + beta3 * g
    volatile float prod = omb2 * ge;
    volatile float v = prod * ge;
    volatile float den = std::sqrt(v / bc2) + eps;
    volatile float d = decay * p[e];
    u[e] = (m / bc1) / den + d;
    pp[e] = p[e] * p[e];
    uu[e] = u[e] * u[e];
  }
  const double wn = documented_sum(pp), un = documented_sum(uu);
  const float ratio = static_cast<float>(-(1e-2 * (std::sqrt(wn) / std::sqrt(un))));
  double wseq = 0, useq = 0;
  for (std::size_t e = 0; e < p.size(); ++e) {
    wseq += pp[e];
    useq += uu[e];
  }
  const float ratio_seq = static_cast<float>(-(1e-2 * (std::sqrt(wseq) / std::sqrt(useq))));
  opt.step();
  const Tensor<float>& master = opt.master(0);
  std::int64_t mismatches = 0, seq_mismatches = 0;
  for (std::size_t e = 0; e < p.size(); ++e) {
    volatile float step = ratio * u[e], step_seq = ratio_seq * u[e];
    const float want = p[e] + step, want_seq = p[e] + step_seq;
    const float have = master.at(static_cast<std::int64_t>(e));
    mismatches += std::memcmp(&have, &want, sizeof have) != 0;
    seq_mismatches += std::memcmp(&have, &want_seq, sizeof have) != 0;
  }
  EXPECT_EQ(mismatches, 0) << "the CPU's sums are not in the documented order";
  EXPECT_GT(seq_mismatches, 0) << "this tensor cannot tell the documented order from a plain sum";
}

// --- shared: skips and checkpoints -------------------------------------------------------------

// A skipped step (an inf in one gradient) leaves masters, state, weights and
// counts bit-identical; a checkpoint after it resumes with the bits of a
// run that never stopped.
template <class Opt, class T>
void skip_and_resume(const typename Opt::options_type& o, const std::string& file) {
  Model<T> straight, first, resumed;
  Opt a(straight.params(), o), b(first.params(), o);
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  amp::GradScaler sa(so), sb(so);
  auto sd = [](int s, std::size_t) { return s == 4 ? 1.0f : 0.05f; };
  auto step = [&](Model<T>& m, Opt& opt, amp::GradScaler& sc, int s) {
    m.gradients(s, sd, sc.scale());
    if (s == 3) m.g[1].at(7) = from_float<T>(INFINITY);
    sc.step(opt);
    sc.update();
  };
  for (int s = 0; s < 7; ++s) step(straight, a, sa, s);
  for (int s = 0; s < 3; ++s) step(first, b, sb, s);
  const std::vector<std::uint32_t> before = test::state_bits(b);
  const std::vector<std::vector<double>> weights_before = first.weights();
  step(first, b, sb, 3);
  ASSERT_EQ(test::state_bits(b), before) << "the skipped step changed the state";
  ASSERT_EQ(first.weights(), weights_before) << "the skipped step changed a weight";
  EXPECT_EQ(sb.skipped_steps(), 1);
  const std::string path = test::temp_path(file);
  io::save_checkpoint(path, b, sb);
  Opt c(resumed.params(), o);
  amp::GradScaler sc(so);
  io::load_checkpoint(path, c, sc);
  for (int s = 4; s < 7; ++s) step(resumed, c, sc, s);
  EXPECT_EQ(test::state_bits(c), test::state_bits(a)) << "the resumed run differs";
  EXPECT_EQ(resumed.weights(), straight.weights());
  EXPECT_EQ(sc.scale(), sa.scale());
  std::remove(path.c_str());
}

TYPED_TEST(LambTest, SkipsAndResumesBitExactly) {
  optim::LambOptions o;
  o.lr = 1e-2;
  skip_and_resume<optim::LAMB, TypeParam>(o, "lamb_resume.safetensors");
}

TYPED_TEST(StableAdamWTest, SkipsAndResumesBitExactly) {
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.update_clipping = true;
  skip_and_resume<optim::AdamW, TypeParam>(o, "stable_adamw_resume.safetensors");
}

// The loss scaler's unscale and clip reach the pre-pass: with the same
// gradients, a scaled run and an unscaled one give the same bits (the
// scales are powers of two, the unscale exact).
TEST(Lamb, TheScalersUnscaleReachesThePrepass) {
  Model<bfloat16> a, b;  // bf16: a power-of-two scale rounds no gradient differently
  optim::LambOptions o;
  o.lr = 1e-2;
  optim::LAMB plain(a.params(), o), scaled(b.params(), o);
  amp::GradScalerOptions so;
  so.init_scale = 256;
  amp::GradScaler sc(so);
  auto sd = [](int, std::size_t) { return 0.05f; };
  for (int s = 0; s < 4; ++s) {
    a.gradients(s, sd);
    b.gradients(s, sd, sc.scale());
    plain.step();
    sc.step(scaled);
    sc.update();
  }
  EXPECT_EQ(test::state_bits(scaled), test::state_bits(plain));
}

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// The precursors the update pass sums (Optimizer::set_precursors, issue 19
// part 1) against float64 sums the test makes from the masters before and
// after the step, the second moment it saves and its own ulp; turning them
// on changes no bit of the step; the monitor's records carry them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

// The spacing of fp16 values at |x| rounded to fp16, from the format's
// definition: 2^(e - 10) for e = floor(log2 |x|) >= -14, else 2^-24.
double half_ulp_spacing(float x) {
  const double a = std::fabs(static_cast<double>(to_float(from_float<half>(x))));
  if (a < std::ldexp(1.0, -14)) return std::ldexp(1.0, -24);
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(a))) - 10);
}

struct Trainer {
  Tensor<half> w{Shape{3000}}, g{Shape{3000}};
  Trainer() { fill_normal(w, 0, 1, 4); }
  void gradients(int s) {
    fill_normal(g, 0, 0.1f, 40 + static_cast<std::uint64_t>(s));
    // Tiny gradients on a third of the elements: their second moment falls under eps^2.
    for (std::int64_t e = 0; e < 1000; ++e) g.at(e) = from_float<half>(to_float(g.at(e)) * 1e-4f);
  }
};

TEST(Precursors, TheUpdatePassSumsWhatTheStepDid) {
  Trainer r;
  optim::AdamWOptions o;
  o.lr = 1e-3;
  o.eps = 1e-5;
  optim::AdamW opt({{"w", r.w, r.g}}, o);
  std::vector<double> sums(optim::Optimizer::kPrecursorSums);
  for (int s = 0; s < 6; ++s) {
    r.gradients(s);
    const std::vector<float> before = opt.master_values(0);
    std::fill(sums.begin(), sums.end(), 0.0);
    opt.set_precursors(sums.data());
    opt.step();
    opt.set_precursors(nullptr);
    const std::vector<float> after = opt.master_values(0);
    const std::vector<float> v = *opt.save_state().params[0].state[1];
    // In the floats the monitor reads (SecondMoment): float eps squared,
    // the bias correction from float beta2.
    const float eps = 1e-5f, beta2 = 0.999f;
    const float v_scale = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(beta2), s + 1)));
    const float eps2 = eps * eps;
    double ratio = 0, below = 0, upd = 0, wt = 0, lost = 0;
    for (std::size_t e = 0; e < before.size(); ++e) {
      const double g = to_float(r.g.at(static_cast<std::int64_t>(e)));
      const float vhat = v[e] * v_scale;
      ratio += g * g / std::max(vhat, eps2);
      below += vhat < eps2 ? 1 : 0;
      const double d = static_cast<double>(after[e]) - before[e];
      upd += d * d;
      wt += static_cast<double>(before[e]) * before[e];
      lost += std::fabs(d) < 0.5 * half_ulp_spacing(before[e]) ? 1 : 0;
    }
    // Float terms (optim/precursors.hpp) against this double reference: a
    // few float roundings a term, all of one sign.
    EXPECT_NEAR(sums[0], ratio, 1e-6 * ratio) << "step " << s;
    EXPECT_EQ(sums[1], below) << "step " << s;
    EXPECT_NEAR(sums[2], upd, 1e-6 * upd) << "step " << s;
    EXPECT_NEAR(sums[3], wt, 1e-6 * wt) << "step " << s;
    EXPECT_EQ(sums[4], lost) << "step " << s;
    // The run is a real test of each sum: some of every kind, not all.
    EXPECT_GT(below, 0);
    EXPECT_LT(below, 3000);
    EXPECT_GT(lost, 0);
    EXPECT_LT(lost, 3000);
  }
}

// The lost-update term against float64 where float's half-ulp would
// round: masters of 0 and subnormal size that do not move are lost updates
// for float weights as for 16-bit ones; a move of one spacing is not.
TEST(Precursors, LostUpdatesAtZeroAndTinyMasters) {
  const auto lost = [](auto weight, float before, float after) {
    using T = decltype(weight);
    float t[optim::kPrecursorSums];
    optim::precursor_terms<T>(t, before, after, 0.0f, false, 0.0f, 1.0f, 0.0f);
    return t[4];
  };
  for (const float before : {0.0f, 1e-40f, -1.2e-38f, 2.4e-38f, 1.0f, -3.5f}) {
    EXPECT_EQ(lost(0.0f, before, before), 1.0f) << before;
    EXPECT_EQ(lost(half(), before, before), 1.0f) << before;
    const float next = std::nextafter(std::fabs(before), INFINITY);
    const double half_spacing = 0.5 * (static_cast<double>(next) - std::fabs(before));
    // One float spacing up: |d| = the spacing, not under half of it.
    const float up = std::copysign(next, before == 0.0f ? 1.0f : before);
    EXPECT_EQ(lost(0.0f, before, up), std::fabs(static_cast<double>(up) - before) < half_spacing ? 1.0f : 0.0f)
        << before;
    EXPECT_EQ(lost(0.0f, before, up), 0.0f) << before;
  }
  EXPECT_EQ(lost(half(), 1.0f, 1.0f + 1.0f / 4096), 1.0f);  // under half of fp16's 2^-10 at 1
  EXPECT_EQ(lost(half(), 1.0f, 1.0f + 1.0f / 1024), 0.0f);  // one fp16 spacing
}

// Precursors on or off, the step has the same bits (the chunked loop they
// ride on is the fused one's arithmetic), for fp32 and lean state.
TEST(Precursors, TurningThemOnChangesNoBit) {
  for (optim::Moments moments : {optim::Moments::fp32, optim::Moments::int8}) {
    Trainer a, b;
    optim::AdamWOptions o;
    o.layout.moments = moments;
    optim::AdamW with({{"w", a.w, a.g}}, o), without({{"w", b.w, b.g}}, o);
    std::vector<double> sums(optim::Optimizer::kPrecursorSums);
    for (int s = 0; s < 5; ++s) {
      a.gradients(s);
      b.gradients(s);
      with.set_precursors(sums.data());
      with.step();
      with.set_precursors(nullptr);
      without.step();
    }
    EXPECT_EQ(test::state_bits(with), test::state_bits(without));
    EXPECT_GT(sums[2], 0.0);
  }
}

// The monitor's logged records carry them: RMS of g^2 / v near 1 for Adam
// on stationary noise (v estimates E[g^2]), none for SGD; the share of lost
// updates in [0, 1].
TEST(Precursors, MonitorRecordsCarryThem) {
  Trainer r;
  optim::AdamWOptions o;
  o.lr = 1e-3;
  optim::AdamW adam({{"w", r.w, r.g}}, o);
  amp::GradScaler scaler;
  monitor::MonitorOptions mo;
  mo.every = 10;
  monitor::Monitor mon(adam, scaler, mo);
  for (int s = 0; s < 200; ++s) {
    r.gradients(s);
    for (std::int64_t e = 0; e < r.g.numel(); ++e) r.g.at(e) = from_float<half>(to_float(r.g.at(e)) * scaler.scale());
    mon.step(1.0f);
  }
  const monitor::LogRecord* rec = mon.last_record();
  ASSERT_NE(rec, nullptr);
  const monitor::ParamSample& p = rec->params[0];
  EXPECT_GT(p.v_ratio_rms, 0.5);
  EXPECT_LT(p.v_ratio_rms, 2.0);
  EXPECT_GE(p.lost_update_share, 0.0);
  EXPECT_LE(p.lost_update_share, 1.0);
  EXPECT_GT(p.update_ratio, 0.0);

  Trainer q;
  optim::SGD sgd({{"w", q.w, q.g}});
  amp::GradScaler s2;
  monitor::Monitor m2(sgd, s2, mo);
  for (int s = 0; s < 10; ++s) {
    q.gradients(s);
    for (std::int64_t e = 0; e < q.g.numel(); ++e) q.g.at(e) = from_float<half>(to_float(q.g.at(e)) * s2.scale());
    m2.step(1.0f);
  }
  ASSERT_NE(m2.last_record(), nullptr);
  EXPECT_TRUE(std::isnan(m2.last_record()->params[0].v_ratio_rms));
  EXPECT_TRUE(std::isnan(m2.last_record()->params[0].eps_share));
  EXPECT_GT(m2.last_record()->params[0].update_ratio, 0.0);
}

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// Soak test: 20,000 CPU training steps of a small fp16 model under dynamic
// loss scaling, with 1% of the steps carrying an injected inf or NaN, organic
// fp16 overflows and a forced collapse of the scale to min_scale, checked
// step by step against the test's own model of which steps are skipped, of
// the scale update rule and of the optimizer's bookkeeping.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

// --- the test's own tools, independent of the library ------------------------

// splitmix64 and Box-Muller: the same numbers with every standard library,
// so the chosen steps and the coverage counts below do not move.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  std::size_t below(std::size_t n) { return static_cast<std::size_t>(next() % n); }
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  std::uint64_t s_;
};

std::uint16_t half_bits(const half& h) {
  std::uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}
void set_half_bits(half& h, std::uint16_t b) { std::memcpy(static_cast<void*>(&h), &b, sizeof b); }
// inf or NaN: the exponent field all ones.
bool half_nonfinite(std::uint16_t b) { return (b & 0x7c00u) == 0x7c00u; }

// float -> half bits, round to nearest even, written from IEEE 754 for this
// test: the model weight must be the master rounded so after every step.
std::uint16_t round_to_half_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;   // NaN (masters never are)
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                        // below 2^-14: a subnormal half
    float a;
    std::memcpy(&a, &x, sizeof a);
    // a * 2^24 is exact; nearbyint rounds half to even (the default mode).
    return sign | static_cast<std::uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  const std::uint32_t mantissa = x & 0x7fffffu;
  std::uint32_t h = (((x >> 23) - 127u + 15u) << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry bumps the exponent, as it should
  return sign | static_cast<std::uint16_t>(h);
}

// The loss-scale rule as torch.amp.GradScaler documents it, with mixprec's
// hysteresis and clamps (docs and GradScalerOptions' comments), kept by the
// test: counts of consecutive finite and non-finite steps, products taken in
// double and rounded to float.
struct ScaleModel {
  amp::GradScalerOptions o;
  float scale;
  std::int64_t finite_run = 0;     // finite steps since the last change of the scale or a non-finite step
  std::int64_t nonfinite_run = 0;  // non-finite steps since the last backoff or finite step
  std::int64_t clamped_min = 0;    // backoffs stopped at min_scale
  std::int64_t clamped_max = 0;    // growths stopped at max_scale
  std::int64_t growths = 0, backoffs = 0;

  explicit ScaleModel(const amp::GradScalerOptions& options)
      : o(options), scale(static_cast<float>(options.init_scale)) {}

  void update(bool nonfinite) {
    const float lo = static_cast<float>(o.min_scale), hi = static_cast<float>(o.max_scale);
    if (nonfinite) {
      finite_run = 0;
      if (++nonfinite_run < o.hysteresis) return;
      nonfinite_run = 0;
      ++backoffs;
      const float want = static_cast<float>(static_cast<double>(scale) * o.backoff_factor);
      if (want < lo) ++clamped_min;
      scale = want < lo ? lo : want;
      return;
    }
    nonfinite_run = 0;
    if (++finite_run < o.growth_interval) return;
    finite_run = 0;
    ++growths;
    const float want = static_cast<float>(static_cast<double>(scale) * o.growth_factor);
    if (want > hi) ++clamped_max;
    const float next = want > hi ? hi : want;
    if (std::isfinite(next)) scale = next;
  }
};

// Read access to every state tensor of an optimizer, through the protected
// existing_state(): the public API shows only second_moment(i), not exp_avg
// or the momentum buffers, so a skipped step that touched those would go
// unseen by a user-level check.
template <class O>
class Open : public O {
 public:
  using O::O;
  const float* state_view(std::size_t i, std::size_t k) const { return this->existing_state(i, k); }
};

// --- the soak harness ----------------------------------------------------------

constexpr int kMaxState = 3;

struct ParamSpec {
  std::string name;
  Shape shape;
};

// One fp16 parameter of the quadratic loss 0.5 * sum a_e (w_e - t_e)^2.
struct Weight {
  std::string name;
  Tensor<half> w, g;
  std::vector<float> target, curvature;
};

// An optimizer under test and what the test keeps about it.
struct Tracked {
  optim::Optimizer* opt = nullptr;
  std::function<const float*(std::size_t, std::size_t)> state;  // Open::state_view
  std::size_t num_state = 0;                                     // state tensors per parameter once stepped
  std::vector<std::size_t> weights;                              // index into the harness's weights, per parameter
  std::int64_t applied = 0;                                      // the test's count of its applied steps
};

struct Snapshot {
  std::vector<std::vector<float>> master;                    // [param]
  std::vector<std::vector<std::vector<float>>> state;        // [param][k], empty when absent
  std::vector<std::vector<char>> present;                    // [param][k]
  std::vector<std::int64_t> steps;                           // [param]
  std::int64_t applied = 0;
};

void take(const Tracked& t, Snapshot& s) {
  const std::size_t n = t.opt->num_params();
  s.master.resize(n);
  s.state.resize(n);
  s.present.resize(n);
  s.steps.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const Tensor<float>& m = t.opt->master(i);
    s.master[i].assign(m.data(), m.data() + m.numel());
    s.state[i].resize(kMaxState);
    s.present[i].assign(kMaxState, 0);
    for (int k = 0; k < kMaxState; ++k) {
      const float* p = t.state(i, static_cast<std::size_t>(k));
      s.present[i][k] = p != nullptr;
      if (p) {
        s.state[i][k].assign(p, p + m.numel());
      } else {
        s.state[i][k].clear();
      }
    }
    s.steps[i] = t.opt->step_count(i);
  }
  s.applied = t.opt->applied_steps();
}

bool same_bits(const std::vector<float>& a, const float* b, std::size_t n) {
  return a.size() == n && (n == 0 || std::memcmp(a.data(), b, n * sizeof(float)) == 0);
}

struct SoakConfig {
  amp::GradScalerOptions scaler;
  int steps = 20000;
  int injected = 200;   // 1% of the steps, at seeded random steps outside the burst
  int burst_at = 8000;  // the forced collapse: consecutive non-finite steps
  int burst_len = 0;
  double noise = 1e-3;  // per-step gradient noise: noise * exp(0.75 z), z ~ N(0, 1)
};

// What a run saw, for the coverage checks and the log line.
struct SoakCounts {
  std::int64_t applied = 0, skipped = 0;
  std::int64_t injected = 0, burst = 0, overflow_only = 0;  // kinds of skipped iteration
  std::int64_t partial = 0;  // iterations where one optimizer stepped and another skipped
  std::int64_t min_scale_errors = 0;
  int recovered_after = -1;  // steps from the end of the burst back to the scale before it
  float before_burst = 0, after_burst = 0;
};

class Soak {
 public:
  Soak(const std::vector<ParamSpec>& specs, std::uint64_t seed) : rng_(seed) {
    for (const ParamSpec& p : specs) {
      auto w = std::make_unique<Weight>();
      w->name = p.name;
      w->w = Tensor<half>(p.shape);
      w->g = Tensor<half>(p.shape);
      const std::int64_t n = w->w.numel();
      w->target.resize(static_cast<std::size_t>(n));
      w->curvature.resize(static_cast<std::size_t>(n));
      for (std::int64_t e = 0; e < n; ++e) {
        w->w.data()[e] = from_float<half>(static_cast<float>(rng_.normal()));
        w->target[static_cast<std::size_t>(e)] = static_cast<float>(rng_.normal());
        // Curvatures spread over two decades, like a badly conditioned layer.
        w->curvature[static_cast<std::size_t>(e)] = static_cast<float>(std::pow(10.0, -2.0 * rng_.uniform()));
      }
      weights_.push_back(std::move(w));
    }
    noise_.resize(kNoise);
    for (float& z : noise_) z = static_cast<float>(rng_.normal());
  }

  optim::Param param(const std::string& name) {
    for (auto& w : weights_) {
      if (w->name == name) return {w->name, w->w, w->g};
    }
    ADD_FAILURE() << "no weight " << name;
    return {};
  }
  std::size_t index(const std::string& name) const {
    for (std::size_t i = 0; i < weights_.size(); ++i) {
      if (weights_[i]->name == name) return i;
    }
    return weights_.size();
  }

  template <class O>
  void track(Open<O>& opt, std::size_t num_state) {
    Tracked t;
    t.opt = &opt;
    t.state = [&opt](std::size_t i, std::size_t k) { return opt.state_view(i, k); };
    t.num_state = num_state;
    for (std::size_t i = 0; i < opt.num_params(); ++i) t.weights.push_back(index(opt.param(i).name));
    tracked_.push_back(std::move(t));
  }

  void run(const SoakConfig& c, SoakCounts& out);

 private:
  static constexpr std::size_t kNoise = 1u << 16;

  // Scaled fp16 gradients of the quadratic loss at the current fp16
  // weights, with this step's noise; overflows to inf where scale * g does.
  void write_gradients(float scale, float sigma) {
    for (auto& w : weights_) {
      const std::size_t off = rng_.below(kNoise);
      const std::int64_t n = w->w.numel();
      for (std::int64_t e = 0; e < n; ++e) {
        const std::size_t j = static_cast<std::size_t>(e);
        const float x = to_float(w->w.data()[e]);
        const float g = w->curvature[j] * (x - w->target[j]) + sigma * noise_[(off + j) & (kNoise - 1)];
        w->g.data()[e] = from_float<half>(scale * g);
      }
    }
  }

  // One inf or NaN, of a varying kind, in one element of one parameter.
  void inject() {
    static constexpr std::uint16_t kinds[] = {0x7c00u, 0xfc00u, 0x7e00u, 0xfe00u, 0x7c01u, 0x7dffu, 0xffffu};
    Weight& w = *weights_[rng_.below(weights_.size())];
    const std::size_t e = rng_.below(static_cast<std::size_t>(w.g.numel()));
    std::uint16_t bits = kinds[rng_.below(sizeof kinds / sizeof kinds[0])];
    set_half_bits(w.g.data()[e], bits);
  }

  Rng rng_;
  std::vector<std::unique_ptr<Weight>> weights_;
  std::vector<float> noise_;
  std::vector<Tracked> tracked_;
};

void Soak::run(const SoakConfig& c, SoakCounts& out) {
  ASSERT_FALSE(tracked_.empty());
  amp::GradScaler scaler(c.scaler);
  ScaleModel model(c.scaler);
  const float lo = static_cast<float>(c.scaler.min_scale), hi = static_cast<float>(c.scaler.max_scale);

  // The injected steps: `injected` distinct steps outside the burst, by a
  // partial Fisher-Yates shuffle of the candidates.
  std::vector<char> kind(static_cast<std::size_t>(c.steps), 0);  // 1 injected, 2 burst
  for (int s = c.burst_at; s < c.burst_at + c.burst_len; ++s) kind[static_cast<std::size_t>(s)] = 2;
  {
    std::vector<int> candidates;
    for (int s = 0; s < c.steps; ++s) {
      if (kind[static_cast<std::size_t>(s)] == 0) candidates.push_back(s);
    }
    ASSERT_GE(candidates.size(), static_cast<std::size_t>(c.injected));
    for (int k = 0; k < c.injected; ++k) {
      const std::size_t j = static_cast<std::size_t>(k) + rng_.below(candidates.size() - static_cast<std::size_t>(k));
      std::swap(candidates[static_cast<std::size_t>(k)], candidates[j]);
      kind[static_cast<std::size_t>(candidates[static_cast<std::size_t>(k)])] = 1;
    }
  }

  // Masters start as the model weights, exactly.
  for (const Tracked& t : tracked_) {
    for (std::size_t i = 0; i < t.opt->num_params(); ++i) {
      const Weight& w = *weights_[t.weights[i]];
      for (std::int64_t e = 0; e < w.w.numel(); ++e) {
        ASSERT_EQ(t.opt->master(i).data()[e], to_float(w.w.data()[e])) << w.name << "[" << e << "]";
      }
    }
  }

  std::vector<Snapshot> before(tracked_.size());
  std::vector<std::vector<std::uint16_t>> weight_bits(weights_.size()), grad_bits(weights_.size());
  std::vector<char> bad(weights_.size());
  std::int64_t applied = 0, skipped = 0;
  for (int step = 0; step < c.steps; ++step) {
    const char what = kind[static_cast<std::size_t>(step)];
    // This batch's gradient noise: heavy-tailed, so that now and then a
    // batch overflows fp16 at the scale the scaler has grown to.
    const float sigma = static_cast<float>(c.noise * std::exp(0.75 * rng_.normal()));
    write_gradients(scaler.scale(), sigma);
    if (what != 0) inject();

    // The prediction, from the gradients as written.
    bool any_bad = false;
    for (std::size_t w = 0; w < weights_.size(); ++w) {
      const Tensor<half>& g = weights_[w]->g;
      grad_bits[w].resize(static_cast<std::size_t>(g.numel()));
      weight_bits[w].resize(static_cast<std::size_t>(g.numel()));
      bad[w] = 0;
      for (std::int64_t e = 0; e < g.numel(); ++e) {
        grad_bits[w][static_cast<std::size_t>(e)] = half_bits(g.data()[e]);
        weight_bits[w][static_cast<std::size_t>(e)] = half_bits(weights_[w]->w.data()[e]);
        bad[w] = bad[w] || half_nonfinite(grad_bits[w][static_cast<std::size_t>(e)]);
      }
      any_bad = any_bad || bad[w];
    }
    ASSERT_TRUE(what == 0 || any_bad) << "step " << step;
    for (std::size_t t = 0; t < tracked_.size(); ++t) take(tracked_[t], before[t]);

    std::vector<char> stepped(tracked_.size());
    for (std::size_t t = 0; t < tracked_.size(); ++t) {
      Tracked& tr = tracked_[t];
      std::vector<std::string> expected_names;
      for (std::size_t i = 0; i < tr.weights.size(); ++i) {
        if (bad[tr.weights[i]]) expected_names.push_back(weights_[tr.weights[i]]->name);
      }
      const bool expect_step = expected_names.empty();
      stepped[t] = scaler.step(*tr.opt);
      ASSERT_EQ(stepped[t] != 0, expect_step) << "step " << step << ", " << tr.opt->name();
      ASSERT_EQ(scaler.found_inf(*tr.opt), !expect_step) << "step " << step;
      ASSERT_EQ(scaler.nonfinite_params(*tr.opt), expected_names) << "step " << step;
      if (expect_step) ++tr.applied;
    }

    const std::int64_t hits_before = model.clamped_min;
    model.update(any_bad);
    bool threw = false;
    try {
      scaler.update();
    } catch (const Error& e) {
      threw = true;
      EXPECT_NE(std::string(e.what()).find("min_scale"), std::string::npos) << e.what();
    }
    // error_at_min_scale: one throw, when a backoff is first stopped at min_scale.
    const bool expect_throw = c.scaler.error_at_min_scale && hits_before == 0 && model.clamped_min > 0;
    ASSERT_EQ(threw, expect_throw) << "step " << step;
    out.min_scale_errors += threw;
    (any_bad ? skipped : applied) += 1;

    // The scale and its trackers follow the model exactly.
    const amp::ScalerState& st = scaler.state();
    ASSERT_EQ(std::memcmp(&st.scale, &model.scale, sizeof(float)), 0)
        << "step " << step << ": scale " << st.scale << ", model " << model.scale;
    ASSERT_EQ(st.growth_tracker, model.finite_run) << "step " << step;
    ASSERT_EQ(st.hysteresis_tracker, model.nonfinite_run) << "step " << step;
    ASSERT_EQ(st.min_scale_hits, model.clamped_min) << "step " << step;
    ASSERT_TRUE(st.scale >= lo && st.scale <= hi) << "step " << step << ": scale " << st.scale;
    ASSERT_EQ(scaler.applied_steps(), applied) << "step " << step;
    ASSERT_EQ(scaler.skipped_steps(), skipped) << "step " << step;

    for (std::size_t t = 0; t < tracked_.size(); ++t) {
      const Tracked& tr = tracked_[t];
      const Snapshot& b = before[t];
      ASSERT_EQ(tr.opt->applied_steps(), tr.applied) << "step " << step << ", " << tr.opt->name();
      ASSERT_EQ(tr.opt->applied_steps(), b.applied + (stepped[t] ? 1 : 0)) << "step " << step;
      bool master_changed = false;
      for (std::size_t i = 0; i < tr.opt->num_params(); ++i) {
        const Weight& w = *weights_[tr.weights[i]];
        const float* m = tr.opt->master(i).data();
        const std::size_t n = static_cast<std::size_t>(w.w.numel());
        ASSERT_EQ(tr.opt->step_count(i), tr.applied) << "step " << step << ", " << w.name;
        ASSERT_EQ(tr.opt->step_count(i), b.steps[i] + (stepped[t] ? 1 : 0)) << "step " << step << ", " << w.name;
        if (!stepped[t]) {
          // Skipped: masters, every state tensor and the model weight as before, bit for bit.
          ASSERT_TRUE(same_bits(b.master[i], m, n)) << "step " << step << ", " << w.name << ": master changed";
          for (int k = 0; k < kMaxState; ++k) {
            const float* s = tr.state(i, static_cast<std::size_t>(k));
            ASSERT_EQ(s != nullptr, b.present[i][k] != 0) << "step " << step << ", " << w.name << " state " << k;
            if (s) {
              ASSERT_TRUE(same_bits(b.state[i][k], s, n)) << "step " << step << ", " << w.name << ": state " << k
                                                          << " changed on a skipped step";
            }
          }
          ASSERT_EQ(std::memcmp(weight_bits[tr.weights[i]].data(), w.w.data(), n * sizeof(half)), 0)
              << "step " << step << ", " << w.name << ": model weight changed on a skipped step";
        } else {
          // Applied: all its state exists and moved, and the model weight is the master rounded.
          bool state_changed = false;
          for (std::size_t k = 0; k < tr.num_state; ++k) {
            const float* s = tr.state(i, k);
            ASSERT_NE(s, nullptr) << "step " << step << ", " << w.name << " state " << k;
            state_changed = state_changed || !same_bits(b.state[i][k], s, n);
          }
          ASSERT_EQ(tr.state(i, tr.num_state), nullptr) << w.name << ": more state than expected";
          ASSERT_TRUE(state_changed) << "step " << step << ", " << w.name << ": applied step left the state as it was";
          master_changed = master_changed || !same_bits(b.master[i], m, n);
          for (std::size_t e = 0; e < n; ++e) {
            ASSERT_EQ(half_bits(w.w.data()[e]), round_to_half_bits(m[e]))
                << "step " << step << ", " << w.name << "[" << e << "]: weight is not the master rounded";
          }
        }
      }
      if (stepped[t]) {
        ASSERT_TRUE(master_changed) << "step " << step << ": applied step moved no master";
      }
    }
    // The gradients are read, never written.
    for (std::size_t w = 0; w < weights_.size(); ++w) {
      ASSERT_EQ(std::memcmp(grad_bits[w].data(), weights_[w]->g.data(), grad_bits[w].size() * sizeof(half)), 0)
          << "step " << step << ": " << weights_[w]->name << "'s gradient was written";
    }

    if (any_bad) {
      if (what == 1) ++out.injected;
      if (what == 2) ++out.burst;
      if (what == 0) ++out.overflow_only;
    }
    bool some = false, all = true;
    for (char s : stepped) {
      some = some || s;
      all = all && s;
    }
    out.partial += some && !all;
    if (step == c.burst_at - 1) out.before_burst = model.scale;
    if (step == c.burst_at + c.burst_len - 1) out.after_burst = model.scale;
    if (c.burst_len > 0 && step >= c.burst_at + c.burst_len && out.recovered_after < 0 &&
        model.scale >= out.before_burst) {
      out.recovered_after = step - (c.burst_at + c.burst_len) + 1;
    }
  }
  out.applied = applied;
  out.skipped = skipped;
  ASSERT_EQ(scaler.applied_steps() + scaler.skipped_steps(), c.steps);
  for (const Tracked& t : tracked_) ASSERT_EQ(t.opt->applied_steps(), t.applied);

  // The run exercised what it is here for (seeded, so these are fixed; they
  // guard against a change of sizes or options that makes the test vacuous).
  EXPECT_EQ(out.injected, c.injected);
  EXPECT_EQ(out.burst, c.burst_len);
  EXPECT_GE(out.overflow_only, 10) << "too few organic fp16 overflows";
  EXPECT_GE(model.growths, 20);
  EXPECT_GE(model.backoffs, 20);
  EXPECT_GE(model.clamped_max, 1) << "the scale never reached max_scale";
  EXPECT_GE(model.clamped_min, 1) << "the burst did not drive the scale to min_scale";
  EXPECT_EQ(out.after_burst, lo) << "the scale is not at min_scale after the burst";
  EXPECT_GE(out.recovered_after, 0) << "the scale never grew back to " << out.before_burst;
  std::printf("[ soak     ] %d steps: %lld applied, %lld skipped (%lld injected, %lld burst, %lld fp16 overflow), "
              "%lld partial; %lld growths (%lld at max_scale), %lld backoffs (%lld at min_scale); "
              "scale %g before the burst, %g after, back in %d steps\n",
              c.steps, static_cast<long long>(applied), static_cast<long long>(skipped),
              static_cast<long long>(out.injected), static_cast<long long>(out.burst),
              static_cast<long long>(out.overflow_only), static_cast<long long>(out.partial),
              static_cast<long long>(model.growths), static_cast<long long>(model.clamped_max),
              static_cast<long long>(model.backoffs), static_cast<long long>(model.clamped_min),
              static_cast<double>(out.before_burst), static_cast<double>(out.after_burst), out.recovered_after);
}

// --- the runs --------------------------------------------------------------------

const std::vector<ParamSpec> kModel = {
    {"w1", Shape{48, 40}},  // 1920: whole 8-lane blocks and whole 1024-element chunks plus a partial one
    {"w2", Shape{333}},     // a ragged tail on every path
    {"b", Shape{7}},        // shorter than one vector
};

// AdamW with weight decay, torch's default policy (growth 2, backoff 0.5,
// hysteresis 1) with a shorter interval, max_scale that the scale reaches,
// and min_scale that the burst reaches.
TEST(Soak, AdamWDynamicScaling) {
  Soak soak(kModel, 0x5eed0001);
  optim::AdamWOptions o;
  o.lr = 1e-3;
  o.weight_decay = 1e-2;
  Open<optim::AdamW> opt({soak.param("w1"), soak.param("w2"), soak.param("b")}, o);
  soak.track(opt, 2);  // exp_avg, exp_avg_sq
  SoakConfig c;
  c.scaler.growth_interval = 50;
  c.scaler.min_scale = 64.0;
  c.scaler.max_scale = 2097152.0;  // 2^21
  c.burst_len = 24;                 // 2^21 -> 64 takes 15 backoffs; 9 more stop at min_scale
  SoakCounts counts;
  ASSERT_NO_FATAL_FAILURE(soak.run(c, counts));
  // The public second-moment view names the same buffer the test checked.
  for (std::size_t i = 0; i < opt.num_params(); ++i) EXPECT_EQ(opt.second_moment(i).v, opt.state_view(i, 1));
}

// Two optimizers of other kinds sharing one scaler, so that a step can be
// applied for one and skipped for the other; factors whose products round
// (1.5, 0.6), hysteresis 2, and error_at_min_scale, which must throw exactly
// once, when the burst first reaches min_scale.
TEST(Soak, SGDAndRMSpropShareAScalerWithHysteresis) {
  Soak soak(kModel, 0x5eed0002);
  optim::SGDOptions so;
  so.lr = 1e-2;
  so.momentum = 0.9;
  so.nesterov = true;
  so.weight_decay = 1e-4;
  Open<optim::SGD> sgd({soak.param("w1")}, so);
  optim::RMSpropOptions ro;
  ro.lr = 1e-3;
  ro.momentum = 0.5;
  ro.centered = true;
  ro.weight_decay = 1e-4;
  Open<optim::RMSprop> rms({soak.param("w2"), soak.param("b")}, ro);
  soak.track(sgd, 1);  // momentum_buffer
  soak.track(rms, 3);  // square_avg, grad_avg, momentum_buffer
  SoakConfig c;
  c.scaler.growth_factor = 1.5;
  c.scaler.backoff_factor = 0.6;
  c.scaler.growth_interval = 40;
  c.scaler.hysteresis = 2;
  c.scaler.min_scale = 100.0;
  c.scaler.max_scale = 3.0e6;
  c.scaler.error_at_min_scale = true;
  c.burst_len = 60;  // 2 * ceil(log(3e6 / 100) / log(1 / 0.6)) = 42 steps to reach min_scale
  SoakCounts counts;
  ASSERT_NO_FATAL_FAILURE(soak.run(c, counts));
  EXPECT_EQ(counts.min_scale_errors, 1);
  EXPECT_GE(counts.partial, 10) << "too few steps applied by one optimizer and skipped by the other";
}

}  // namespace
}  // namespace mixprec

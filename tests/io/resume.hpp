// SPDX-License-Identifier: Apache-2.0
// Shared by checkpoint_test (host) and checkpoint_gpu_test (device): a small
// fp16 model trained by each optimizer kind under a dynamic scaler with a
// cosine schedule, gradients drawn from an RNG the checkpoint carries, and
// every 17th step overflowing; run straight for 2n steps, or n steps, save,
// a fresh model (other initial weights, a fresh optimizer and scaler), load,
// n steps. Both must end with the same bits everywhere.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "mixprec/io/checkpoint.hpp"
#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

namespace mixprec::test {

// A checkpoint file in the test's temporary directory, unique to this process.
inline std::string checkpoint_path(const std::string& name) {
  return test::temp_path("checkpoint_" + name + ".safetensors");
}

enum class OptKind { adamw_amsgrad, sgd_nesterov, rmsprop_centered };

inline const char* kind_name(OptKind k) {
  return k == OptKind::adamw_amsgrad ? "AdamW" : k == OptKind::sgd_nesterov ? "SGD" : "RMSprop";
}

struct Model {
  std::vector<std::int64_t> sizes{1000, 37, 4099, 1};
  std::vector<Tensor<half>> w, g;
  std::vector<optim::Param> params;
};

// Weights from `seed` (a resumed run starts from other weights: the load
// must overwrite every one of them).
inline std::unique_ptr<Model> make_model(Device where, std::uint64_t seed) {
  auto m = std::make_unique<Model>();
  for (std::size_t i = 0; i < m->sizes.size(); ++i) {
    Tensor<half> hw(Shape{m->sizes[i]});
    fill_normal(hw, 0, 0.5, seed * 100 + i);
    m->w.push_back(where.is_cuda() ? hw.to(where) : std::move(hw));
    m->g.emplace_back(Shape{m->sizes[i]}, where);
    m->params.push_back({"layer" + std::to_string(i) + ".weight", TensorRef(m->w.back()), TensorRef(m->g.back())});
  }
  return m;
}

// Two groups (the last parameter alone, another lr), a cosine schedule.
inline std::unique_ptr<optim::Optimizer> make_optimizer(OptKind kind, Model& m) {
  std::vector<optim::Param> first(m.params.begin(), m.params.end() - 1), last(m.params.end() - 1, m.params.end());
  std::unique_ptr<optim::Optimizer> opt;
  if (kind == OptKind::adamw_amsgrad) {
    optim::AdamWOptions o;
    o.lr = 1e-2;
    o.amsgrad = true;
    auto a = std::make_unique<optim::AdamW>(first, o);
    o.lr = 3e-3;
    a->add_param_group(last, o);
    opt = std::move(a);
  } else if (kind == OptKind::sgd_nesterov) {
    optim::SGDOptions o;
    o.lr = 0.05;
    o.momentum = 0.9;
    o.nesterov = true;
    o.weight_decay = 1e-4;
    auto s = std::make_unique<optim::SGD>(first, o);
    o.lr = 0.01;
    s->add_param_group(last, o);
    opt = std::move(s);
  } else {
    optim::RMSpropOptions o;
    o.lr = 1e-3;
    o.centered = true;
    o.momentum = 0.5;
    auto r = std::make_unique<optim::RMSprop>(first, o);
    o.lr = 2e-3;
    r->add_param_group(last, o);
    opt = std::move(r);
  }
  opt->set_schedule(optim::LRSchedule::cosine(150, 0.1));
  return opt;
}

inline amp::GradScalerOptions scaler_options() {
  amp::GradScalerOptions o;
  o.init_scale = 1024;
  o.growth_interval = 7;  // the scale moves both ways within 100 steps
  o.hysteresis = 2;       // and the hysteresis tracker is not always 0
  return o;
}

template <class Scaler>
Scaler make_scaler(Device where);
template <>
inline amp::GradScaler make_scaler<amp::GradScaler>(Device) {
  return amp::GradScaler(scaler_options());
}
template <>
inline amp::DeviceGradScaler make_scaler<amp::DeviceGradScaler>(Device where) {
  return amp::DeviceGradScaler(scaler_options(), where);
}

// Step s's gradients, scaled: drawn from `rng` (the checkpoint's RNG), an
// overflow in parameter 2 on every 17th step and on the next one.
inline void upload_gradients(Model& m, int s, float scale, std::mt19937_64& rng, Device where) {
  std::normal_distribution<float> normal(0.0f, 1e-3f);
  for (std::size_t i = 0; i < m.sizes.size(); ++i) {
    std::vector<half> h(static_cast<std::size_t>(m.sizes[i]));
    for (half& x : h) x = half(normal(rng) * scale);
    if (i == 2 && (s % 17 == 0 || s % 17 == 1)) h[5] = half(std::numeric_limits<float>::infinity());
    detail::copy_raw(m.g[i].data(), where, h.data(), Device::cpu(), h.size() * sizeof(half));
  }
}

// Every bit of a run's state.
struct Bits {
  optim::OptimizerState opt;
  std::vector<std::vector<std::uint16_t>> weights;
  amp::ScalerState scaler;
  std::int64_t applied = 0, skipped = 0;
};

template <class Scaler>
Bits bits(const Model& m, const optim::Optimizer& opt, const Scaler& scaler) {
  Bits b;
  b.opt = opt.save_state();
  for (const Tensor<half>& w : m.w) {
    std::vector<std::uint16_t> v(static_cast<std::size_t>(w.numel()));
    detail::copy_raw(v.data(), Device::cpu(), w.data(), w.device(), v.size() * 2);
    b.weights.push_back(std::move(v));
  }
  b.scaler = scaler.state();
  b.applied = scaler.applied_steps();
  b.skipped = scaler.skipped_steps();
  return b;
}

inline bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

inline void expect_same_bits(const Bits& a, const Bits& b) {
  ASSERT_EQ(a.opt.params.size(), b.opt.params.size());
  for (std::size_t i = 0; i < a.opt.params.size(); ++i) {
    const optim::ParamState &p = a.opt.params[i], &q = b.opt.params[i];
    EXPECT_TRUE(same_floats(p.master, q.master)) << "master " << i;
    EXPECT_EQ(p.step, q.step) << "step " << i;
    ASSERT_EQ(p.state.size(), q.state.size());
    for (std::size_t k = 0; k < p.state.size(); ++k) {
      ASSERT_EQ(p.state[k].has_value(), q.state[k].has_value()) << "param " << i << " state " << k;
      if (p.state[k]) {
        EXPECT_TRUE(same_floats(*p.state[k], *q.state[k])) << "param " << i << " state " << k;
      }
    }
    EXPECT_EQ(a.weights[i], b.weights[i]) << "weight " << i;
  }
  EXPECT_EQ(a.opt.lrs, b.opt.lrs);
  EXPECT_EQ(a.opt.applied_steps, b.opt.applied_steps);
  EXPECT_EQ(std::memcmp(&a.scaler.scale, &b.scaler.scale, sizeof(float)), 0) << a.scaler.scale << " " << b.scaler.scale;
  EXPECT_EQ(a.scaler.growth_tracker, b.scaler.growth_tracker);
  EXPECT_EQ(a.scaler.hysteresis_tracker, b.scaler.hysteresis_tracker);
  EXPECT_EQ(a.scaler.min_scale_hits, b.scaler.min_scale_hits);
  EXPECT_EQ(a.applied, b.applied);
  EXPECT_EQ(a.skipped, b.skipped);
}

// Runs steps [first, last] of the model.
template <class Scaler>
void train(Model& m, optim::Optimizer& opt, Scaler& scaler, std::mt19937_64& rng, int first, int last, Device where) {
  for (int s = first; s <= last; ++s) {
    upload_gradients(m, s, scaler.scale(), rng, where);
    scaler.step(opt);
    scaler.update();
  }
}

// `total` steps straight against `split` + save + load into fresh objects +
// the rest. With the overflows at 17k and 17k + 1 and growth_interval 7, a
// split at 40 saves growth_tracker 5 (the next growth, at 42, comes before
// the next overflow), at 51 hysteresis_tracker 1.
template <class Scaler>
void check_resume(OptKind kind, Device where, int split, int total, const std::string& path, Scaler* /*type*/) {
  SCOPED_TRACE(std::string(kind_name(kind)) + ", saved after step " + std::to_string(split));
  const int n = split;
  auto straight_model = make_model(where, 1);
  auto straight_opt = make_optimizer(kind, *straight_model);
  Scaler straight_scaler = make_scaler<Scaler>(where);
  std::mt19937_64 straight_rng(42);
  train(*straight_model, *straight_opt, straight_scaler, straight_rng, 1, total, where);
  const Bits want = bits(*straight_model, *straight_opt, straight_scaler);
  ASSERT_GT(want.skipped, 2);   // the run crossed overflows
  ASSERT_GT(want.applied, total / 2);

  std::uint64_t saved_next = 0;
  {
    auto model = make_model(where, 1);
    auto opt = make_optimizer(kind, *model);
    Scaler scaler = make_scaler<Scaler>(where);
    std::mt19937_64 rng(42);
    train(*model, *opt, scaler, rng, 1, n, where);
    io::CheckpointExtras extras;
    extras.rng = &rng;
    extras.metadata["step"] = std::to_string(n);
    io::save_checkpoint(path, *opt, scaler, extras);
    const amp::ScalerState saved = scaler.state();
    EXPECT_TRUE(saved.growth_tracker != 0 || saved.hysteresis_tracker != 0)
        << "the split should save a tracker that is not 0";
    std::mt19937_64 copy = rng;
    saved_next = copy();
  }
  auto model = make_model(where, 2);  // other weights
  auto opt = make_optimizer(kind, *model);
  Scaler scaler = make_scaler<Scaler>(where);
  std::mt19937_64 rng(7);  // another state
  io::CheckpointExtras extras;
  extras.rng = &rng;
  io::load_checkpoint(path, *opt, scaler, &extras);
  EXPECT_EQ(extras.metadata.at("step"), std::to_string(n));
  std::mt19937_64 copy = rng;
  EXPECT_EQ(copy(), saved_next);
  train(*model, *opt, scaler, rng, n + 1, total, where);
  expect_same_bits(bits(*model, *opt, scaler), want);
}

}  // namespace mixprec::test

// SPDX-License-Identifier: Apache-2.0
// The precision fallback tests' problem (host and device tests share it):
// a model with one layer built to overflow fp16, its data and its initial
// weights.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec::fallback_problem {

inline constexpr int kIn = 16, kHidden = 32, kClasses = 4, kBatch = 64, kTrain = 4096, kTest = 2048;
// Layer 0 reads raw features of magnitude ~kGain (a sensor's units, say)
// with weights 1/kGain of the usual: the network is an ordinary one in
// x / kGain, but layer 0's weight gradient is kGain times the ordinary
// one, and at a loss scale of 2^16 it overflows fp16 (the other layers'
// gradients stay far inside it). A power of two, so W / kGain is exact.
inline constexpr float kGain = 256.0f;

struct Data {
  std::vector<float> x;  // [n, kIn], raw units
  std::vector<std::int32_t> y;
};

// A linearly separable 4-class problem: label = argmax of a fixed random
// teacher's scores of x / kGain.
inline Data make_data(int n, std::uint32_t seed) {
  std::mt19937 teacher_rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> teacher(kClasses * kIn);
  for (float& t : teacher) t = normal(teacher_rng);
  std::mt19937 rng(seed);
  Data d;
  d.x.resize(static_cast<std::size_t>(n) * kIn);
  d.y.resize(static_cast<std::size_t>(n));
  for (int s = 0; s < n; ++s) {
    for (int i = 0; i < kIn; ++i) d.x[s * kIn + i] = normal(rng) * kGain;
    int best = 0;
    double best_score = -1e300;
    for (int c = 0; c < kClasses; ++c) {
      double score = 0;
      for (int i = 0; i < kIn; ++i) score += static_cast<double>(teacher[c * kIn + i]) * d.x[s * kIn + i] / kGain;
      if (score > best_score) {
        best_score = score;
        best = c;
      }
    }
    d.y[s] = best;
  }
  return d;
}

inline const Data& train_data() {
  static const Data d = make_data(kTrain, 1);
  return d;
}
inline const Data& test_data() {
  static const Data d = make_data(kTest, 2);
  return d;
}

// The initial weights every run starts from, as halves (so the fp32 run
// starts from the same values).
struct Init {
  std::vector<half> w0, b0, w1, b1;
};
inline const Init& init() {
  static const Init i = [] {
    Init r;
    nn::Linear<half> l0(kIn, kHidden, nn::Activation::relu, true, Device::cpu(), 21);
    nn::Linear<half> l1(kHidden, kClasses, nn::Activation::none, true, Device::cpu(), 22);
    for (std::int64_t k = 0; k < l0.weight().numel(); ++k) {
      r.w0.push_back(from_float<half>(to_float(l0.weight().at(k)) / kGain));
    }
    r.b0.assign(l0.bias().data(), l0.bias().data() + l0.bias().numel());
    r.w1.assign(l1.weight().data(), l1.weight().data() + l1.weight().numel());
    r.b1.assign(l1.bias().data(), l1.bias().data() + l1.bias().numel());
    return r;
  }();
  return i;
}

// The optimizer of the runs: AdamW, lr 3e-3, no weight decay, layer 0 in a
// group of its own with its lr times `layer0_factor`. Adam's step is about
// lr whatever the gradient's size: layer 0's weights are 1/kGain of the
// usual (the default), so is its lr. `ps`: the two Linear layers'
// parameters.
inline std::unique_ptr<optim::AdamW> make_optimizer(const std::vector<optim::Param>& ps,
                                                    double layer0_factor = 1.0 / kGain) {
  optim::AdamWOptions o;
  o.lr = 3e-3;
  o.weight_decay = 0;
  optim::AdamWOptions o0 = o;
  o0.lr = o.lr * layer0_factor;
  auto opt = std::make_unique<optim::AdamW>(std::vector<optim::Param>{ps[0]}, o0);
  opt->add_param_group({ps[1], ps[2], ps[3]}, o);
  return opt;
}

}  // namespace mixprec::fallback_problem

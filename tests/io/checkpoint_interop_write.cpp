// SPDX-License-Identifier: Apache-2.0
// Trains a small fp16 model (AdamW, amsgrad, a dynamic GradScaler) for 12
// steps on the host and saves a checkpoint, for the Python check in
// tests/io/safetensors_interop.py (check-checkpoint):
//   checkpoint_interop_write OUT.safetensors
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "mixprec/io/checkpoint.hpp"
#include "mixprec/mixprec.hpp"

int main(int argc, char** argv) {
  using namespace mixprec;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT.safetensors\n", argv[0]);
    return 2;
  }
  try {
    const std::vector<std::vector<std::int64_t>> shapes = {{16, 8}, {16}, {4, 16}, {4}};
    const char* names[] = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"};
    std::vector<Tensor<half>> w, g;
    std::vector<optim::Param> params;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      w.emplace_back(Shape(shapes[i]));
      fill_normal(w.back(), 0, 0.3f, i + 1);
      g.emplace_back(Shape(shapes[i]));
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) params.push_back({names[i], TensorRef(w[i]), TensorRef(g[i])});
    optim::AdamWOptions o;
    o.lr = 1e-2;
    o.amsgrad = true;
    optim::AdamW opt(params, o);
    amp::GradScaler scaler;
    std::mt19937_64 rng(5);
    std::normal_distribution<float> normal(0.0f, 1e-3f);
    for (int s = 1; s <= 12; ++s) {
      for (std::size_t i = 0; i < g.size(); ++i) {
        for (std::int64_t k = 0; k < g[i].numel(); ++k) g[i].data()[k] = half(normal(rng) * scaler.scale());
      }
      if (s == 4) g[2].data()[1] = half(std::numeric_limits<float>::infinity());  // one skipped step
      scaler.step(opt);
      scaler.update();
    }
    io::CheckpointExtras extras;
    extras.rng = &rng;
    extras.metadata["epoch"] = "3";
    io::save_checkpoint(argv[1], opt, scaler, extras);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint_interop_write: %s\n", e.what());
    return 1;
  }
  return 0;
}

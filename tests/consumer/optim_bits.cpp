// SPDX-License-Identifier: Apache-2.0
// Prints one line: a hash of the bits every optimizer leaves after 30 steps
// (fp16 and bf16 weights, clipping, a cosine schedule, the 8-float loops and
// their tails), so two builds of it under different flags can be compared.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "mixprec/mixprec.hpp"

namespace {

std::uint64_t hash = 1469598103934665603ull;
void mix(const void* p, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) hash = (hash ^ b[i]) * 1099511628211ull;
}

template <class Opt, class T>
void run(typename Opt::Options options, std::uint64_t seed) {
  using namespace mixprec;
  Tensor<T> w({1027}), g({1027}), b({13}), gb({13});
  fill_normal(w, 0.0f, 1.0f, seed);
  fill_normal(b, 0.0f, 0.1f, seed + 1);
  Opt opt({{"w", w, g}, {"b", b, gb}}, options);
  opt.set_schedule(optim::LRSchedule::cosine(40, 0.1));
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(dtype_traits<T>::dtype));
  for (int step = 0; step < 30; ++step) {
    fill_normal(g, 0.0f, 1.0f, seed + 100 + step);
    fill_normal(gb, 0.0f, 1.0f, seed + 200 + step);
    scaler.unscale(opt);
    const float norm = scaler.clip_grad_norm(opt, 5.0);
    mix(&norm, sizeof norm);
    scaler.step(opt);
    scaler.update();
  }
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const Tensor<float>& m = opt.master(i);
    mix(m.data(), m.numel() * sizeof(float));
  }
  mix(w.data(), w.numel() * sizeof(T));
  mix(b.data(), b.numel() * sizeof(T));
}

}  // namespace

int main() {
  using namespace mixprec;
  for (int pass = 0; pass < 2; ++pass) {
    const std::uint64_t s = 7 + pass;
    optim::SGDOptions sgd;
    sgd.lr = 0.05;
    sgd.momentum = 0.9;
    sgd.weight_decay = 1e-2;
    sgd.nesterov = true;
    optim::AdamOptions adam;
    adam.weight_decay = 1e-2;
    optim::AdamWOptions adamw;
    adamw.amsgrad = true;
    optim::RMSpropOptions rms;
    rms.centered = true;
    rms.momentum = 0.5;
    rms.weight_decay = 1e-3;
    optim::LionOptions lion;
    lion.weight_decay = 0.1;
    if (pass == 0) {
      run<optim::SGD, half>(sgd, s);
      run<optim::Adam, half>(adam, s);
      run<optim::AdamW, half>(adamw, s);
      run<optim::RMSprop, half>(rms, s);
      run<optim::Lion, half>(lion, s);
    } else {
      run<optim::SGD, bfloat16>(sgd, s);
      run<optim::Adam, bfloat16>(adam, s);
      run<optim::AdamW, bfloat16>(adamw, s);
      run<optim::RMSprop, bfloat16>(rms, s);
      run<optim::Lion, bfloat16>(lion, s);
    }
  }
#if !MIXPREC_FP_BARRIER && !defined(__FMA__)
  std::printf("no FMA ");
#endif
  std::printf("%016llx\n", static_cast<unsigned long long>(hash));
  return 0;
}

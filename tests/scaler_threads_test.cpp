// SPDX-License-Identifier: Apache-2.0
// One GradScaler shared by threads (issue 15, item 3): threads that each
// step their own optimizer give the bits of the same steps taken one after
// another, and a second thread stepping the same optimizer is refused, never
// applied twice. scripts/test.sh also builds this under ThreadSanitizer,
// which reported the race on the scaler's records before they were locked.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

struct Model {
  Tensor<half> w{Shape{512}}, g{Shape{512}};
  std::unique_ptr<optim::AdamW> opt;
  explicit Model(std::uint64_t seed) {
    fill_normal(w, 0, 1, seed);
    opt = std::make_unique<optim::AdamW>(std::vector<optim::Param>{{"w", w, g}});
  }
  // Iteration s's gradients; every 7th iteration one model overflows.
  void gradients(std::uint64_t seed, int s) {
    fill_normal(g, 0, 1000, seed * 1000 + static_cast<std::uint64_t>(s));
    if (seed == 2 && s % 7 == 3) g.at(5) = from_float<half>(INFINITY);
  }
  std::vector<float> master() const {
    const Tensor<float>& m = opt->master(0);
    return std::vector<float>(m.data(), m.data() + m.numel());
  }
};

TEST(ScalerThreads, TwoThreadsTwoOptimizersOneScalerMatchSequential) {
  constexpr int kIterations = 300;
  Model a(1), b(2), sa(1), sb(2);
  amp::GradScalerOptions so;
  so.growth_interval = 5;  // the scale moves both ways during the run
  amp::GradScaler shared(so), sequential(so);
  std::vector<int> applied_threads, applied_seq;
  for (int s = 0; s < kIterations; ++s) {
    a.gradients(1, s);
    b.gradients(2, s);
    sa.gradients(1, s);
    sb.gradients(2, s);
    std::atomic<int> applied{0};
    std::thread ta([&] { applied += shared.step(*a.opt, 1.0) ? 1 : 0; });
    std::thread tb([&] { applied += shared.step(*b.opt) ? 1 : 0; });
    ta.join();
    tb.join();
    shared.update();
    applied_threads.push_back(applied.load());
    int n = sequential.step(*sa.opt, 1.0) ? 1 : 0;
    n += sequential.step(*sb.opt) ? 1 : 0;
    sequential.update();
    applied_seq.push_back(n);
    ASSERT_EQ(shared.scale(), sequential.scale()) << "iteration " << s;
  }
  EXPECT_EQ(applied_threads, applied_seq);
  EXPECT_EQ(a.master(), sa.master());
  EXPECT_EQ(b.master(), sb.master());
  EXPECT_EQ(std::memcmp(a.w.data(), sa.w.data(), a.w.bytes()), 0);
  EXPECT_EQ(shared.applied_steps(), sequential.applied_steps());
  EXPECT_EQ(shared.skipped_steps(), sequential.skipped_steps());
  EXPECT_GT(shared.skipped_steps(), 30);  // the injected overflows happened
}

TEST(ScalerThreads, OneOptimizerSteppedFromTwoThreadsIsAppliedOnce) {
  Model m(3);
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  int refused = 0;
  for (int s = 0; s < 200; ++s) {
    m.gradients(3, s);
    std::atomic<int> applied{0}, errors{0};
    auto body = [&] {
      try {
        applied += scaler.step(*m.opt) ? 1 : 0;
      } catch (const Error& e) {
        const std::string what = e.what();
        // Either the other thread is still in step(), or it has finished.
        const bool known = what.find("another thread") != std::string::npos ||
                           what.find("already called") != std::string::npos;
        EXPECT_TRUE(known) << what;
        errors += 1;
      }
    };
    std::thread t1(body), t2(body);
    t1.join();
    t2.join();
    ASSERT_EQ(applied.load(), 1) << "iteration " << s;
    ASSERT_EQ(errors.load(), 1) << "iteration " << s;
    refused += errors.load();
    scaler.update();
    ASSERT_EQ(m.opt->step_count(0), s + 1);
  }
  EXPECT_EQ(refused, 200);
}

}  // namespace
}  // namespace mixprec

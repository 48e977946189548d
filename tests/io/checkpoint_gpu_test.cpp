// SPDX-License-Identifier: Apache-2.0
// Checkpoints on the GPU: 100 steps straight equal 50 + save + load + 50 in
// every bit (masters, moments, fp16 weights, step counts, the device
// scaler's state and counters) for every optimizer kind; and a checkpoint
// moves between the device and the host.
#include <gtest/gtest.h>

#include <string>

#include "gpu_skip.hpp"
#include "resume.hpp"

namespace mixprec {
namespace {

using test::OptKind;

using test::checkpoint_path;

TEST(CheckpointGpu, ResumeIsBitExact) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (OptKind kind : {OptKind::adamw_amsgrad, OptKind::sgd_nesterov, OptKind::rmsprop_centered}) {
    for (int split : {40, 51}) {
      test::check_resume(kind, Device::cuda(0), split, 100, checkpoint_path("gpu_resume"),
                         static_cast<amp::DeviceGradScaler*>(nullptr));
    }
  }
}

// Saved from the device, loaded on the host (and back): the state is the
// same bits wherever it lives.
TEST(CheckpointGpu, MovesBetweenDeviceAndHost) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const Device gpu = Device::cuda(0);
  auto dm = test::make_model(gpu, 1);
  auto dopt = test::make_optimizer(OptKind::adamw_amsgrad, *dm);
  amp::DeviceGradScaler dscaler(test::scaler_options(), gpu);
  std::mt19937_64 rng(1);
  test::train(*dm, *dopt, dscaler, rng, 1, 20, gpu);
  const std::string path = checkpoint_path("gpu_move");
  io::save_checkpoint(path, *dopt, dscaler);
  const test::Bits device_bits = test::bits(*dm, *dopt, dscaler);

  auto hm = test::make_model(Device::cpu(), 2);
  auto hopt = test::make_optimizer(OptKind::adamw_amsgrad, *hm);
  amp::GradScaler hscaler(test::scaler_options());
  io::load_checkpoint(path, *hopt, hscaler);
  test::expect_same_bits(test::bits(*hm, *hopt, hscaler), device_bits);

  io::save_checkpoint(path, *hopt, hscaler);
  auto dm2 = test::make_model(gpu, 3);
  auto dopt2 = test::make_optimizer(OptKind::adamw_amsgrad, *dm2);
  amp::DeviceGradScaler dscaler2(test::scaler_options(), gpu);
  io::load_checkpoint(path, *dopt2, dscaler2);
  test::expect_same_bits(test::bits(*dm2, *dopt2, dscaler2), device_bits);
}

// A device SGD makes its momentum buffers before the first step (zeros,
// step 0); saved then and loaded on the host, the first step must still
// start the buffer from the gradient (visible with dampening != 0).
TEST(CheckpointGpu, SgdMomentumSavedBeforeTheFirstStepStartsFromTheGradient) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto make_sgd = [](test::Model& m) {
    optim::SGDOptions o;
    o.lr = 0.05;
    o.momentum = 0.9;
    o.dampening = 0.5;
    return std::make_unique<optim::SGD>(m.params, o);
  };
  const Device cpu = Device::cpu(), gpu = Device::cuda(0);
  auto straight = test::make_model(cpu, 1);
  auto straight_opt = make_sgd(*straight);
  amp::GradScaler straight_scaler(test::scaler_options());
  std::mt19937_64 rng(3);
  test::train(*straight, *straight_opt, straight_scaler, rng, 1, 5, cpu);

  auto dm = test::make_model(gpu, 1);
  auto dopt = make_sgd(*dm);
  // (the device optimizer made its buffers when it was built: zeros, step 0)
  amp::DeviceGradScaler dscaler(test::scaler_options(), gpu);
  const std::string path = checkpoint_path("gpu_sgd_step0");
  io::save_checkpoint(path, *dopt, dscaler);
  ASSERT_TRUE(dopt->save_state().params[0].state[0].has_value());

  auto hm = test::make_model(cpu, 2);
  auto hopt = make_sgd(*hm);
  amp::GradScaler hscaler(test::scaler_options());
  io::load_checkpoint(path, *hopt, hscaler);
  rng.seed(3);
  test::train(*hm, *hopt, hscaler, rng, 1, 5, cpu);
  test::expect_same_bits(test::bits(*hm, *hopt, hscaler), test::bits(*straight, *straight_opt, straight_scaler));
}

}  // namespace
}  // namespace mixprec

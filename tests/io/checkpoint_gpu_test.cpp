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

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "mixprec_checkpoint_gpu_" + name + ".safetensors";
}

TEST(CheckpointGpu, ResumeIsBitExact) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (OptKind kind : {OptKind::adamw_amsgrad, OptKind::sgd_nesterov, OptKind::rmsprop_centered}) {
    for (int split : {40, 51}) {
      test::check_resume(kind, Device::cuda(0), split, 100, temp_path("resume"), static_cast<amp::DeviceGradScaler*>(nullptr));
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
  const std::string path = temp_path("move");
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

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// Checkpoints on the host: bit-exact resume for every optimizer kind, loads
// that fail change nothing, weights from a plain safetensors file.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "resume.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::OptKind;

using test::checkpoint_path;

TEST(Checkpoint, ResumeIsBitExact) {
  for (OptKind kind : {OptKind::adamw_amsgrad, OptKind::sgd_nesterov, OptKind::rmsprop_centered}) {
    for (int split : {40, 51}) {
      test::check_resume(kind, Device::cpu(), split, 100, checkpoint_path("resume"),
                         static_cast<amp::GradScaler*>(nullptr));
    }
  }
}

// A checkpoint saved before the first step has no momentum buffers; loading
// it drops the buffers the target made since, and SGD starts its momentum
// from the first gradient again, as a fresh run does.
TEST(Checkpoint, StateNotMadeYetIsDroppedOnLoad) {
  const Device cpu = Device::cpu();
  auto fresh = test::make_model(cpu, 1);
  auto fresh_opt = test::make_optimizer(OptKind::sgd_nesterov, *fresh);
  amp::GradScaler fresh_scaler(test::scaler_options());
  const std::string path = checkpoint_path("step0");
  io::save_checkpoint(path, *fresh_opt, fresh_scaler);
  std::mt19937_64 rng(3);
  test::train(*fresh, *fresh_opt, fresh_scaler, rng, 1, 10, cpu);

  auto other = test::make_model(cpu, 2);
  auto opt = test::make_optimizer(OptKind::sgd_nesterov, *other);
  amp::GradScaler scaler(test::scaler_options());
  std::mt19937_64 other_rng(9);
  test::train(*other, *opt, scaler, other_rng, 1, 5, cpu);
  ASSERT_TRUE(opt->save_state().params[0].state[0].has_value());
  io::load_checkpoint(path, *opt, scaler);
  EXPECT_FALSE(opt->save_state().params[0].state[0].has_value());
  // The weights are the checkpoint's too (seed 1), not model 2's.
  rng.seed(3);
  test::train(*other, *opt, scaler, rng, 1, 10, cpu);
  test::expect_same_bits(test::bits(*other, *opt, scaler), test::bits(*fresh, *fresh_opt, fresh_scaler));
}

TEST(Checkpoint, FileHoldsNamedTensorsAndMetadata) {
  auto m = test::make_model(Device::cpu(), 1);
  auto opt = test::make_optimizer(OptKind::adamw_amsgrad, *m);
  amp::GradScaler scaler(test::scaler_options());
  std::mt19937_64 rng(1);
  test::train(*m, *opt, scaler, rng, 1, 3, Device::cpu());
  const std::string path = checkpoint_path("names");
  io::CheckpointExtras extras;
  extras.metadata["epoch"] = "4";
  io::save_checkpoint(path, *opt, scaler, extras);
  const io::SafetensorsFile f = io::SafetensorsFile::read(path);
  EXPECT_EQ(f.metadata().at("format"), "mixprec-checkpoint");
  EXPECT_EQ(f.metadata().at("optimizer"), "AdamW");
  EXPECT_EQ(f.metadata().at("user.epoch"), "4");
  // Model weights under their own names (what torch's load_state_dict wants).
  const io::TensorInfo& w = f.at("layer2.weight");
  EXPECT_EQ(w.dtype, io::StDType::F16);
  EXPECT_EQ(w.shape, std::vector<std::int64_t>{4099});
  EXPECT_EQ(std::memcmp(f.data(w), m->w[2].data(), 4099 * 2), 0);
  for (const char* s : {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"}) {
    const io::TensorInfo& t = f.at(std::string("mixprec/") + s + "/layer0.weight");
    EXPECT_EQ(t.dtype, io::StDType::F32) << s;
  }
  EXPECT_EQ(std::memcmp(f.data(f.at("mixprec/master/layer0.weight")), opt->master(0).data(), 1000 * 4), 0);
  const io::TensorInfo& steps = f.at("mixprec/step");
  EXPECT_EQ(steps.dtype, io::StDType::I64);
  std::int64_t step0 = 0;
  std::memcpy(&step0, f.data(steps), 8);
  EXPECT_EQ(step0, opt->step_count(0));
  float scale = 0;
  std::memcpy(&scale, f.data(f.at("mixprec/scaler/scale")), 4);
  EXPECT_EQ(scale, scaler.scale());
}

// Every refused load leaves the optimizer, scaler and weights as they were.
TEST(Checkpoint, RefusedLoadsChangeNothing) {
  const Device cpu = Device::cpu();
  auto src = test::make_model(cpu, 1);
  auto src_opt = test::make_optimizer(OptKind::adamw_amsgrad, *src);
  amp::GradScaler src_scaler(test::scaler_options());
  std::mt19937_64 rng(1);
  test::train(*src, *src_opt, src_scaler, rng, 1, 4, cpu);
  const std::string path = checkpoint_path("refused");
  io::save_checkpoint(path, *src_opt, src_scaler);

  auto check_refused = [&](auto&& make_target, std::initializer_list<const char*> words, const std::string& file) {
    auto target = test::make_model(cpu, 5);
    std::unique_ptr<optim::Optimizer> opt;
    std::unique_ptr<amp::GradScaler> scaler;
    make_target(*target, opt, scaler);
    std::mt19937_64 r(2);
    test::train(*target, *opt, *scaler, r, 1, 2, cpu);
    const test::Bits before = test::bits(*target, *opt, *scaler);
    test::expect_error([&] { io::load_checkpoint(file, *opt, *scaler); }, words);
    test::expect_same_bits(test::bits(*target, *opt, *scaler), before);
  };
  auto adamw = [](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    o = test::make_optimizer(OptKind::adamw_amsgrad, m);
    s = std::make_unique<amp::GradScaler>(test::scaler_options());
  };
  check_refused([](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    o = test::make_optimizer(OptKind::sgd_nesterov, m);
    s = std::make_unique<amp::GradScaler>(test::scaler_options());
  }, {"AdamW", "SGD"}, path);
  check_refused([](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    m.params[1].name = "renamed";
    o = test::make_optimizer(OptKind::adamw_amsgrad, m);
    s = std::make_unique<amp::GradScaler>(test::scaler_options());
  }, {"\"renamed\""}, path);
  check_refused([](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    o = test::make_optimizer(OptKind::adamw_amsgrad, m);
    o->set_schedule(optim::LRSchedule::constant());
    s = std::make_unique<amp::GradScaler>(test::scaler_options());
  }, {"schedule", "cosine", "constant"}, path);
  check_refused([](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    o = test::make_optimizer(OptKind::adamw_amsgrad, m);
    amp::GradScalerOptions so;
    so.mode = amp::ScalingMode::disabled;
    s = std::make_unique<amp::GradScaler>(so);
  }, {"dynamic", "disabled"}, path);
  check_refused([](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    o = test::make_optimizer(OptKind::adamw_amsgrad, m);
    amp::GradScalerOptions so = test::scaler_options();
    so.max_scale = 8;  // the saved scale is above it
    so.init_scale = 8;
    s = std::make_unique<amp::GradScaler>(so);
  }, {"scale", "max_scale"}, path);
  // A model of another shape: Model's sizes differ.
  check_refused([](test::Model& m, std::unique_ptr<optim::Optimizer>& o, std::unique_ptr<amp::GradScaler>& s) {
    m.sizes[0] = 999;
    m.w[0] = Tensor<half>(Shape{999});
    m.g[0] = Tensor<half>(Shape{999});
    m.params[0].weight = TensorRef(m.w[0]);
    m.params[0].grad = TensorRef(m.g[0]);
    o = test::make_optimizer(OptKind::adamw_amsgrad, m);
    s = std::make_unique<amp::GradScaler>(test::scaler_options());
  }, {"layer0.weight", "[1000]", "[999]"}, path);
  // A truncated file and a missing one.
  {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string cut = checkpoint_path("truncated");
    std::ofstream out(cut, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() - 100));
    out.close();
    check_refused(adamw, {"truncated"}, cut);
  }
  check_refused(adamw, {"does_not_exist"}, checkpoint_path("does_not_exist"));
  // A file of model weights only is no checkpoint.
  {
    io::SafetensorsWriter w;
    std::vector<half> zeros(1000);
    w.add("layer0.weight", io::StDType::F16, {1000}, zeros.data(), zeros.size() * 2);
    const std::string plain = checkpoint_path("plain");
    w.write(plain);
    check_refused(adamw, {"__metadata__", "not a mixprec checkpoint"}, plain);
  }
  // Files that pass the early checks and fail late ones (values the
  // optimizer or scaler refuse, a tensor too many): rewritten from the saved
  // one with one thing changed.
  auto rewrite = [&](const std::string& name, auto&& change) {
    const io::SafetensorsFile f = io::SafetensorsFile::read(path);
    std::vector<std::vector<std::uint8_t>> bytes;
    bytes.reserve(f.tensors().size() + 1);
    io::SafetensorsWriter w;
    for (const io::TensorInfo& t : f.tensors()) {
      bytes.emplace_back(f.data(t), f.data(t) + t.nbytes());
      change(t.name, bytes.back());
      w.add(t.name, t.dtype, t.shape, bytes.back().data(), bytes.back().size());
    }
    std::map<std::string, std::string> meta = f.metadata();
    for (const auto& kv : meta) w.set_metadata(kv.first, kv.second);
    if (name == "extra") {
      bytes.emplace_back(8, 0);
      w.add("mixprec/unknown", io::StDType::F64, {1}, bytes.back().data(), 8);
    }
    const std::string out = checkpoint_path("late_" + name);
    w.write(out);
    return out;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  check_refused(adamw, {"lrs[1]", "nan"}, rewrite("lr", [&](const std::string& n, std::vector<std::uint8_t>& b) {
    if (n == "mixprec/lr") std::memcpy(b.data() + 8, &nan, 8);
  }));
  check_refused(adamw, {"hysteresis_tracker = 2", "hysteresis = 2"},
                rewrite("trackers", [&](const std::string& n, std::vector<std::uint8_t>& b) {
                  const std::int32_t two = 2;
                  if (n == "mixprec/scaler/trackers") std::memcpy(b.data() + 4, &two, 4);
                }));
  check_refused(adamw, {"\"layer1.weight\"", "step = -1"}, rewrite("step", [&](const std::string& n, std::vector<std::uint8_t>& b) {
    const std::int64_t minus = -1;
    if (n == "mixprec/step") std::memcpy(b.data() + 8, &minus, 8);
  }));
  check_refused(adamw, {"\"mixprec/unknown\""}, rewrite("extra", [](const std::string&, std::vector<std::uint8_t>&) {}));
  // extras is untouched by a refused load too; the RNG it asks for must be there.
  {
    auto target = test::make_model(cpu, 5);
    auto opt = test::make_optimizer(OptKind::adamw_amsgrad, *target);
    amp::GradScaler scaler(test::scaler_options());
    std::mt19937_64 r(11);
    const std::mt19937_64 r0 = r;
    io::CheckpointExtras extras;
    extras.rng = &r;
    extras.metadata["kept"] = "yes";
    const test::Bits before = test::bits(*target, *opt, scaler);
    test::expect_error([&] { io::load_checkpoint(path, *opt, scaler, &extras); }, {"extras->rng", "no RNG state"});
    test::expect_same_bits(test::bits(*target, *opt, scaler), before);
    EXPECT_TRUE(r == r0);
    EXPECT_EQ(extras.metadata.size(), 1u);
    EXPECT_EQ(extras.metadata.at("kept"), "yes");
  }
}

TEST(Checkpoint, SaveRefusesAnIterationUnderWay) {
  auto m = test::make_model(Device::cpu(), 1);
  auto opt = test::make_optimizer(OptKind::sgd_nesterov, *m);
  amp::GradScaler scaler(test::scaler_options());
  std::mt19937_64 rng(1);
  test::upload_gradients(*m, 1, scaler.scale(), rng, Device::cpu());
  scaler.step(*opt);
  test::expect_error([&] { io::save_checkpoint(checkpoint_path("midway"), *opt, scaler); }, {"update()"});
  scaler.update();
  io::save_checkpoint(checkpoint_path("midway"), *opt, scaler);
}

TEST(Checkpoint, SaveRefusesReservedNames) {
  auto m = test::make_model(Device::cpu(), 1);
  m->params[0].name = "mixprec/master/x";
  auto opt = test::make_optimizer(OptKind::sgd_nesterov, *m);
  amp::GradScaler scaler;
  test::expect_error([&] { io::save_checkpoint(checkpoint_path("reserved"), *opt, scaler); },
                     {"mixprec/master/x", "reserved"});
}

// Weights saved by another program (torch.save_file of a state dict): F32,
// F64, BF16 and F16 tensors; masters take the value, weights its rounding.
TEST(Checkpoint, LoadWeightsFromAPlainFile) {
  auto m = test::make_model(Device::cpu(), 1);
  auto opt = test::make_optimizer(OptKind::adamw_amsgrad, *m);
  std::vector<float> f32(1000);
  for (std::size_t k = 0; k < f32.size(); ++k) f32[k] = std::ldexp(1.0f + k / 1024.0f, static_cast<int>(k % 7) - 3) * (k % 2 ? -1 : 1);
  std::vector<double> f64(37);
  for (std::size_t k = 0; k < f64.size(); ++k) f64[k] = 0.1 * static_cast<double>(k) + 1e-12;
  std::vector<bfloat16> b16(4099);
  for (std::size_t k = 0; k < b16.size(); ++k) b16[k] = bfloat16(static_cast<float>(k) * 0.25f);
  std::vector<half> h16(1, half(-2.5f));
  io::SafetensorsWriter w;
  w.add("model.layer0.weight", io::StDType::F32, {1000}, f32.data(), f32.size() * 4);
  w.add("model.layer1.weight", io::StDType::F64, {37}, f64.data(), f64.size() * 8);
  w.add("model.layer2.weight", io::StDType::BF16, {4099}, b16.data(), b16.size() * 2);
  w.add("model.layer3.weight", io::StDType::F16, {1}, h16.data(), 2);
  const std::string path = checkpoint_path("weights");
  w.write(path);
  io::load_weights(path, *opt, "model.");
  for (std::size_t k = 0; k < f32.size(); ++k) {
    ASSERT_EQ(opt->master(0).data()[k], f32[k]) << k;
    ASSERT_EQ(to_bits(m->w[0].data()[k]), to_bits(half(f32[k]))) << k;
  }
  for (std::size_t k = 0; k < f64.size(); ++k) ASSERT_EQ(opt->master(1).data()[k], static_cast<float>(f64[k])) << k;
  for (std::size_t k = 0; k < b16.size(); ++k) ASSERT_EQ(opt->master(2).data()[k], static_cast<float>(b16[k])) << k;
  EXPECT_EQ(opt->master(3).data()[0], -2.5f);
  EXPECT_EQ(opt->step_count(0), 0);

  // Shape and name mismatches name the tensor; nothing changes.
  const std::vector<float> before(opt->master(0).data(), opt->master(0).data() + 1000);
  test::expect_error([&] { io::load_weights(path, *opt); }, {"no tensor", "layer0.weight"});
  for (float& x : f32) x = -x;  // other values than the masters hold: a wrongly applied load shows
  w.add("model.extra", io::StDType::F32, {1}, f32.data(), 4);
  const std::string extra = checkpoint_path("weights_extra");
  w.write(extra);
  test::expect_error([&] { io::load_weights(extra, *opt, "model."); }, {"\"model.extra\"", "allow_unused"});
  EXPECT_EQ(std::vector<float>(opt->master(0).data(), opt->master(0).data() + 1000), before);
  io::load_weights(extra, *opt, "model.", /*allow_unused=*/true);
  EXPECT_EQ(std::vector<float>(opt->master(0).data(), opt->master(0).data() + 1000), f32);
  std::vector<float> wrong(999);
  io::SafetensorsWriter bad;
  bad.add("layer0.weight", io::StDType::F32, {999}, wrong.data(), wrong.size() * 4);
  const std::string bad_path = checkpoint_path("weights_bad");
  bad.write(bad_path);
  test::expect_error([&] { io::load_weights(bad_path, *opt, "", true); }, {"layer0.weight", "[999]", "[1000]"});
  EXPECT_EQ(std::vector<float>(opt->master(0).data(), opt->master(0).data() + 1000), f32);
}

}  // namespace
}  // namespace mixprec

// SPDX-License-Identifier: Apache-2.0
// The example CNN (examples/fashion_mnist_cnn.cpp) trained by mixprec with
// Adam and dynamic loss scaling on seeded synthetic images, writing what
// tests/oracle/cnn_torch.py needs to train the same network with PyTorch
// (Adam + GradScaler, autocast fp16) and compare weights and gradients
// (issue 15). The comparison, its tolerances and why are in that script.
//
//   cnn_torch_gpu_test DIR [--device cuda|cpu] [--precision fp16|fp32] [--iterations N]
//                      [--batch N] [--batches N] [--lr X] [--init-scale X] [--backoff-factor X]
//                      [--growth-interval N] [--record K,K,...]
//
// Defaults: cuda, fp16, 100 iterations of batch 256 (the example's batch)
// cycling through 10 distinct batches (2560 images, so 10 epochs), Adam lr
// 1e-4 (why not the example's 2e-3: cnn_torch.py's header), a GradScaler
// with init_scale 2^24, backoff_factor 2^-9, growth_interval 40 (a skipped
// step at iteration 1, the scale doubled after iterations 41 and 81: see
// Config), iterations 1, 2, 5, 10, 25, 50, 75, 100 recorded, and every
// skipped one.
// --device cpu runs mixprec's CPU layers (direct-loop convolutions: slow,
// use a small --batch and --iterations) for checking the plumbing of the
// comparison without a GPU.
//
// Without a usable CUDA device (--device cuda) it prints "no CUDA device:
// <why>" and exits 0 having written nothing: the test is skipped.
//
// Files in DIR (made if missing; any *.safetensors there is removed first):
//   init.safetensors      metadata "config" (JSON: every setting above, the
//                         optimizer's and scaler's options, parameter names
//                         in order); the initial model weights "weight.<name>"
//                         (T; the masters are these widened); the data "x"
//                         [batches, batch, 1, 28, 28] (T) and "labels"
//                         [batches, batch] (I32). Iteration k uses batch
//                         (k - 1) % batches.
//   iter_KKKK.safetensors for a recorded or skipped iteration K (1-based):
//                         "scale" (F32 scalar, the loss scale this iteration
//                         used), "loss" (F32), "found_inf" (I32);
//                         "grad.<name>" (T, as the backward wrote it: scaled
//                         by "scale"); "before.*" the state the iteration
//                         started from, "after.*" the state after its
//                         scaler.step + update: "weight.<name>" (T, the model
//                         weight), "master.<name>", "exp_avg.<name>",
//                         "exp_avg_sq.<name>" (F32), "step" (I64 [params],
//                         applied steps per parameter).
//   trajectory.safetensors "loss", "scale" (the scale used), "found_inf" per
//                         iteration [iterations]; "recorded" (I32, the K of
//                         every iter_KKKK file); "final_scale" (F32) after
//                         the last update.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/io/safetensors.hpp"
#include "mixprec/mixprec.hpp"

namespace {

using namespace mixprec;

constexpr std::int64_t kClasses = 10, kSide = 28, kPixels = kSide * kSide;

struct Config {
  std::string dir, device = "cuda", precision = "fp16";
  int iterations = 100;
  std::int64_t batch = 256, batches = 10;
  std::uint64_t seed = 0;  // model seeds 4 * seed + 1..4 as in the example; data seeds below
  optim::AdamOptions adam;
  amp::GradScalerOptions scaler;
  std::vector<int> record = {1, 2, 5, 10, 25, 50, 75, 100};

  Config() {
    adam.lr = 1e-4;
    // Iteration 1 overflows fp16 at 2^24 (the weight gradients reach
    // ~0.03 * 2^24): a skipped step and a backoff while both trainings
    // still hold the initial weights, so the decision cannot differ; then
    // 2^15, doubled after iterations 41 and 81 to 2^17, a factor > 2 below
    // any overflow (the largest gradients stay under ~0.2). A scale that
    // met an overflow late in the run would make the skip decision depend
    // on how far the two trajectories have drifted apart by then
    // (cnn_torch.py's header).
    scaler.init_scale = 16777216.0;         // 2^24
    scaler.backoff_factor = 0.001953125;    // 2^-9
    scaler.growth_interval = 40;
  }
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "cnn_torch_gpu_test: %s\nusage: cnn_torch_gpu_test DIR [--device cuda|cpu] [--precision fp16|fp32] "
               "[--iterations N] [--batch N] [--batches N] [--lr X] [--init-scale X] [--backoff-factor X] "
               "[--growth-interval N] [--record K,K,...]\n",
               why.c_str());
  std::exit(2);
}

long long whole(const std::string& flag, const std::string& v, long long low, long long high) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != '\0' || x < low || x > high) {
    usage(flag + " = " + v + ", must be a whole number in [" + std::to_string(low) + ", " + std::to_string(high) +
          "]");
  }
  return x;
}

double real(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (end == v.c_str() || *end != '\0' || !std::isfinite(x) || x < 0) usage(flag + " = " + v + ", must be >= 0");
  return x;
}

Config parse(int argc, char** argv) {
  Config c;
  if (argc < 2 || argv[1][0] == '-') usage("DIR is required");
  c.dir = argv[1];
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage(flag + " needs a value");
    const std::string v = argv[i + 1];
    if (flag == "--device") {
      if (v != "cuda" && v != "cpu") usage("--device = " + v + ", must be cuda or cpu");
      c.device = v;
    } else if (flag == "--precision") {
      if (v != "fp16" && v != "fp32") usage("--precision = " + v + ", must be fp16 or fp32");
      c.precision = v;
    } else if (flag == "--iterations") {
      c.iterations = static_cast<int>(whole(flag, v, 1, 100000));
    } else if (flag == "--batch") {
      c.batch = whole(flag, v, 1, 1 << 16);
    } else if (flag == "--batches") {
      c.batches = whole(flag, v, 1, 1 << 16);
    } else if (flag == "--growth-interval") {
      c.scaler.growth_interval = whole(flag, v, 1, 1 << 30);
    } else if (flag == "--lr") {
      c.adam.lr = real(flag, v);
    } else if (flag == "--init-scale") {
      c.scaler.init_scale = real(flag, v);
    } else if (flag == "--backoff-factor") {
      c.scaler.backoff_factor = real(flag, v);
    } else if (flag == "--record") {
      c.record.clear();
      std::stringstream s(v);
      for (std::string part; std::getline(s, part, ',');) {
        c.record.push_back(static_cast<int>(whole(flag, part, 1, 100000)));
      }
    } else {
      usage("unknown flag " + flag);
    }
  }
  // Recorded iterations past the end are dropped (a short --iterations run).
  std::sort(c.record.begin(), c.record.end());
  c.record.erase(std::unique(c.record.begin(), c.record.end()), c.record.end());
  c.record.erase(std::remove_if(c.record.begin(), c.record.end(), [&](int k) { return k > c.iterations; }),
                 c.record.end());
  return c;
}

// Named tensors for one file. The writer keeps pointers until write(), so
// the bytes live here (a deque: adding never moves the earlier ones).
class Out {
 public:
  template <class E>
  void add(const std::string& name, std::vector<std::int64_t> shape, const std::vector<E>& values) {
    std::vector<unsigned char>& bytes = store_.emplace_back(values.size() * sizeof(E));
    if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
    writer_.add(name, io::st_dtype_of<E>::value, std::move(shape), bytes.data(), bytes.size());
  }
  template <class E>
  void scalar(const std::string& name, E value) {
    add<E>(name, {}, std::vector<E>{value});
  }
  void metadata(const std::string& key, const std::string& value) { writer_.set_metadata(key, value); }
  void write(const std::string& path) const { writer_.write(path); }

 private:
  std::deque<std::vector<unsigned char>> store_;
  io::SafetensorsWriter writer_;
};

// A host copy of a view on any device (synchronises the default stream).
template <class E>
std::vector<E> to_host(TensorView<const E> v) {
  std::vector<E> out(static_cast<std::size_t>(v.numel()));
  mixprec::detail::copy_raw(out.data(), Device::cpu(), v.data(), v.device(), out.size() * sizeof(E));
  return out;
}

std::vector<std::int64_t> dims(const Shape& s) {
  std::vector<std::int64_t> d;
  for (std::size_t i = 0; i < s.rank(); ++i) d.push_back(s[i]);
  return d;
}

// The example's model (examples/fashion_mnist_cnn.cpp, Cnn::add), seed 0,
// with each convolution's ReLU as a layer of its own: the same bits as the
// example's fused form (NnGpu.Conv2dFusedReluIsTheLayerPair), and the
// parameter names "0.weight" ... "8.bias" that the oracle expects.
template <class T>
void add_layers(nn::Sequential<T>& net, Device dev, std::uint64_t seed) {
  const std::uint64_t s = seed * 4;
  net.template emplace<nn::Conv2d<T>>(1, 32, 3, 1, 1, true, dev, s + 1);
  net.template emplace<nn::ActivationLayer<T>>(nn::Activation::relu, dev);
  net.template emplace<nn::MaxPool2d<T>>(2, 0, dev);
  net.template emplace<nn::Conv2d<T>>(32, 64, 3, 1, 1, true, dev, s + 2);
  net.template emplace<nn::ActivationLayer<T>>(nn::Activation::relu, dev);
  net.template emplace<nn::MaxPool2d<T>>(2, 0, dev);
  net.template emplace<nn::Flatten<T>>(dev);
  net.template emplace<nn::Linear<T>>(3136, 128, nn::Activation::relu, true, dev, s + 3);
  net.template emplace<nn::Linear<T>>(128, 10, nn::Activation::none, true, dev, s + 4);
}

// Synthetic Fashion-MNIST-shaped data that can be learned: ten fixed random
// class templates, each image 0.6 * its class's template + 0.8 * noise (all
// standard normal), rounded to T; labels uniform in [0, 10). Counter-based
// draws (core/random.hpp), so the data depend only on the seed.
template <class T>
void make_data(const Config& c, std::vector<T>& x, std::vector<std::int32_t>& labels) {
  const std::uint64_t s = 1000 + 8 * c.seed;
  const std::int64_t n = c.batches * c.batch;
  std::vector<float> templates(static_cast<std::size_t>(kClasses * kPixels));
  for (std::size_t i = 0; i < templates.size(); ++i) {
    templates[i] = mixprec::detail::standard_normal(mixprec::detail::random_bits(s + 1, i));
  }
  labels.resize(static_cast<std::size_t>(n));
  x.resize(static_cast<std::size_t>(n * kPixels));
  for (std::int64_t i = 0; i < n; ++i) {
    const auto label = static_cast<std::int32_t>(mixprec::detail::random_bits(s + 2, static_cast<std::uint64_t>(i)) %
                                                 static_cast<std::uint64_t>(kClasses));
    labels[static_cast<std::size_t>(i)] = label;
    for (std::int64_t p = 0; p < kPixels; ++p) {
      const std::uint64_t at = static_cast<std::uint64_t>(i * kPixels + p);
      const float noise = mixprec::detail::standard_normal(mixprec::detail::random_bits(s + 3, at));
      x[at] = from_float<T>(0.6f * templates[static_cast<std::size_t>(label * kPixels + p)] + 0.8f * noise);
    }
  }
}

template <class T>
int run(const Config& c) {
  const bool gpu = c.device == "cuda";
  const Device dev = gpu ? Device::cuda(0) : Device::cpu();
  const Shape input{c.batch, 1, kSide, kSide};

  nn::Sequential<T> net(input, dev);
  add_layers(net, dev, c.seed);
  optim::Adam opt(net.parameters(), c.adam);
  std::optional<amp::GradScaler> host_scaler;
  std::optional<amp::DeviceGradScaler> device_scaler;
  if (gpu) {
    device_scaler.emplace(c.scaler, dev);
  } else {
    host_scaler.emplace(c.scaler);
  }
  const std::size_t params = opt.num_params();
  const std::vector<std::string> state_names = opt.state_names();  // exp_avg, exp_avg_sq, max_exp_avg_sq

  std::vector<T> xs;
  std::vector<std::int32_t> labels;
  make_data<T>(c, xs, labels);
  Tensor<T> x_all(Shape{c.batches * c.batch, 1, kSide, kSide}, dev);
  mixprec::detail::copy_raw(x_all.data(), dev, xs.data(), Device::cpu(), xs.size() * sizeof(T));
  Buffer labels_dev(gpu ? labels.size() * sizeof(std::int32_t) : 0, dev);
  if (gpu) mixprec::detail::copy_raw(labels_dev.data(), dev, labels.data(), Device::cpu(), labels_dev.bytes());
  // Device scalars: [0] the loss, [1] the bad-label flag (int).
  Buffer scalars(gpu ? 2 * sizeof(float) : 0, dev);
  if (gpu) {
    const float zeros[2] = {0, 0};
    mixprec::detail::copy_raw(scalars.data(), dev, zeros, Device::cpu(), sizeof zeros);
  }

  auto weights = [&](std::size_t i) { return to_host<T>(opt.param(i).weight.as<const T>("weight")); };

  // init.safetensors: the configuration, the initial weights and the data.
  {
    nlohmann::json cfg;
    cfg["device"] = c.device;
    cfg["precision"] = c.precision;
    cfg["iterations"] = c.iterations;
    cfg["batch"] = c.batch;
    cfg["batches"] = c.batches;
    cfg["seed"] = c.seed;
    cfg["record"] = c.record;
    cfg["optimizer"] = {{"name", opt.name()},
                        {"lr", c.adam.lr},
                        {"betas", {c.adam.betas[0], c.adam.betas[1]}},
                        {"eps", c.adam.eps},
                        {"weight_decay", c.adam.weight_decay},
                        {"amsgrad", c.adam.amsgrad}};
    cfg["scaler"] = {{"init_scale", c.scaler.init_scale},
                     {"growth_factor", c.scaler.growth_factor},
                     {"backoff_factor", c.scaler.backoff_factor},
                     {"growth_interval", c.scaler.growth_interval}};
    std::vector<std::string> names;
    for (std::size_t i = 0; i < params; ++i) names.push_back(opt.param(i).name);
    cfg["params"] = names;
    cfg["layers"] = {"Conv2d(1, 32, 3, padding 1)", "ReLU", "MaxPool2d(2)", "Conv2d(32, 64, 3, padding 1)", "ReLU",
                     "MaxPool2d(2)", "Flatten", "Linear(3136, 128) + ReLU", "Linear(128, 10)"};
    Out out;
    out.metadata("config", cfg.dump());
    for (std::size_t i = 0; i < params; ++i) {
      out.add<T>("weight." + names[i], dims(opt.param(i).weight.shape()), weights(i));
    }
    out.add<T>("x", {c.batches, c.batch, 1, kSide, kSide}, xs);
    out.add<std::int32_t>("labels", {c.batches, c.batch}, labels);
    out.write(c.dir + "/init.safetensors");
  }

  // "before." / "after." state: model weights, masters, Adam moments, step counts.
  auto add_state = [&](Out& out, const std::string& prefix) {
    const optim::OptimizerState st = opt.save_state();
    std::vector<std::int64_t> steps;
    for (std::size_t i = 0; i < params; ++i) {
      const std::string& name = opt.param(i).name;
      const std::vector<std::int64_t> shape = dims(opt.param(i).weight.shape());
      const optim::ParamState& p = st.params[i];
      out.add<T>(prefix + "weight." + name, shape, weights(i));
      out.add<float>(prefix + "master." + name, shape, p.master);
      for (std::size_t k = 0; k < 2; ++k) {  // exp_avg, exp_avg_sq: zeros where not made yet
        const bool made = k < p.state.size() && p.state[k].has_value();
        out.add<float>(prefix + state_names[k] + "." + name, shape,
                       made ? *p.state[k] : std::vector<float>(p.master.size(), 0.0f));
      }
      steps.push_back(p.step);
    }
    out.add<std::int64_t>(prefix + "step", {static_cast<std::int64_t>(params)}, steps);
  };

  std::vector<float> losses, scales;
  std::vector<std::int32_t> found, written;
  for (int k = 1; k <= c.iterations; ++k) {
    const std::int64_t b = (k - 1) % c.batches;
    const TensorView<const T> x(x_all.data() + b * c.batch * kPixels, input, dev);
    const float scale = gpu ? device_scaler->scale() : host_scaler->scale();
    float loss = 0;
    if (gpu) {
      float* loss_dev = static_cast<float*>(scalars.data());
      nn::softmax_cross_entropy<T>(net.forward(x), static_cast<const std::int32_t*>(labels_dev.data()) + b * c.batch,
                                   device_scaler->scale_data(), net.output_grad(), loss_dev,
                                   reinterpret_cast<int*>(loss_dev + 1));
    } else {
      loss = nn::softmax_cross_entropy<T>(net.forward(x), labels.data() + b * c.batch, scale, net.output_grad());
    }
    net.backward();

    // Every iteration keeps what it started from until it knows whether it
    // is written: the recorded ones, and every skipped one (so that the
    // oracle can repeat each skip decision from the same state).
    Out out;
    add_state(out, "before.");
    for (std::size_t i = 0; i < params; ++i) {
      out.add<T>("grad." + opt.param(i).name, dims(opt.param(i).grad.shape()),
                 to_host<T>(opt.param(i).grad.as<const T>("grad")));
    }
    bool inf = false;
    if (gpu) {
      device_scaler->step(opt);
      inf = device_scaler->found_inf(opt);  // synchronising read
      device_scaler->update();
      float read[2];
      mixprec::detail::copy_raw(read, Device::cpu(), scalars.data(), dev, sizeof read);
      int bad = 0;
      std::memcpy(&bad, &read[1], sizeof bad);
      MIXPREC_CHECK(bad == 0, "iteration ", k, ": a label outside [0, 10)");
      loss = read[0];
    } else {
      inf = !host_scaler->step(opt);
      host_scaler->update();
    }
    losses.push_back(loss);
    scales.push_back(scale);
    found.push_back(inf ? 1 : 0);
    const bool recorded = inf || std::binary_search(c.record.begin(), c.record.end(), k);
    if (recorded) {
      add_state(out, "after.");
      out.scalar<float>("scale", scale);
      out.scalar<float>("loss", loss);
      out.scalar<std::int32_t>("found_inf", inf ? 1 : 0);
      char name[32];
      std::snprintf(name, sizeof name, "/iter_%04d.safetensors", k);
      out.write(c.dir + name);
      written.push_back(k);
    }
    std::printf("iteration %3d  loss %.6f  scale %g%s%s\n", k, static_cast<double>(loss), static_cast<double>(scale),
                inf ? "  (non-finite gradient: step skipped)" : "", recorded ? "  [recorded]" : "");
    std::fflush(stdout);
  }
  Out traj;
  traj.add<float>("loss", {c.iterations}, losses);
  traj.add<float>("scale", {c.iterations}, scales);
  traj.add<std::int32_t>("found_inf", {c.iterations}, found);
  traj.add<std::int32_t>("recorded", {static_cast<std::int64_t>(written.size())}, written);
  traj.scalar<float>("final_scale", gpu ? device_scaler->scale() : host_scaler->scale());
  traj.write(c.dir + "/trajectory.safetensors");
  std::printf("cnn_torch_gpu_test: %d iterations, %zu recorded, written to %s\n", c.iterations, written.size(),
              c.dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Config c = parse(argc, argv);
  if (c.device == "cuda") {
    if (!cuda_available()) {
      std::printf("cnn_torch_gpu_test: no CUDA device: cudaGetDeviceCount finds none; nothing run, nothing written\n");
      return 0;
    }
    if (optim::device_backend() == nullptr) {
      std::fprintf(stderr, "cnn_torch_gpu_test: no CUDA kernels linked (tests/device_backend.cu is missing)\n");
      return 1;
    }
  }
  try {
    std::filesystem::create_directories(c.dir);
    for (const auto& entry : std::filesystem::directory_iterator(c.dir)) {
      if (entry.path().extension() == ".safetensors") std::filesystem::remove(entry.path());
    }
    return c.precision == "fp16" ? run<half>(c) : run<float>(c);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cnn_torch_gpu_test: %s\n", e.what());
    return 1;
  }
}

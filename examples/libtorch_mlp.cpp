// SPDX-License-Identifier: Apache-2.0
// A libtorch model trained with mixprec's loss scaling and optimizer: the
// forward and backward passes are libtorch's (torch::nn), the loss scale,
// the overflow check, the fp32 master weights and the AdamW step are
// mixprec's, through views of the module's parameters and gradients
// (mixprec/torch/params.hpp). An MLP learns to classify synthetic data (the
// labels of a fixed random "teacher" network); the program exits 1 unless
// its test accuracy reaches --min-accuracy. docs/libtorch.md explains it.
//
//   libtorch_mlp [--device cpu|cuda] [--dtype fp16|bf16|fp32]
//                [--scaling dynamic|off] [--epochs N] [--seed N] [--min-accuracy A]
//
// Defaults: fp16 with dynamic loss scaling on a CUDA device; bf16 on the
// CPU, because libtorch 1.13 (Debian's) has no fp16 matrix product on the
// CPU ("addmm_impl_cpu_" not implemented for 'Half'). bf16 needs no loss
// scaling (--scaling off is its default); CI's run asks for it anyway
// (--scaling dynamic) so that the scaled backward and the unscale run.
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include <mixprec/mixprec.hpp>
#include <mixprec/torch/params.hpp>

namespace {

struct Config {
  std::string device;  // "" = cuda when usable, else cpu
  std::string dtype;   // "" = fp16 on cuda, bf16 on cpu
  std::string scaling;  // "" = dynamic for fp16, off otherwise
  int epochs = 30;
  std::uint64_t seed = 1;
  double min_accuracy = 0.0;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "libtorch_mlp: %s\n", message.c_str());
  std::fprintf(stderr,
               "usage: libtorch_mlp [--device cpu|cuda] [--dtype fp16|bf16|fp32] [--scaling dynamic|off]\n"
               "                    [--epochs N] [--seed N] [--min-accuracy A]\n");
  std::exit(2);
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") usage_error("trains an MLP with libtorch + mixprec");
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    auto one_of = [&](std::initializer_list<const char*> choices) {
      for (const char* ch : choices) {
        if (value == ch) return;
      }
      usage_error(flag + " = '" + value + "' is not one of the choices");
    };
    if (flag == "--device") {
      one_of({"cpu", "cuda"});
      c.device = value;
    } else if (flag == "--dtype") {
      one_of({"fp16", "bf16", "fp32"});
      c.dtype = value;
    } else if (flag == "--scaling") {
      one_of({"dynamic", "off"});
      c.scaling = value;
    } else if (flag == "--epochs") {
      c.epochs = std::atoi(value.c_str());
      if (c.epochs < 1) usage_error("--epochs = '" + value + "', must be >= 1");
    } else if (flag == "--seed") {
      c.seed = std::strtoull(value.c_str(), nullptr, 10);
    } else if (flag == "--min-accuracy") {
      c.min_accuracy = std::atof(value.c_str());
    } else {
      usage_error("unknown flag " + flag);
    }
  }
  return c;
}

// The model: torch::nn layers, nothing mixprec-specific.
struct MlpImpl : torch::nn::Module {
  MlpImpl(int in, int hidden, int out)
      : fc1(register_module("fc1", torch::nn::Linear(in, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, hidden))),
        fc3(register_module("fc3", torch::nn::Linear(hidden, out))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(fc1->forward(x));
    x = torch::relu(fc2->forward(x));
    return fc3->forward(x);
  }
  torch::nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(Mlp);

// The data: points in 16 dimensions labelled by a fixed random network with
// a hidden layer (so not linearly separable), 4 classes.
struct Data {
  torch::Tensor x_train, y_train, x_test, y_test;
};

Data make_data(std::int64_t n_train, std::int64_t n_test) {
  const std::int64_t dim = 16, hidden = 32, classes = 4;
  const torch::Tensor w1 = torch::randn({dim, hidden}) * (2.0 / std::sqrt(double(dim)));
  const torch::Tensor w2 = torch::randn({hidden, classes});
  auto label = [&](const torch::Tensor& x) { return torch::tanh(x.mm(w1)).mm(w2).argmax(1); };
  Data d;
  d.x_train = torch::randn({n_train, dim});
  d.x_test = torch::randn({n_test, dim});
  d.y_train = label(d.x_train);
  d.y_test = label(d.x_test);
  return d;
}

// mixprec's two scalers behind one interface: the host one for CPU
// parameters, the device one (state on the GPU, no synchronisation in a
// step) for CUDA parameters.
struct HostScaler {
  explicit HostScaler(const mixprec::amp::GradScalerOptions& o) : s(o) {}
  // The seed of the backward pass, d(loss)/d(loss) times the scale: every
  // gradient comes out multiplied by S.
  torch::Tensor seed(const torch::Tensor& loss) { return torch::full_like(loss, s.scale()); }
  bool step(mixprec::optim::Optimizer& opt) { return s.step(opt); }
  void update() { s.update(); }
  float scale() const { return s.scale(); }
  std::int64_t skipped() const { return s.skipped_steps(); }
  mixprec::amp::GradScaler s;
};

#if MIXPREC_WITH_CUDA
struct DeviceScaler {
  DeviceScaler(const mixprec::amp::GradScalerOptions& o, mixprec::Device d) : s(o, d) {}
  // The same seed, multiplied on the device by the scale in device memory:
  // no copy to the host.
  torch::Tensor seed(const torch::Tensor& loss) {
    torch::Tensor one = torch::ones_like(loss);
    s.scale(mixprec::libtorch::view(one, "the backward seed"));
    return one;
  }
  bool step(mixprec::optim::Optimizer& opt) {
    s.step(opt);
    return true;  // decided on the device; counted by skipped()
  }
  void update() { s.update(); }
  float scale() const { return s.scale(); }  // synchronises: once an epoch
  std::int64_t skipped() const { return s.skipped_steps(); }
  mixprec::amp::DeviceGradScaler s;
};
#endif

template <class Scaler>
int train(const Config& c, const torch::Device& device, torch::ScalarType dtype, Scaler& scaler) {
  namespace optim = mixprec::optim;
  namespace libtorch = mixprec::libtorch;

  const Data data = make_data(32768, 4096);
  Mlp net(16, 128, 4);
  net->to(device, dtype);

  // The gradients exist before the first backward, so the optimizer can
  // view them now; torch's backward then adds into these same tensors.
  libtorch::allocate_grads(*net);
  optim::AdamWOptions options;
  options.lr = 3e-3;
  options.weight_decay = 1e-4;
  optim::AdamW opt(libtorch::params(*net), options);  // fp32 masters of the fp16/bf16 weights
  const std::int64_t batch = 256;
  const std::int64_t steps_per_epoch = data.x_train.size(0) / batch;
  opt.set_schedule(optim::LRSchedule::cosine(c.epochs * steps_per_epoch, /*min_factor=*/0.05));

  const torch::Tensor x_train = data.x_train.to(device, dtype), y_train = data.y_train.to(device);
  const torch::Tensor x_test = data.x_test.to(device, dtype), y_test = data.y_test.to(device);
  // What always answering the most frequent class scores: the bar to beat.
  const double majority = data.y_test.bincount().max().item<double>() / double(data.y_test.size(0));
  std::printf("test set: %lld points, majority class %.4f\n", static_cast<long long>(data.y_test.size(0)), majority);
  double accuracy = 0;
  for (int epoch = 1; epoch <= c.epochs; ++epoch) {
    const torch::Tensor order = torch::randperm(x_train.size(0), torch::TensorOptions().device(device));
    torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions().device(device));
    for (std::int64_t k = 0; k < steps_per_epoch; ++k) {
      const torch::Tensor idx = order.slice(0, k * batch, (k + 1) * batch);
      net->zero_grad(/*set_to_none=*/false);  // in place: the optimizer's views stay valid
      const torch::Tensor logits = net->forward(x_train.index_select(0, idx));
      const torch::Tensor loss =
          torch::nn::functional::cross_entropy(logits.to(torch::kFloat), y_train.index_select(0, idx));
      loss.backward(scaler.seed(loss));  // scaled gradients, in the model's dtype
      scaler.step(opt);                  // check, unscale, fp32 AdamW, write back; or skip
      scaler.update();
      loss_sum += loss.detach();
    }
    libtorch::check_views(opt, *net);  // torch still writes the gradients mixprec reads

    torch::NoGradGuard no_grad;
    const torch::Tensor predicted = net->forward(x_test).argmax(1);
    accuracy = predicted.eq(y_test).to(torch::kFloat).mean().item<double>();
    std::printf("epoch %2d  loss %.4f  test accuracy %.4f  scale %g  skipped %lld  lr %.2e\n", epoch,
                loss_sum.item<double>() / double(steps_per_epoch), accuracy, double(scaler.scale()),
                static_cast<long long>(scaler.skipped()), opt.lr(0));
  }
  if (accuracy < c.min_accuracy) {
    std::printf("FAILED: test accuracy %.4f < --min-accuracy %.4f\n", accuracy, c.min_accuracy);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config c = parse(argc, argv);
  try {
    const bool cuda_usable = torch::cuda::is_available() && mixprec::cuda_available();
    if (c.device.empty()) c.device = cuda_usable ? "cuda" : "cpu";
    if (c.device == "cuda" && !cuda_usable) {
      std::printf("no CUDA device: libtorch sees %d, mixprec %d (built %s CUDA)\n",
                  static_cast<int>(torch::cuda::device_count()), mixprec::cuda_device_count(),
                  mixprec::built_with_cuda() ? "with" : "without");
      return 1;
    }
    if (c.dtype.empty()) c.dtype = c.device == "cuda" ? "fp16" : "bf16";
    if (c.scaling.empty()) c.scaling = c.dtype == "fp16" ? "dynamic" : "off";
    const torch::ScalarType dtype =
        c.dtype == "fp16" ? torch::kHalf : c.dtype == "bf16" ? torch::kBFloat16 : torch::kFloat;
    torch::manual_seed(c.seed);
    std::printf("libtorch_mlp: %s, %s, loss scaling %s, %d epochs\n", c.device.c_str(), c.dtype.c_str(),
                c.scaling.c_str(), c.epochs);

    mixprec::amp::GradScalerOptions scaling;  // torch.amp.GradScaler's defaults: dynamic from 2^16
    if (c.scaling == "off") scaling.mode = mixprec::amp::ScalingMode::disabled;  // still skips inf/NaN steps
    if (c.device == "cpu") {
      HostScaler scaler(scaling);
      return train(c, torch::Device(torch::kCPU), dtype, scaler);
    }
#if MIXPREC_WITH_CUDA
    DeviceScaler scaler(scaling, mixprec::Device::cuda(0));
    return train(c, torch::Device(torch::kCUDA, 0), dtype, scaler);
#endif
  } catch (const c10::Error& e) {  // libtorch's errors: the message without its stack trace
    std::fprintf(stderr, "libtorch_mlp: libtorch: %s\n", e.what_without_backtrace());
    if (c.dtype == "fp16" && c.device == "cpu") {
      std::fprintf(stderr, "libtorch_mlp: this libtorch lacks fp16 kernels on the CPU; use --dtype bf16\n");
    }
    return 1;
  } catch (const std::exception& e) {  // mixprec::Error
    std::fprintf(stderr, "libtorch_mlp: %s\n", e.what());
    return 1;
  }
  return 1;
}

// SPDX-License-Identifier: Apache-2.0
// Fashion-MNIST with an MLP (784-hidden-hidden-10, ReLU), trained in fp16,
// bf16 or fp32 with fp32 master weights and a loss scaler: GradScaler on
// the CPU, DeviceGradScaler on the GPU. Plain C++; in a CUDA build the
// kernels come from mixprec_kernels.cu, one line long.
//
//   fashion_mnist_mlp [--precision fp16|bf16|fp32] [--device cpu|cuda] [--epochs N]
//                     [--batch N] [--optimizer sgd|adam|adamw|rmsprop] [--lr X]
//                     [--hidden N] [--seed N] [--data DIR] [--min-accuracy X]
//
// Each epoch prints one line: mean train loss, the loss scale, skipped
// steps, images/s; then the test accuracy. With --min-accuracy the program
// exits 1 when the final test accuracy is below it.
#include <mixprec/mixprec.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fashion_mnist.hpp"

namespace {

using namespace mixprec;

struct Args {
  std::string precision = "fp16", device, optimizer = "adamw", data = examples::kFashionMnistDir;
  int epochs = 10;
  std::int64_t batch = 256, hidden = 1024;
  double lr = 1e-3, min_accuracy = 0;
  std::uint64_t seed = 0;
};

[[noreturn]] void usage_error(const std::string& what) {
  std::fprintf(stderr, "fashion_mnist_mlp: %s\n(see the top of examples/fashion_mnist_mlp.cpp)\n", what.c_str());
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string v = argv[++i];
    auto number = [&](double low) {
      char* end = nullptr;
      const double x = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0' || !(x >= low)) usage_error(flag + " = " + v + ", must be a number >= " + std::to_string(low));
      return x;
    };
    if (flag == "--precision") {
      if (v != "fp16" && v != "bf16" && v != "fp32") usage_error("--precision = " + v + ", must be fp16, bf16 or fp32");
      a.precision = v;
    } else if (flag == "--device") {
      if (v != "cpu" && v != "cuda") usage_error("--device = " + v + ", must be cpu or cuda");
      a.device = v;
    } else if (flag == "--optimizer") {
      if (v != "sgd" && v != "adam" && v != "adamw" && v != "rmsprop") {
        usage_error("--optimizer = " + v + ", must be sgd, adam, adamw or rmsprop");
      }
      a.optimizer = v;
    } else if (flag == "--epochs") {
      a.epochs = static_cast<int>(number(1));
    } else if (flag == "--batch") {
      a.batch = static_cast<std::int64_t>(number(1));
    } else if (flag == "--hidden") {
      a.hidden = static_cast<std::int64_t>(number(1));
    } else if (flag == "--lr") {
      a.lr = number(0);
    } else if (flag == "--seed") {
      a.seed = static_cast<std::uint64_t>(number(0));
    } else if (flag == "--data") {
      a.data = v;
    } else if (flag == "--min-accuracy") {
      a.min_accuracy = number(0);
    } else {
      usage_error("unknown flag " + flag);
    }
  }
  if (a.device.empty()) a.device = cuda_available() && optim::device_backend() != nullptr ? "cuda" : "cpu";
  return a;
}

std::unique_ptr<optim::Optimizer> make_optimizer(const Args& a, std::vector<optim::Param> params) {
  if (a.optimizer == "sgd") {
    optim::SGDOptions o;
    o.lr = a.lr;
    o.momentum = 0.9;
    return std::make_unique<optim::SGD>(std::move(params), o);
  }
  if (a.optimizer == "adam") {
    optim::AdamOptions o;
    o.lr = a.lr;
    return std::make_unique<optim::Adam>(std::move(params), o);
  }
  if (a.optimizer == "rmsprop") {
    optim::RMSpropOptions o;
    o.lr = a.lr;
    return std::make_unique<optim::RMSprop>(std::move(params), o);
  }
  optim::AdamWOptions o;
  o.lr = a.lr;
  return std::make_unique<optim::AdamW>(std::move(params), o);
}

// Pixels scaled to [0, 1] and standardised with the training set's mean and
// standard deviation (0.2860, 0.3530), into batch rows of T.
template <class T>
void fill_batch(const examples::ImageSet& s, const std::int64_t* order, std::int64_t batch, Tensor<T>& x,
                std::vector<std::int32_t>& labels) {
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::uint8_t* p = s.pixels.data() + order[b] * 784;
    T* row = x.data() + b * 784;
    for (int i = 0; i < 784; ++i) row[i] = from_float<T>((p[i] / 255.0f - 0.2860f) / 0.3530f);
    labels[static_cast<std::size_t>(b)] = s.labels[static_cast<std::size_t>(order[b])];
  }
}

template <class T>
int run(const Args& a) {
  const examples::ImageSet train = examples::load_fashion_mnist(a.data, "train");
  const examples::ImageSet test = examples::load_fashion_mnist(a.data, "t10k");
  const Device dev = a.device == "cuda" ? Device::cuda(0) : Device::cpu();
  const bool gpu = dev.is_cuda();
  nn::Sequential<T> net({a.batch, 784}, dev);
  net.template emplace<nn::Linear<T>>(784, a.hidden, nn::Activation::relu, true, dev, a.seed * 3 + 1);
  net.template emplace<nn::Linear<T>>(a.hidden, a.hidden, nn::Activation::relu, true, dev, a.seed * 3 + 2);
  net.template emplace<nn::Linear<T>>(a.hidden, 10, nn::Activation::none, true, dev, a.seed * 3 + 3);
  std::unique_ptr<optim::Optimizer> opt = make_optimizer(a, net.parameters());
  const amp::GradScalerOptions so = amp::GradScalerOptions::for_dtype(dtype_of<T>);
  std::unique_ptr<amp::GradScaler> host_scaler;
  std::unique_ptr<amp::DeviceGradScaler> device_scaler;
  if (gpu) {
    device_scaler = std::make_unique<amp::DeviceGradScaler>(so, dev);
  } else {
    host_scaler = std::make_unique<amp::GradScaler>(so);
  }
  std::printf("fashion_mnist_mlp: %s on %s, 784-%lld-%lld-10, batch %lld, %s lr %g, %d epochs\n", a.precision.c_str(),
              a.device.c_str(), static_cast<long long>(a.hidden), static_cast<long long>(a.hidden),
              static_cast<long long>(a.batch), a.optimizer.c_str(), a.lr, a.epochs);

  Tensor<T> x({a.batch, 784});
  std::vector<std::int32_t> labels(static_cast<std::size_t>(a.batch));
  Tensor<T> dx = gpu ? Tensor<T>({a.batch, 784}, dev) : Tensor<T>();
  Buffer dlabels(gpu ? a.batch * sizeof(std::int32_t) : 0, dev), dscalars(gpu ? 2 * sizeof(float) : 0, dev);
  std::vector<std::int64_t> order(static_cast<std::size_t>(train.count));
  std::mt19937_64 rng(a.seed);
  const std::int64_t steps = train.count / a.batch;  // the last partial batch is dropped
  double accuracy = 0;
  for (int epoch = 1; epoch <= a.epochs; ++epoch) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    const std::int64_t skipped_before = gpu ? device_scaler->skipped_steps() : host_scaler->skipped_steps();
    const auto start = std::chrono::steady_clock::now();
    double loss_sum = 0;
    for (std::int64_t s = 0; s < steps; ++s) {
      fill_batch(train, order.data() + s * a.batch, a.batch, x, labels);
      if (!gpu) {
        loss_sum += nn::softmax_cross_entropy<T>(net.forward(x.view()), labels.data(), host_scaler->scale(),
                                                 net.output_grad());
        net.backward();
        host_scaler->step(*opt);
        host_scaler->update();
        continue;
      }
      copy(x, dx);
      detail::copy_raw(dlabels.data(), dev, labels.data(), Device::cpu(), dlabels.bytes());
      float* d = static_cast<float*>(dscalars.data());
      nn::softmax_cross_entropy<T>(net.forward(dx.view()), static_cast<const std::int32_t*>(dlabels.data()),
                                   device_scaler->scale_data(), net.output_grad(), d, reinterpret_cast<int*>(d + 1));
      net.backward();
      device_scaler->step(*opt);
      device_scaler->update();
      float loss = 0;
      detail::copy_raw(&loss, Device::cpu(), d, dev, sizeof loss);
      loss_sum += loss;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const float scale = gpu ? device_scaler->scale() : host_scaler->scale();
    const std::int64_t skipped =
        (gpu ? device_scaler->skipped_steps() : host_scaler->skipped_steps()) - skipped_before;
    // Test accuracy: batches of the same size (the last partial batch is
    // padded with the first images and not counted).
    std::int64_t correct = 0;
    std::vector<std::int64_t> test_order(static_cast<std::size_t>(a.batch));
    for (std::int64_t b0 = 0; b0 < test.count; b0 += a.batch) {
      for (std::int64_t b = 0; b < a.batch; ++b) test_order[static_cast<std::size_t>(b)] = (b0 + b) % test.count;
      fill_batch(test, test_order.data(), a.batch, x, labels);
      Tensor<T> logits({a.batch, 10});
      if (gpu) {
        copy(x, dx);
        copy(net.forward(dx.view()), logits);
      } else {
        copy(net.forward(x.view()), logits);
      }
      for (std::int64_t b = 0; b < a.batch && b0 + b < test.count; ++b) {
        std::int64_t best = 0;
        for (std::int64_t c = 1; c < 10; ++c) {
          if (to_float(logits.at(b * 10 + c)) > to_float(logits.at(b * 10 + best))) best = c;
        }
        correct += best == labels[static_cast<std::size_t>(b)];
      }
    }
    accuracy = static_cast<double>(correct) / static_cast<double>(test.count);
    std::printf("epoch %2d  loss %.4f  scale %-8g  skipped %3lld  %8.0f images/s  test accuracy %.4f\n", epoch,
                loss_sum / static_cast<double>(steps), scale, static_cast<long long>(skipped),
                static_cast<double>(steps * a.batch) / seconds, accuracy);
    std::fflush(stdout);
  }
  if (accuracy < a.min_accuracy) {
    std::fprintf(stderr, "fashion_mnist_mlp: test accuracy %.4f < --min-accuracy %.4f\n", accuracy, a.min_accuracy);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  try {
    if (a.precision == "fp16") return run<half>(a);
    if (a.precision == "bf16") return run<bfloat16>(a);
    return run<float>(a);
  } catch (const Error& e) {
    std::fprintf(stderr, "fashion_mnist_mlp: %s\n", e.what());
    return 1;
  }
}

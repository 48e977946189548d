// SPDX-License-Identifier: Apache-2.0
// Fashion-MNIST with an MLP (784-hidden-hidden-10, ReLU), trained in fp16,
// bf16 or fp32 with fp32 master weights and a loss scaler: GradScaler on
// the CPU, DeviceGradScaler on the GPU. Plain C++; in a CUDA build the
// kernels come from mixprec_kernels.cu, one line long.
//
//   fashion_mnist_mlp [--precision fp16|bf16|fp32] [--device cpu|cuda] [--epochs N]
//                     [--batch N] [--optimizer sgd|adam|adamw|rmsprop] [--lr X]
//                     [--hidden N] [--seed N] [--data DIR] [--graph on|off]
//                     [--min-accuracy X]
//
// The data sets go to the training device once (data::Batches). On the GPU
// a whole training step is captured in a CUDA graph after the first one and
// replayed (--graph off: every step launched eagerly), and no call inside an
// epoch waits for the device. A progress line per epoch (redrawn on a
// terminal) shows the mean train loss, the loss scale, skipped steps and
// images/s, then the test accuracy. With --min-accuracy the program exits 1
// when the final test accuracy is below it.
#include <mixprec/mixprec.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
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
  bool graph = true;
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
    } else if (flag == "--graph") {
      if (v != "on" && v != "off") usage_error("--graph = " + v + ", must be on or off");
      a.graph = v == "on";
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

std::vector<std::int32_t> identity(std::int64_t n) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  return order;
}

// Pixels scaled to [0, 1] and standardised with the training set's mean and
// standard deviation (0.2860, 0.3530), as rows of T: done once, up front.
template <class T>
Tensor<T> to_rows(const examples::ImageSet& s) {
  Tensor<T> rows({s.count, 784});
  for (std::size_t i = 0; i < s.pixels.size(); ++i) {
    rows.data()[i] = from_float<T>((s.pixels[i] / 255.0f - 0.2860f) / 0.3530f);
  }
  return rows;
}

// One line per epoch, redrawn in place on a terminal while the epoch runs
// (elsewhere only the finished line is printed).
struct Progress {
  bool tty = isatty(fileno(stdout)) != 0;
  void draw(int epoch, std::int64_t done, std::int64_t steps, double loss, float scale, std::int64_t skipped,
            double images_per_s) const {
    if (!tty) return;
    const int width = 20, filled = static_cast<int>(width * done / steps);
    std::printf("\repoch %2d [%s%s] %3d%%  loss %.4f  scale %-8g  skipped %3lld  %8.0f images/s", epoch,
                std::string(static_cast<std::size_t>(filled), '#').c_str(),
                std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                static_cast<int>(100 * done / steps), loss, scale, static_cast<long long>(skipped), images_per_s);
    std::fflush(stdout);
  }
  void finish(int epoch, double loss, float scale, std::int64_t skipped, double images_per_s,
              double accuracy) const {
    std::printf("%sepoch %2d  loss %.4f  scale %-8g  skipped %3lld  %8.0f images/s  test accuracy %.4f%s\n",
                tty ? "\r" : "", epoch, loss, scale, static_cast<long long>(skipped), images_per_s, accuracy,
                tty ? "          " : "");
    std::fflush(stdout);
  }
};

// The network, its optimizer and the data: the same on either device.
template <class T>
struct Model {
  Model(const Args& a, Device dev, stream_t stream, const examples::ImageSet& train_set,
        const examples::ImageSet& test_set)
      : net({a.batch, 784}, dev),
        train(to_rows<T>(train_set).view(), train_set.labels, a.batch, dev, stream),
        test(to_rows<T>(test_set).view(), test_set.labels, a.batch, dev, stream) {
    net.template emplace<nn::Linear<T>>(784, a.hidden, nn::Activation::relu, true, dev, a.seed * 3 + 1);
    net.template emplace<nn::Linear<T>>(a.hidden, a.hidden, nn::Activation::relu, true, dev, a.seed * 3 + 2);
    net.template emplace<nn::Linear<T>>(a.hidden, 10, nn::Activation::none, true, dev, a.seed * 3 + 3);
    opt = make_optimizer(a, net.parameters());
  }
  nn::Sequential<T> net;
  data::Batches<T> train, test;
  std::unique_ptr<optim::Optimizer> opt;
};

// The CPU: plain calls, the host GradScaler.
template <class T>
double run_cpu(const Args& a, const examples::ImageSet& train_set, const examples::ImageSet& test_set) {
  Model<T> m(a, Device::cpu(), nullptr, train_set, test_set);
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(dtype_of<T>));
  const Progress progress;
  std::mt19937_64 rng(a.seed);
  const std::int64_t steps = m.train.full_batches();  // the last partial batch is dropped
  double accuracy = 0;
  for (int epoch = 1; epoch <= a.epochs; ++epoch) {
    m.train.shuffle(rng);
    const std::int64_t skipped_before = scaler.skipped_steps();
    const auto start = std::chrono::steady_clock::now();
    double loss_sum = 0;
    auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
    for (std::int64_t s = 1; s <= steps; ++s) {
      m.train.next();
      loss_sum += nn::softmax_cross_entropy<T>(m.net.forward(m.train.x()), m.train.labels(), scaler.scale(),
                                               m.net.output_grad());
      m.net.backward();
      scaler.step(*m.opt);
      scaler.update();
      if (s % 10 == 0) {
        progress.draw(epoch, s, steps, loss_sum / s, scaler.scale(), scaler.skipped_steps() - skipped_before,
                      s * a.batch / seconds());
      }
    }
    const double images_per_s = steps * a.batch / seconds();
    // Test accuracy: the last batch wraps around to the first images, which
    // are not counted twice.
    std::int64_t correct = 0;
    m.test.set_order(identity(m.test.size()));
    for (std::int64_t b0 = 0; b0 < m.test.size(); b0 += a.batch) {
      m.test.next();
      correct += nn::count_correct<T>(m.net.forward(m.test.x()), m.test.labels(),
                                      std::min(a.batch, m.test.size() - b0));
    }
    accuracy = static_cast<double>(correct) / static_cast<double>(m.test.size());
    progress.finish(epoch, loss_sum / steps, scaler.scale(), scaler.skipped_steps() - skipped_before,
                    images_per_s, accuracy);
  }
  return accuracy;
}

// The GPU: the data lives on the device and one training step (batch,
// forward, loss, backward, unscale + inf check, AdamW, scale update) is
// captured once in a CUDA graph and replayed for every step. Nothing inside
// an epoch waits for the device: the loss is summed on the device, and the
// progress line reads a pinned copy queued a tenth of an epoch earlier.
template <class T>
double run_gpu(const Args& a, const examples::ImageSet& train_set, const examples::ImageSet& test_set) {
  const Device dev = Device::cuda(0);
  Stream stream(dev);
  const nn::Context ctx{stream.get()};
  Model<T> m(a, dev, stream.get(), train_set, test_set);
  amp::DeviceGradScaler scaler(amp::GradScalerOptions::for_dtype(dtype_of<T>), dev, stream.get());
  // Device scalars: [0] the step's loss, [1] a bad-label flag, [2] the
  // epoch's loss sum, then the test set's correct count (int64).
  Buffer scalars(4 * sizeof(float) + sizeof(std::int64_t), dev);
  float* loss = static_cast<float*>(scalars.data());
  auto* correct = reinterpret_cast<std::int64_t*>(loss + 4);
  struct Snapshot {
    float loss_sum;
    amp::DeviceScalerState scaler;
  };
  PinnedBuffer snapshots(2 * sizeof(Snapshot));
  Event ticks[2] = {Event(dev), Event(dev)}, epoch_start(dev), epoch_end(dev);

  auto step = [&] {
    m.train.next();
    nn::softmax_cross_entropy<T>(m.net.forward(m.train.x(), ctx), m.train.labels(), scaler.scale_data(),
                                 m.net.output_grad(), loss, reinterpret_cast<int*>(loss + 1), ctx);
    nn::accumulate(dev, loss + 2, loss, ctx);
    m.net.backward(ctx);
    scaler.step(*m.opt);
    scaler.update();
  };
  auto snapshot = [&](int slot) {  // queues the copy; read after ticks[slot]
    auto* s = static_cast<Snapshot*>(snapshots.data()) + slot;
    copy_to_host_async(snapshots, slot * sizeof(Snapshot), loss + 2, sizeof(float), stream.get());
    copy_to_host_async(snapshots, slot * sizeof(Snapshot) + offsetof(Snapshot, scaler), scaler.state_data(),
                       sizeof(s->scaler), stream.get());
    ticks[slot].record(stream.get());
    return s;
  };
  auto zero = [&](void* p, std::size_t bytes) {
    const std::int64_t z = 0;
    mixprec::detail::copy_raw(p, dev, &z, Device::cpu(), bytes, stream.get());
  };

  const Progress progress;
  std::mt19937_64 rng(a.seed);
  const std::int64_t steps = m.train.full_batches();  // the last partial batch is dropped
  const std::int64_t tick = std::max<std::int64_t>(1, steps / 10);
  Graph graph;
  double accuracy = 0;
  std::int64_t skipped_total = 0;
  for (int epoch = 1; epoch <= a.epochs; ++epoch) {
    m.train.shuffle(rng);
    zero(loss + 2, sizeof(float));
    epoch_start.record(stream.get());
    for (std::int64_t s = 1; s <= steps; ++s) {
      if (!a.graph || graph.empty()) {
        step();  // eager; the first step also makes every plan and buffer
        if (a.graph) graph.capture(stream.get(), step);
      } else {
        graph.replay(stream.get());
      }
      if (s % tick == 0 && s < steps) {  // progress, a tick behind
        snapshot(static_cast<int>(s / tick % 2));
        if (s >= 2 * tick) {
          const int prev = static_cast<int>((s / tick + 1) % 2);  // the snapshot of step s - tick
          ticks[prev].synchronize();  // recorded a tick ago; the device still has a tick queued
          const Snapshot* p = static_cast<const Snapshot*>(snapshots.data()) + prev;
          const std::int64_t done = s - tick;
          progress.draw(epoch, done, steps, p->loss_sum / done, p->scaler.state.scale,
                        p->scaler.skipped - skipped_total, done * a.batch / (1e-3 * ticks[prev].elapsed_ms(epoch_start)));
          scaler.check_errors();
        }
      }
    }
    epoch_end.record(stream.get());
    const Snapshot* end = snapshot(0);
    ticks[0].synchronize();
    const double images_per_s = steps * a.batch / (1e-3 * epoch_end.elapsed_ms(epoch_start));
    const std::int64_t skipped = end->scaler.skipped - skipped_total;
    skipped_total = end->scaler.skipped;
    scaler.check_errors();
    // Test accuracy, counted on the device, read once.
    zero(correct, sizeof(std::int64_t));
    m.test.set_order(identity(m.test.size()));
    for (std::int64_t b0 = 0; b0 < m.test.size(); b0 += a.batch) {
      m.test.next();
      nn::count_correct<T>(m.net.forward(m.test.x(), ctx), m.test.labels(), std::min(a.batch, m.test.size() - b0),
                           correct, ctx);
    }
    std::int64_t right = 0;
    mixprec::detail::copy_raw(&right, Device::cpu(), correct, dev, sizeof right, stream.get());
    accuracy = static_cast<double>(right) / static_cast<double>(m.test.size());
    progress.finish(epoch, end->loss_sum / steps, end->scaler.state.scale, skipped, images_per_s, accuracy);
  }
  return accuracy;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  try {
    const examples::ImageSet train = examples::load_fashion_mnist(a.data, "train");
    const examples::ImageSet test = examples::load_fashion_mnist(a.data, "t10k");
    std::printf("fashion_mnist_mlp: %s on %s, 784-%lld-%lld-10, batch %lld, %s lr %g, %d epochs%s\n",
                a.precision.c_str(), a.device.c_str(), static_cast<long long>(a.hidden),
                static_cast<long long>(a.hidden), static_cast<long long>(a.batch), a.optimizer.c_str(), a.lr, a.epochs,
                a.device == "cuda" ? (a.graph ? ", CUDA graph" : ", eager") : "");
    const bool gpu = a.device == "cuda";
    double accuracy = 0;
    if (a.precision == "fp16") {
      accuracy = gpu ? run_gpu<half>(a, train, test) : run_cpu<half>(a, train, test);
    } else if (a.precision == "bf16") {
      accuracy = gpu ? run_gpu<bfloat16>(a, train, test) : run_cpu<bfloat16>(a, train, test);
    } else {
      accuracy = gpu ? run_gpu<float>(a, train, test) : run_cpu<float>(a, train, test);
    }
    if (accuracy < a.min_accuracy) {
      std::fprintf(stderr, "fashion_mnist_mlp: test accuracy %.4f < --min-accuracy %.4f\n", accuracy, a.min_accuracy);
      return 1;
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "fashion_mnist_mlp: %s\n", e.what());
    return 1;
  }
}

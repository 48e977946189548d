// SPDX-License-Identifier: Apache-2.0
// The training loop both Fashion-MNIST examples share, read top to bottom:
// flags, optimizer, data on the training device (data::Batches), then one
// loop for the CPU (plain calls, amp::GradScaler) and one for the GPU. On
// the GPU a whole training step (batch, forward, loss, backward, unscale +
// inf check, optimizer, scale update) is captured in a CUDA graph after the
// first step and replayed (--graph off: every step launched eagerly), and
// nothing inside an epoch waits for the device: the loss is summed on the
// device and the progress line reads pinned snapshots queued a tenth of an
// epoch earlier. A progress line per epoch (redrawn on a terminal) shows the
// mean train loss, the loss scale, skipped steps and images/s (epoch 1's
// includes making the plans and capturing the graph), then the test
// accuracy.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <optional>

#include <mixprec/dist/communicator.hpp>
#include <mixprec/dist/reducer.hpp>
#include <mixprec/dist/sharded.hpp>
#include <mixprec/mixprec.hpp>
#if MIXPREC_EXAMPLES_WITH_MPI
#include <mixprec/dist/mpi.hpp>
#endif

#include "fashion_mnist.hpp"

namespace mixprec::examples {

/// The flags both examples take (see the top of each example).
struct Args {
  std::string program, precision = "fp16", device, optimizer = "adamw", schedule = "cosine",
                       data = default_fashion_mnist_dir();
  int epochs = 10;
  std::int64_t batch = 256, hidden = 1024;
  double lr = 1e-3, min_accuracy = 0;
  std::uint64_t seed = 0;
  bool graph = true;
  bool zero1 = false;  // data parallel: ZeRO-1 (masters and moments sharded over the ranks)
  // The instability monitor (docs/monitor.md): on by default, a logged
  // step every monitor_every steps, a JSONL log when monitor_log is set.
  bool monitor = true;
  int monitor_every = 10;
  std::string monitor_log;
};

[[noreturn]] inline void usage_error(const Args& a, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n(see the top of examples/%s.cpp)\n", a.program.c_str(), what.c_str(),
               a.program.c_str());
  std::exit(2);
}

/// Parses argv over the defaults in `a` (a.program names the example);
/// --hidden only where `takes_hidden`. Exits 2 with a message on bad flags.
inline Args parse(int argc, char** argv, Args a, bool takes_hidden) {
  auto usage_error = [&](const std::string& what) { examples::usage_error(a, what); };
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string v = argv[++i];
    auto real = [&](double low) {  // a finite number >= low
      char* end = nullptr;
      const double x = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0' || !std::isfinite(x) || x < low) {
        usage_error(flag + " = " + v + ", must be a finite number >= " + std::to_string(low));
      }
      return x;
    };
    auto whole = [&](long long low, long long high) {  // an integer in [low, high]
      char* end = nullptr;
      errno = 0;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0' || errno != 0 || x < low || x > high) {
        usage_error(flag + " = " + v + ", must be a whole number in [" + std::to_string(low) + ", " +
                    std::to_string(high) + "]");
      }
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
      a.epochs = static_cast<int>(whole(1, 100000));
    } else if (flag == "--batch") {
      a.batch = whole(1, 1 << 20);  // and at most the training set: checked on loading
    } else if (flag == "--hidden" && takes_hidden) {
      a.hidden = whole(1, 1 << 16);
    } else if (flag == "--lr") {
      a.lr = real(0);
    } else if (flag == "--seed") {
      a.seed = static_cast<std::uint64_t>(whole(0, 1LL << 40));
    } else if (flag == "--schedule") {
      if (v != "constant" && v != "cosine") usage_error("--schedule = " + v + ", must be constant or cosine");
      a.schedule = v;
    } else if (flag == "--graph") {
      if (v != "on" && v != "off") usage_error("--graph = " + v + ", must be on or off");
      a.graph = v == "on";
    } else if (flag == "--zero1") {
      if (v != "on" && v != "off") usage_error("--zero1 = " + v + ", must be on or off");
      a.zero1 = v == "on";
    } else if (flag == "--monitor") {
      if (v != "on" && v != "off") usage_error("--monitor = " + v + ", must be on or off");
      a.monitor = v == "on";
    } else if (flag == "--monitor-every") {
      a.monitor_every = static_cast<int>(whole(1, 1000000));
    } else if (flag == "--monitor-log") {
      a.monitor_log = v;
    } else if (flag == "--data") {
      a.data = v;
    } else if (flag == "--min-accuracy") {
      a.min_accuracy = real(0);
    } else {
      usage_error("unknown flag " + flag);
    }
  }
  const bool usable = cuda_available() && optim::device_backend() != nullptr;
  if (a.device.empty()) a.device = usable ? "cuda" : "cpu";
  if (a.device == "cuda" && !usable) {
    usage_error(std::string("no CUDA device: --device cuda, but ") +
                (cuda_available() ? "no CUDA kernels are linked into this build" : "no CUDA device is usable"));
  }
  return a;
}

inline std::unique_ptr<optim::Optimizer> make_optimizer(const Args& a, std::vector<optim::Param> params) {
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

// ZeRO-1 over `comm` with the optimizer of `a` (the same options as
// make_optimizer's). Cut at elements: the MLP's first layer holds 85% of
// its parameters, so cuts at parameters would leave one rank most of the
// state; the examples do not clip, so the bits are plain data
// parallelism's either way (docs/distributed.md).
inline std::unique_ptr<dist::ZeroOne> make_zero1(const Args& a, dist::Communicator& comm,
                                                 std::vector<optim::Param> params) {
  const dist::ShardOptions cut{dist::ShardOptions::Cut::elements};
  if (a.optimizer == "sgd") {
    optim::SGDOptions o;
    o.lr = a.lr;
    o.momentum = 0.9;
    return std::make_unique<dist::ShardedOptimizer<optim::SGD>>(comm, std::move(params), o, cut);
  }
  if (a.optimizer == "adam") {
    optim::AdamOptions o;
    o.lr = a.lr;
    return std::make_unique<dist::ShardedOptimizer<optim::Adam>>(comm, std::move(params), o, cut);
  }
  if (a.optimizer == "rmsprop") {
    optim::RMSpropOptions o;
    o.lr = a.lr;
    return std::make_unique<dist::ShardedOptimizer<optim::RMSprop>>(comm, std::move(params), o, cut);
  }
  optim::AdamWOptions o;
  o.lr = a.lr;
  return std::make_unique<dist::ShardedOptimizer<optim::AdamW>>(comm, std::move(params), o, cut);
}

inline std::vector<std::int32_t> identity(std::int64_t n) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  return order;
}

// Pixels scaled to [0, 1] and standardised with the training set's mean and
// standard deviation (0.2860, 0.3530), as rows of T of the given shape
// ([count, 784] or [count, 1, 28, 28]): done once, up front.
template <class T>
Tensor<T> to_rows(const ImageSet& s, const Shape& shape) {
  Tensor<T> rows(shape);
  MIXPREC_CHECK(rows.numel() == static_cast<std::int64_t>(s.pixels.size()), "to_rows: shape ", shape, " for ",
                s.count, " images");
  for (std::size_t i = 0; i < s.pixels.size(); ++i) {
    rows.data()[i] = from_float<T>((s.pixels[i] / 255.0f - 0.2860f) / 0.3530f);
  }
  return rows;
}

// One line per epoch, redrawn in place on a terminal while the epoch runs
// (elsewhere only the finished line is printed).
struct Progress {
  bool tty = isatty(fileno(stdout)) != 0;
  bool quiet = false;  // ranks other than 0 of a data-parallel run
  // `status`: the monitor's line (empty without one).
  void draw(int epoch, std::int64_t done, std::int64_t steps, double loss, float scale, std::int64_t skipped,
            double images_per_s, const std::string& status) const {
    if (!tty || quiet) return;
    const int width = 20, filled = static_cast<int>(width * done / steps);
    std::printf("\repoch %2d [%s%s] %3d%%  loss %.4f  scale %-8g  skipped %3lld  %8.0f images/s%s%s\033[K", epoch,
                std::string(static_cast<std::size_t>(filled), '#').c_str(),
                std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                static_cast<int>(100 * done / steps), loss, scale, static_cast<long long>(skipped), images_per_s,
                status.empty() ? "" : "  ", status.c_str());
    std::fflush(stdout);
  }
  void finish(int epoch, double loss, float scale, std::int64_t skipped, double images_per_s, double accuracy,
              const std::string& status) const {
    if (quiet) return;
    std::printf("%sepoch %2d  loss %.4f  scale %-8g  skipped %3lld  %8.0f images/s  test accuracy %.4f%s%s%s\n",
                tty ? "\r" : "", epoch, loss, scale, static_cast<long long>(skipped), images_per_s, accuracy,
                status.empty() ? "" : "  ", status.c_str(), tty ? "\033[K" : "");
    std::fflush(stdout);
  }
};

/// What an example defines: the image shape one sample has (without the
/// batch) and the layers, added to a Sequential<T> on a device.
template <class T>
using AddLayers = void (*)(nn::Sequential<T>& net, const Args& a, Device device);

inline Shape with_batch(std::int64_t batch, const std::vector<std::int64_t>& sample) {
  std::vector<std::int64_t> dims{batch};
  dims.insert(dims.end(), sample.begin(), sample.end());
  return Shape(dims);
}

// The network, its optimizer and the data: the same on either device.
template <class T>
struct Model {
  Model(const Args& a, Device dev, stream_t stream, const ImageSet& train_set, const ImageSet& test_set,
        const std::vector<std::int64_t>& sample, AddLayers<T> add_layers)
      : net(with_batch(a.batch, sample), dev),
        train(to_rows<T>(train_set, with_batch(train_set.count, sample)).view(), train_set.labels, a.batch, dev,
              stream),
        test(to_rows<T>(test_set, with_batch(test_set.count, sample)).view(), test_set.labels, a.batch, dev,
             stream) {
    add_layers(net, a, dev);
    if (a.zero1) return;  // run_cpu builds the sharded optimizer
    opt = make_optimizer(a, net.parameters());
    if (a.schedule == "cosine") opt->set_schedule(optim::LRSchedule::cosine(a.epochs * train.full_batches()));
  }
  nn::Sequential<T> net;
  data::Batches<T> train, test;
  std::unique_ptr<optim::Optimizer> opt;
};

inline monitor::MonitorOptions monitor_options(const Args& a) {
  monitor::MonitorOptions o;
  o.every = a.monitor_every;
  o.log_path = a.monitor_log;
  return o;
}
inline std::string monitor_status(const std::optional<monitor::Monitor>& mon) {
  return mon ? mon->status_line() : std::string();
}

// Rank r's share of an epoch in a data-parallel run: every rank shuffles
// with the same generator, and rank r takes every size-th image from the r-th
// (the rest follows, unused, to complete the permutation Batches wants).
inline std::vector<std::int32_t> shard_order(std::int64_t n, std::mt19937_64& rng, int rank, int size) {
  std::vector<std::int32_t> perm = identity(n);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<std::int32_t> order;
  std::vector<char> taken(static_cast<std::size_t>(n), 0);
  for (std::int64_t k = rank; k < n; k += size) {
    order.push_back(perm[static_cast<std::size_t>(k)]);
    taken[static_cast<std::size_t>(k)] = 1;
  }
  for (std::int64_t k = 0; k < n; ++k) {
    if (!taken[static_cast<std::size_t>(k)]) order.push_back(perm[static_cast<std::size_t>(k)]);
  }
  return order;
}

// The CPU: plain calls, the host GradScaler. Data parallel over `comm`
// when it has several ranks (mpirun): each rank trains on its share of
// every epoch with --batch images a step, the gradients are summed over the
// ranks (dist::GradientReducer) and averaged in the unscale; rank 0 prints.
// With --zero1 on, each rank keeps the masters and moments of its slice of
// the parameters (dist::ShardedOptimizer): the gradients are
// reduce-scattered and the updated weights all-gathered.
template <class T>
double run_cpu(const Args& a, const ImageSet& train_set, const ImageSet& test_set,
               const std::vector<std::int64_t>& sample, AddLayers<T> add_layers, dist::Communicator& comm) {
  const int ranks = comm.size(), rank = comm.rank();
  Model<T> m(a, Device::cpu(), nullptr, train_set, test_set, sample, add_layers);
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(dtype_of<T>));
  scaler.set_grad_divisor(ranks);
  std::unique_ptr<dist::ZeroOne> zero;
  if (a.zero1) {
    zero = make_zero1(a, comm, m.net.parameters());
    scaler.set_stats_reducer(zero->stats_reducer());
  }
  optim::Optimizer& opt = zero ? zero->optimizer() : *m.opt;
  std::optional<dist::GradientReducer> reducer;
  if (!zero) reducer.emplace(comm, opt);
  std::optional<monitor::Monitor> mon;  // with --zero1, it watches rank 0's slice
  if (a.monitor && rank == 0) mon.emplace(opt, scaler, monitor_options(a));
  Progress progress;
  progress.quiet = rank != 0;
  std::mt19937_64 rng(a.seed);
  // The last partial batch is dropped; data parallel: of each rank's share.
  const std::int64_t steps = ranks == 1 ? m.train.full_batches() : m.train.size() / ranks / a.batch;
  MIXPREC_CHECK(steps > 0, "--batch = ", a.batch, " x ", ranks, " ranks: more than the ", m.train.size(),
                " training images");
  if ((ranks > 1 || zero) && a.schedule == "cosine") opt.set_schedule(optim::LRSchedule::cosine(a.epochs * steps));
  double accuracy = 0;
  for (int epoch = 1; epoch <= a.epochs; ++epoch) {
    if (ranks == 1) {
      m.train.shuffle(rng);
    } else {
      m.train.set_order(shard_order(m.train.size(), rng, rank, ranks));
    }
    const std::int64_t skipped_before = scaler.skipped_steps();
    const auto start = std::chrono::steady_clock::now();
    double loss_sum = 0;
    auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
    for (std::int64_t s = 1; s <= steps; ++s) {
      m.train.next();
      const float loss = nn::softmax_cross_entropy<T>(m.net.forward(m.train.x()), m.train.labels(), scaler.scale(),
                                                      m.net.output_grad());
      loss_sum += loss;
      m.net.backward();
      // The sum over the ranks; the mean is taken in the unscale.
      if (zero) {
        zero->reduce_gradients();  // of this rank's slice
      } else if (ranks > 1) {
        reducer->reduce();
      }
      if (mon) {
        mon->step(loss);  // scaler.step + scaler.update, watched
      } else {
        scaler.step(opt);
        scaler.update();
      }
      if (zero) zero->gather_weights();
      if (s % 10 == 0) {
        progress.draw(epoch, s, steps, loss_sum / s, scaler.scale(), scaler.skipped_steps() - skipped_before,
                      s * a.batch * ranks / seconds(), monitor_status(mon));
      }
    }
    const double images_per_s = steps * a.batch * ranks / seconds();  // every rank's images
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
                    images_per_s, accuracy, monitor_status(mon));
  }
  return accuracy;
}

// The GPU: the data lives on the device and one training step (batch,
// forward, loss, backward, unscale + inf check, AdamW, scale update) is
// captured once in a CUDA graph and replayed for every step. Nothing inside
// an epoch waits for the device: the loss is summed on the device, and the
// progress line reads a pinned copy queued a tenth of an epoch earlier.
template <class T>
double run_gpu(const Args& a, const ImageSet& train_set, const ImageSet& test_set,
               const std::vector<std::int64_t>& sample, AddLayers<T> add_layers) {
  const Device dev = Device::cuda(0);
  Stream stream(dev);
  const nn::Context ctx{stream.get()};
  Model<T> m(a, dev, stream.get(), train_set, test_set, sample, add_layers);
  m.opt->set_stream(stream.get());  // its reads (lr, step counts) wait for this stream
  amp::DeviceGradScaler scaler(amp::GradScalerOptions::for_dtype(dtype_of<T>), dev, stream.get());
  std::optional<monitor::Monitor> mon;
  if (a.monitor) mon.emplace(*m.opt, scaler, monitor_options(a));
  // Device scalars: [0] the step's loss, [1] a bad-label flag, [2] the
  // epoch's loss sum, then the test set's correct count (int64).
  Buffer scalars(4 * sizeof(float) + sizeof(std::int64_t), dev);
  float* loss = static_cast<float*>(scalars.data());
  auto* correct = reinterpret_cast<std::int64_t*>(loss + 4);
  struct Snapshot {
    int bad_label;   // scalars [1]
    float loss_sum;  // scalars [2]
    amp::DeviceScalerState scaler;
  };
  static_assert(offsetof(Snapshot, loss_sum) == sizeof(int), "one copy reads scalars [1] and [2]");
  PinnedBuffer snapshots(2 * sizeof(Snapshot));
  Event ticks[2] = {Event(dev), Event(dev)}, epoch_start(dev), epoch_end(dev);

  auto step = [&] {
    m.train.next();
    nn::softmax_cross_entropy<T>(m.net.forward(m.train.x(), ctx), m.train.labels(), scaler.scale_data(),
                                 m.net.output_grad(), loss, reinterpret_cast<int*>(loss + 1), ctx);
    nn::accumulate(dev, loss + 2, loss, ctx);
    m.net.backward(ctx);
    if (mon) {
      mon->step(loss);  // scaler.step + scaler.update, watched
    } else {
      scaler.step(*m.opt);
      scaler.update();
    }
  };
  auto snapshot = [&](int slot) {  // queues the copy; read after ticks[slot]
    auto* s = static_cast<Snapshot*>(snapshots.data()) + slot;
    copy_to_host_async(snapshots, slot * sizeof(Snapshot), loss + 1, 2 * sizeof(float), stream.get());
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
  // A plain and a logged step (the monitor's logged steps do more work).
  Graph graphs[2];
  bool first = true;
  double accuracy = 0;
  std::int64_t skipped_total = 0;
  for (int epoch = 1; epoch <= a.epochs; ++epoch) {
    m.train.shuffle(rng);
    zero(loss + 1, 2 * sizeof(float));  // the bad-label flag and the loss sum
    epoch_start.record(stream.get());
    for (std::int64_t s = 1; s <= steps; ++s) {
      if (!a.graph || first) {
        step();  // eager; the first step also makes every plan and buffer
        first = false;
      } else {
        Graph& graph = graphs[mon && mon->logs_next() ? 1 : 0];
        if (graph.empty()) graph.capture(stream.get(), step);
        graph.replay(stream.get());
        if (mon) mon->replayed();
      }
      if (s % tick == 0 && s < steps) {  // progress, a tick behind
        snapshot(static_cast<int>(s / tick % 2));
        if (s >= 2 * tick) {
          const int prev = static_cast<int>((s / tick + 1) % 2);  // the snapshot of step s - tick
          ticks[prev].synchronize();  // recorded a tick ago; the device still has a tick queued
          const Snapshot* p = static_cast<const Snapshot*>(snapshots.data()) + prev;
          const std::int64_t done = s - tick;
          progress.draw(epoch, done, steps, p->loss_sum / done, p->scaler.state.scale,
                        p->scaler.skipped - skipped_total, done * a.batch / (1e-3 * ticks[prev].elapsed_ms(epoch_start)),
                        monitor_status(mon));
          scaler.check_errors();
        }
      }
    }
    epoch_end.record(stream.get());
    const Snapshot* end = snapshot(0);
    ticks[0].synchronize();
    if (mon) mon->flush();  // the device is idle: nothing waits
    const double images_per_s = steps * a.batch / (1e-3 * epoch_end.elapsed_ms(epoch_start));
    MIXPREC_CHECK(end->bad_label == 0, "a training label is outside [0, 10)");
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
    progress.finish(epoch, end->loss_sum / steps, end->scaler.state.scale, skipped, images_per_s, accuracy,
                    monitor_status(mon));
  }
  return accuracy;
}

/// Loads Fashion-MNIST, prints a header line, trains with the precision
/// and device of `a` (the layers from add_layers<T>) and returns the exit
/// code: 0, or 1 on an error or an accuracy below --min-accuracy.
/// The ranks of this run: MPI's when it was started by mpirun and the
/// examples were built with MPI, else one.
inline std::unique_ptr<dist::Communicator> make_communicator() {
#if MIXPREC_EXAMPLES_WITH_MPI
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(v) != nullptr) return std::make_unique<dist::MpiCommunicator>();
  }
#endif
  return std::make_unique<dist::LocalCommunicator>();
}

template <template <class> class AddLayersFor>
int train_classifier(const Args& a, const std::vector<std::int64_t>& sample, const std::string& description) {
  std::unique_ptr<dist::Communicator> comm;
  try {
    comm = make_communicator();
    dist::Communicator& c = *comm;
    MIXPREC_CHECK(!a.zero1 || a.device == "cpu", "--zero1 on: ZeRO-1 shards host parameters only; run the ranks "
                  "with --device cpu");
    if (c.size() > 1) {
      MIXPREC_CHECK(a.device == "cpu", "data parallel runs on the GPU (NCCL) are not in this build yet; "
                    "run the ranks with --device cpu");
      if (c.rank() != 0) (void)std::freopen("/dev/null", "w", stdout);  // rank 0 reports
      std::printf("data parallel: %d ranks (%s), batch %lld per rank%s\n", c.size(), c.backend(),
                  static_cast<long long>(a.batch), a.zero1 ? ", ZeRO-1" : "");
    }
    const ImageSet train = load_fashion_mnist(a.data, "train");
    const ImageSet test = load_fashion_mnist(a.data, "t10k");
    MIXPREC_CHECK(a.batch <= train.count, "--batch = ", a.batch, ", larger than the ", train.count,
                  " training images");
    std::printf("%s: %s on %s, %s, batch %lld, %s lr %g%s, %d epochs%s\n", a.program.c_str(), a.precision.c_str(),
                a.device.c_str(), description.c_str(), static_cast<long long>(a.batch), a.optimizer.c_str(), a.lr,
                a.schedule == "cosine" ? " cosine" : "", a.epochs,
                a.device == "cuda" ? (a.graph ? ", CUDA graph" : ", eager") : "");
    if (a.monitor) {
      std::printf("monitor: a logged step every %d steps%s%s\n", a.monitor_every,
                  a.monitor_log.empty() ? "" : ", log ", a.monitor_log.c_str());
    }
    const bool gpu = a.device == "cuda";
    double accuracy = 0;
    if (a.precision == "fp16") {
      accuracy = gpu ? run_gpu<half>(a, train, test, sample, AddLayersFor<half>::add)
                     : run_cpu<half>(a, train, test, sample, AddLayersFor<half>::add, c);
    } else if (a.precision == "bf16") {
      accuracy = gpu ? run_gpu<bfloat16>(a, train, test, sample, AddLayersFor<bfloat16>::add)
                     : run_cpu<bfloat16>(a, train, test, sample, AddLayersFor<bfloat16>::add, c);
    } else {
      accuracy = gpu ? run_gpu<float>(a, train, test, sample, AddLayersFor<float>::add)
                     : run_cpu<float>(a, train, test, sample, AddLayersFor<float>::add, c);
    }
    if (accuracy < a.min_accuracy) {
      std::fprintf(stderr, "%s: test accuracy %.4f < --min-accuracy %.4f\n", a.program.c_str(), accuracy,
                   a.min_accuracy);
      return 1;
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: %s\n", a.program.c_str(), e.what());
    // The other ranks would wait for this one in their next all-reduce.
    if (comm && comm->size() > 1) {
      std::fflush(stderr);
      comm->abort(1);
    }
    return 1;
  }
}

}  // namespace mixprec::examples

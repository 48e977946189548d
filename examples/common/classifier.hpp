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
// accuracy. --checkpoint saves the training state (and the data position)
// every --checkpoint-every steps and at the end, --resume goes on from such
// a file with the bits of the uninterrupted run, --report writes the
// monitor's HTML page at the end.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <memory>
#include <numeric>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <mixprec/dist/communicator.hpp>
#include <mixprec/dist/reducer.hpp>
#include <mixprec/dist/sharded.hpp>
#include <mixprec/mixprec.hpp>
#include <mixprec/monitor/report.hpp>
#if MIXPREC_EXAMPLES_WITH_MPI
#include <mixprec/dist/mpi.hpp>
#endif
#if MIXPREC_EXAMPLES_WITH_NCCL
#include <mixprec/dist/nccl_mpi.hpp>
#endif

#include "cli.hpp"
#include "fashion_mnist.hpp"

namespace mixprec::examples {

/// The flags both examples take (see the top of each example, or --help).
struct Args {
  std::string program, description, precision = "fp16", device, optimizer = "adamw", schedule = "cosine",
                                    data = default_fashion_mnist_dir();
  int epochs = 10;
  std::int64_t batch = 256, hidden = 1024;
  double lr = 1e-3, min_accuracy = 0;
  std::uint64_t seed = 0;
  // The optimizer's state layout (docs/optimizers.md#lean-state): fp32 (the
  // default), or bf16 (rounded to nearest or stochastically) / 8-bit
  // moments and a remainder / no master.
  std::string moments = "fp32", master = "fp32";
  bool graph = true;
  // How cuBLASLt's algorithm is chosen per GEMM shape (nn::GemmAlgorithms):
  // its heuristic's first (the same bits in every run), or timed candidates.
  std::string gemm = "heuristic";
  // Layers of <= 16 outputs through mixprec's own kernels (nn::set_narrow_linear).
  bool narrow_linear = false;
  // GPU: each training step's time (CUDA events between steps) written
  // here, a line a step (benchmarks/monitor_overhead.py --step-times).
  std::string step_times;
  bool zero1 = false;  // data parallel: ZeRO-1 (masters and moments sharded over the ranks)
  // The spike guard (docs/grad-scaler.md#spike-guard): skip steps whose loss
  // or gradient norm is an outlier; under mpirun the norm only (each rank's
  // loss is its own, and the ranks must decide alike).
  bool spike_guard = false;
  // The instability monitor (docs/monitor.md): on by default, a logged
  // step every monitor_every steps, a JSONL log when monitor_log is set
  // (or report is: then beside the report), an HTML report at the end.
  bool monitor = true;
  int monitor_every = 10;
  std::string monitor_log, report;
  // Per-layer precision fallback (docs/monitor.md): off, suggest or act when
  // the monitor finds a layer that keeps overflowing fp16 (one process; on
  // the GPU a move drops the captured graphs, as an lr jump does).
  std::string precision_fallback = "off";
  // Checkpoints (docs/checkpoints.md): saved to `checkpoint` every
  // checkpoint_every steps (0: only at the end) and at the end of the run or
  // at stop_at_step (0: none); `resume` is loaded before the first step.
  std::string checkpoint, resume;
  std::int64_t checkpoint_every = 0, stop_at_step = 0;
  // Induced failures (benchmarks/instability): from step lr_jump_step
  // on (0: never) every group's lr is lr_jump_factor times larger; a static
  // loss scale of static_scale (0: the dtype's default scaling); Adam's and
  // AdamW's eps (0: torch's 1e-8).
  std::int64_t lr_jump_step = 0;
  double lr_jump_factor = 1.0, static_scale = 0, eps = 0;
};

/// Parses argv over the defaults in `a` (a.program names the example,
/// a.description says what it trains); --hidden only where `takes_hidden`.
/// Returns -1 when the program goes on, else its exit code: 0 after
/// --help, 2 after a usage error (both printed by CLI11, the error with
/// the allowed choices or range).
inline int parse(int argc, char** argv, Args& a, bool takes_hidden) {
  CLI::App app(a.program + ": " + a.description, a.program);
  app.option_defaults()->always_capture_default();
  app.get_formatter()->column_width(34);
  app.footer("Started by mpirun it trains data parallel on CPU ranks (docs/distributed.md). Flags take "
             "--flag value or --flag=value.");
  app.add_option("--precision", a.precision, "the model's type (the optimizer's state: --moments, --master)")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32"}));
  app.add_option("--device", a.device, "where to train")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->default_str("cuda when usable, else cpu");
  app.add_option("--epochs", a.epochs, "passes over the training set")->type_name("N")->check(CLI::Range(1, 100000));
  app.add_option("--batch", a.batch, "images a step (per rank under mpirun); at most the training set")
      ->type_name("N")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 20));
  if (takes_hidden) {
    app.add_option("--hidden", a.hidden, "width of the two hidden layers")
        ->type_name("N")
        ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 16));
  }
  app.add_option("--optimizer", a.optimizer,
                 "torch.optim's defaults but lr (SGD: momentum 0.9; Lion: the paper's betas, give it a 3-10x "
                 "smaller --lr; LAMB: apex FusedLAMB's)")
      ->check(CLI::IsMember({"sgd", "adam", "adamw", "rmsprop", "lion", "lamb"}));
  app.add_option("--moments", a.moments,
                 "how the optimizer keeps its moments (bf16: rounded to nearest; bf16sr: stochastic rounding, "
                 "unbiased; 8bit: a 256-value block's code)")
      ->check(CLI::IsMember({"fp32", "bf16", "bf16sr", "8bit"}));
  app.add_option("--master", a.master,
                 "the fp32 master: a copy, a remainder beside bf16 weights (exact), or none (stochastic rounding)")
      ->check(CLI::IsMember({"fp32", "remainder", "none"}));
  app.add_option("--lr", a.lr, "the learning rate")->type_name("X")->check(finite_at_least(0));
  app.add_option("--schedule", a.schedule, "cosine: CosineAnnealingLR to 0 over the run, per step")
      ->check(CLI::IsMember({"constant", "cosine"}));
  app.add_option("--seed", a.seed, "initial weights and shuffling")
      ->type_name("N")
      ->check(CLI::Range(std::uint64_t{0}, std::uint64_t{1} << 40));
  app.add_option("--data", a.data, "Fashion-MNIST's IDX files ($MIXPREC_FASHION_MNIST, else the Debian package's)")
      ->type_name("DIR");
  add_on_off(app, "--graph", a.graph, "GPU: replay each step as a CUDA graph (off: eager launches)");
  app.add_option("--gemm", a.gemm,
                 "GPU: cuBLASLt's algorithm for each GEMM shape: its heuristic's first (the same bits in every run) "
                 "or the fastest of its candidates, timed at the shape's first call (runs may then differ in the "
                 "last bits)")
      ->check(CLI::IsMember({"heuristic", "timed"}));
  add_on_off(app, "--narrow-linear", a.narrow_linear,
             "GPU: layers of at most 16 outputs through mixprec's own kernels (on) or cuBLASLt's GEMMs (off)");
  app.add_option("--step-times", a.step_times,
                 "GPU: each step's time from CUDA events recorded between steps, a tab-separated line a step "
                 "(epoch, step, logged by the monitor, ms), written at each epoch's end")
      ->type_name("FILE.tsv");
  add_on_off(app, "--zero1", a.zero1, "under mpirun: shard masters and moments over the ranks (ZeRO-1)");
  add_on_off(app, "--spike-guard", a.spike_guard,
             "skip steps whose loss or gradient norm is a z > 6 outlier over the last 128 (under mpirun: the norm "
             "only); counted apart from overflow skips");
  app.add_option("--min-accuracy", a.min_accuracy, "exit 1 when the final test accuracy is below it")
      ->type_name("X")
      ->check(finite_at_least(0));
  add_on_off(app, "--monitor", a.monitor, "the instability monitor (docs/monitor.md)");
  app.add_option("--monitor-every", a.monitor_every, "a logged step every K steps")
      ->type_name("K")
      ->check(CLI::Range(1, 1000000));
  app.add_option("--monitor-log", a.monitor_log, "the monitor's JSONL log")->type_name("FILE.jsonl");
  app.add_option("--report", a.report,
                 "the monitor's HTML report, written at the end (its log: --monitor-log, else FILE with .jsonl)")
      ->type_name("FILE.html");
  app.add_option("--precision-fallback", a.precision_fallback,
                 "a layer the monitor finds overflowing (or underflowing) fp16: act moves it to fp32, suggest says "
                 "so, off ignores it (one process)")
      ->check(CLI::IsMember({"off", "suggest", "act"}));
  CLI::Option* checkpoint =
      app.add_option("--checkpoint", a.checkpoint, "save the training state here (safetensors) at the end")
          ->type_name("PATH");
  app.add_option("--checkpoint-every", a.checkpoint_every, "also every N steps (0: only at the end)")
      ->type_name("N")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40))
      ->needs(checkpoint);
  app.add_option("--resume", a.resume, "load a --checkpoint file first and go on where it stopped")
      ->type_name("PATH");
  app.add_option("--lr-jump-step", a.lr_jump_step,
                 "induce a failure: multiply the lr by --lr-jump-factor after step N (0: never)")
      ->type_name("N")->check(CLI::NonNegativeNumber);
  app.add_option("--lr-jump-factor", a.lr_jump_factor, "the lr's factor at --lr-jump-step")
      ->type_name("X")->check(finite_at_least(0));
  app.add_option("--static-scale", a.static_scale,
                 "a static loss scale instead of the dtype's default scaling (0: the default)")
      ->type_name("X")->check(finite_at_least(0));
  app.add_option("--eps", a.eps, "Adam's and AdamW's eps (0: torch's 1e-8)")->type_name("X")->check(finite_at_least(0));
  app.add_option("--stop-at-step", a.stop_at_step,
                 "stop after step N of the run (saving --checkpoint); the schedule still spans --epochs")
      ->type_name("N")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40))
      ->default_str("none");
  if (const int rc = parse_flags(app, argc, argv); rc >= 0) return rc;

  auto usage_error = [&](const std::string& what) {
    std::fprintf(stderr, "%s: %s\nRun with --help for more information.\n", a.program.c_str(), what.c_str());
    return 2;
  };
  if (!a.report.empty()) {
    if (!a.monitor) return usage_error("--report " + a.report + " needs the monitor: drop --monitor off");
    if (a.monitor_log.empty()) a.monitor_log = std::filesystem::path(a.report).replace_extension(".jsonl").string();
    if (a.monitor_log == a.report) return usage_error("--report and the monitor's log are both " + a.report);
  }
  if (a.precision_fallback != "off") {
    const std::string flag = "--precision-fallback " + a.precision_fallback;
    if (!a.monitor) return usage_error(flag + " needs the monitor (its events find the layer): drop --monitor off");
    if (a.precision == "fp32") return usage_error(flag + " with --precision fp32: no layer computes in fp16 or bf16");
    if (a.zero1) {
      return usage_error(flag + " with --zero1 on: a rank's optimizer holds a slice of the parameters, not the "
                         "model's tensors a move replaces");
    }
  }
  if (a.optimizer == "lamb" && a.zero1) {
    // A rank's optimizer holds a slice of the parameters: LAMB's norms are
    // of whole tensors, its gradient clamp of every parameter.
    return usage_error("--optimizer lamb with --zero1 on: LAMB's per-tensor norms need whole tensors, a rank "
                       "holds a slice");
  }
  if (a.lr_jump_step > 0 && !a.resume.empty()) {
    return usage_error("--lr-jump-step with --resume: the jump is not kept in the checkpoint");
  }
  if (a.eps > 0 && a.optimizer != "adam" && a.optimizer != "adamw") {
    return usage_error("--eps is Adam's and AdamW's, not --optimizer " + a.optimizer + "'s");
  }
  if (a.master == "remainder" && a.precision != "bf16") {
    return usage_error("--master remainder needs --precision bf16 (the weight is the master's upper half), not " +
                       a.precision);
  }
  const bool lean = a.moments != "fp32" || a.master != "fp32";
  if (lean && a.zero1 && (a.moments == "8bit" || a.moments == "bf16sr" || a.master == "none")) {
    return usage_error("--zero1 on shards fp32 or bf16 moments with an fp32 or remainder master, not --moments " +
                       a.moments + " --master " + a.master);
  }
  const bool usable = cuda_available() && optim::device_backend() != nullptr;
  if (a.device.empty()) a.device = usable ? "cuda" : "cpu";
  if (a.device == "cuda" && a.monitor && a.master != "fp32") {
    return usage_error("--master " + a.master + " on the GPU: the device monitor reads fp32 masters; add --monitor off "
                       "or keep --master fp32");
  }
  if (a.device == "cpu" && a.gemm != "heuristic") {
    return usage_error("--gemm " + a.gemm + " with --device cpu: the choice is cuBLASLt's, on the GPU");
  }
  if (a.device == "cpu" && a.narrow_linear) {
    return usage_error("--narrow-linear on with --device cpu: the choice is between GPU kernels");
  }
  if (a.device == "cpu" && !a.step_times.empty()) {
    return usage_error("--step-times " + a.step_times + " with --device cpu: the times come from CUDA events");
  }
  if (a.device == "cuda" && !usable) {
    return usage_error(std::string("no CUDA device: --device cuda, but ") +
                       (cuda_available() ? "no CUDA kernels are linked into this build" : "no CUDA device is usable"));
  }
  return -1;
}

template <class T>
struct Tag {
  using type = T;
};

// Calls make(options, Tag<Opt>{}) with the optimizer of `a` and its options:
// torch.optim's defaults but lr (SGD: momentum 0.9).
// The optimizer's state layout from --moments and --master (the run's seed
// drives stochastic rounding).
inline optim::StateLayout layout_of(const Args& a) {
  optim::StateLayout l;
  l.moments = optim::parse_moments(a.moments);
  l.master = optim::parse_master(a.master);
  l.seed = a.seed;
  return l;
}

template <class R, class F>
R with_optimizer(const Args& a, F&& make) {
  if (a.optimizer == "sgd") {
    optim::SGDOptions o;
    o.lr = a.lr;
    o.layout = layout_of(a);
    o.momentum = 0.9;
    return make(o, Tag<optim::SGD>{});
  }
  if (a.optimizer == "adam") {
    optim::AdamOptions o;
    o.lr = a.lr;
    o.layout = layout_of(a);
    if (a.eps > 0) o.eps = a.eps;
    return make(o, Tag<optim::Adam>{});
  }
  if (a.optimizer == "rmsprop") {
    optim::RMSpropOptions o;
    o.lr = a.lr;
    o.layout = layout_of(a);
    return make(o, Tag<optim::RMSprop>{});
  }
  if (a.optimizer == "lamb") {
    optim::LambOptions o;
    o.lr = a.lr;
    o.layout = layout_of(a);  // lean layouts are refused by name (LAMB's pre-pass reads fp32 state)
    return make(o, Tag<optim::LAMB>{});
  }
  if (a.optimizer == "lion") {
    optim::LionOptions o;
    o.lr = a.lr;
    o.layout = layout_of(a);
    return make(o, Tag<optim::Lion>{});
  }
  optim::AdamWOptions o;
  o.lr = a.lr;
  o.layout = layout_of(a);
  if (a.eps > 0) o.eps = a.eps;
  return make(o, Tag<optim::AdamW>{});
}

inline std::unique_ptr<optim::Optimizer> make_optimizer(const Args& a, std::vector<optim::Param> params) {
  return with_optimizer<std::unique_ptr<optim::Optimizer>>(a, [&](const auto& o, auto tag) {
    using Opt = typename decltype(tag)::type;
    return std::unique_ptr<optim::Optimizer>(std::make_unique<Opt>(std::move(params), o));
  });
}

// ZeRO-1 over `comm` with the optimizer of `a` (the same options as
// make_optimizer's). Cut at elements: the MLP's first layer holds 85% of
// its parameters, so cuts at parameters would leave one rank most of the
// state; the examples do not clip, so on CPU ranks the bits are plain data
// parallelism's either way (NCCL with 3 or more ranks may add in another
// order; docs/distributed.md).
inline std::unique_ptr<dist::ZeroOne> make_zero1(const Args& a, dist::Communicator& comm,
                                                 std::vector<optim::Param> params) {
  const dist::ShardOptions cut{dist::ShardOptions::Cut::elements};
  return with_optimizer<std::unique_ptr<dist::ZeroOne>>(a, [&](const auto& o, auto tag) {
    using Opt = typename decltype(tag)::type;
    return std::unique_ptr<dist::ZeroOne>(
        std::make_unique<dist::ShardedOptimizer<Opt>>(comm, std::move(params), o, cut));
  });
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
    if (a.zero1) return;  // run_cpu / run_gpu build the sharded optimizer
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
// The monitor of this process (rank 0's; none with --monitor off): a
// resumed run's goes on from the checkpoint's state (`state`, empty: none)
// and appends to the same log.
template <class Scaler>
void start_monitor(std::optional<monitor::Monitor>& mon, const Args& a, int rank, optim::Optimizer& opt,
                   Scaler& scaler, const std::string& state) {
  if (!a.monitor || rank != 0) return;
  monitor::MonitorOptions mo = monitor_options(a);
  mo.append_log = !state.empty();
  mon.emplace(opt, scaler, mo);
  if (!state.empty()) mon->load_state(state);  // before the first step
}
// The monitor's state a checkpoint holds ("": none).
inline std::string saved_monitor_state(const io::CheckpointExtras& x) {
  const auto it = x.metadata.find("monitor.state");
  return it != x.metadata.end() ? it->second : std::string();
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

// Where a run stands, for --checkpoint and --resume: the epoch (from 1),
// the steps done in it, the shuffling generator as it was when the epoch
// began (a resumed run shuffles again from it and skips the steps done, so
// it sees the same batches), and the epoch's figures for its line.
struct RunPosition {
  int epoch = 1;
  std::int64_t step = 0;             // steps done in `epoch`
  std::mt19937_64 epoch_rng;         // at the start of `epoch`, before its shuffle
  double loss_sum = 0;               // the epoch's train loss so far
  std::int64_t skipped_before = 0;   // the scaler's skipped steps when the epoch began
};

// A resume of a run with --precision-fallback: the checkpoint's fallback
// state (its metadata's "precision_fallback.state"; "" when there is none)
// and, before the checkpoint's weights are loaded (they are in the layers'
// saved precisions), the layers put in those precisions.
template <class T>
std::string restore_fallback_precisions(const std::string& path, nn::Sequential<T>& net, optim::Optimizer& opt) {
  const std::map<std::string, std::string> meta = io::read_checkpoint_metadata(path);
  const auto it = meta.find("precision_fallback.state");
  if (it == meta.end()) return "";
  monitor::restore_precisions(net, opt, it->second);  // on a device: synchronises
  return it->second;
}

// The fallback state a checkpoint keeps: the running fallback's, else the
// one the run resumed with (the moved layers stay moved).
template <class T>
void keep_fallback_state(io::CheckpointExtras& x, const std::optional<monitor::PrecisionFallback<T>>& fallback,
                         const std::string& resumed) {
  if (fallback) {
    x.metadata["precision_fallback.state"] = fallback->save_state();
  } else if (!resumed.empty()) {
    x.metadata["precision_fallback.state"] = resumed;
  }
}

// The position as the checkpoint's extras (the strings are exact: the
// loss sum as a C99 hex float). Points at p.epoch_rng.
inline io::CheckpointExtras checkpoint_extras(const Args& a, RunPosition& p, std::int64_t steps) {
  char loss_sum[40];
  std::snprintf(loss_sum, sizeof loss_sum, "%a", p.loss_sum);
  io::CheckpointExtras x;
  x.rng = &p.epoch_rng;
  x.metadata = {{"example", a.program},
                {"epoch", std::to_string(p.epoch)},
                {"step", std::to_string(p.step)},
                {"steps_per_epoch", std::to_string(steps)},
                {"loss_sum", loss_sum},
                {"skipped_at_epoch_start", std::to_string(p.skipped_before)}};
  return x;
}

// The position a --resume file holds, checked against this run: the same
// example, the same steps an epoch (--batch, and the ranks), an epoch this
// run reaches. Throws Error naming the file.
inline RunPosition resume_position(const Args& a, const io::CheckpointExtras& x, const std::mt19937_64& rng,
                                   std::int64_t steps) {
  auto field = [&](const char* key) -> const std::string& {
    const auto it = x.metadata.find(key);
    MIXPREC_CHECK(it != x.metadata.end(), "--resume ", a.resume, ": no \"", key,
                  "\" in its metadata; was it saved by an example's --checkpoint?");
    return it->second;
  };
  auto whole = [&](const char* key, std::int64_t low, std::int64_t high) {
    const std::string& v = field(key);
    char* end = nullptr;
    errno = 0;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    MIXPREC_CHECK(!v.empty() && *end == '\0' && errno == 0 && n >= low && n <= high, "--resume ", a.resume, ": ",
                  key, " = \"", v, "\", must be a whole number in [", low, ", ", high, "]");
    return static_cast<std::int64_t>(n);
  };
  MIXPREC_CHECK(field("example") == a.program, "--resume ", a.resume, ": saved by ", field("example"), ", not ",
                a.program);
  const std::int64_t saved_steps = whole("steps_per_epoch", 1, std::int64_t{1} << 40);
  MIXPREC_CHECK(saved_steps == steps, "--resume ", a.resume, ": saved with ", saved_steps,
                " steps an epoch, this run has ", steps, " (--batch and the number of ranks must stay the same)");
  RunPosition p;
  p.epoch = static_cast<int>(whole("epoch", 1, a.epochs));
  p.step = whole("step", 0, steps);
  p.skipped_before = whole("skipped_at_epoch_start", 0, std::numeric_limits<std::int64_t>::max());
  const std::string& sum = field("loss_sum");
  char* end = nullptr;
  p.loss_sum = std::strtod(sum.c_str(), &end);
  MIXPREC_CHECK(!sum.empty() && *end == '\0', "--resume ", a.resume, ": loss_sum = \"", sum, "\" is not a number");
  p.epoch_rng = rng;
  return p;
}

// The checkpoint schedule over the run's steps 1..total: every
// --checkpoint-every steps, at --stop-at-step and at the last step.
inline bool saves_at(const Args& a, std::int64_t done, std::int64_t total) {
  if (a.checkpoint.empty()) return false;
  return done == total || done == a.stop_at_step || (a.checkpoint_every > 0 && done % a.checkpoint_every == 0);
}

inline void check_stop(const Args& a, const RunPosition& p, std::int64_t steps) {
  const std::int64_t total = a.epochs * steps, done = (p.epoch - 1) * steps + p.step;
  MIXPREC_CHECK(a.stop_at_step == 0 || a.stop_at_step <= total, "--stop-at-step ", a.stop_at_step, ": the run has ",
                total, " steps (", a.epochs, " epochs of ", steps, ")");
  MIXPREC_CHECK(a.stop_at_step == 0 || a.stop_at_step > done, "--stop-at-step ", a.stop_at_step,
                ": the run resumes after step ", done);
}

inline void print_resumed(const Args& a, const RunPosition& p, std::int64_t steps) {
  std::printf("resumed from %s: epoch %d, step %lld of %lld (step %lld of the run)\n", a.resume.c_str(), p.epoch,
              static_cast<long long>(p.step), static_cast<long long>(steps),
              static_cast<long long>((p.epoch - 1) * steps + p.step));
}

inline void print_stopped(const Args& a, const RunPosition& p, std::int64_t steps) {
  std::printf("stopped after step %lld of %lld (epoch %d, step %lld of %lld)%s%s\n",
              static_cast<long long>(a.stop_at_step), static_cast<long long>(a.epochs * steps), p.epoch,
              static_cast<long long>(p.step), static_cast<long long>(steps),
              a.checkpoint.empty() ? "" : "; resume with --resume ", a.checkpoint.c_str());
  std::fflush(stdout);
}

// The CPU: plain calls, the host GradScaler. Data parallel over `comm`
// when it has several ranks (mpirun): each rank trains on its share of
// every epoch with --batch images a step, the gradients are summed over the
// ranks (dist::GradientReducer) and averaged in the unscale; rank 0 prints.
// With --zero1 on, each rank keeps the masters and moments of its slice of
// the parameters (dist::ShardedOptimizer): the gradients are
// reduce-scattered and the updated weights all-gathered. Checkpoints: rank
// 0 saves the whole state and every rank loads that file (every rank holds
// the same bits); with --zero1 on every rank saves and loads its shard.
// Returns the final test accuracy, or nothing when --stop-at-step ended
// the run first.
/// With --spike-guard, the guard's skips of the run (the epochs' "skipped"
/// counts overflows only).
inline void print_guard(const Args& a, const Progress& progress, std::int64_t skipped) {
  if (a.spike_guard && !progress.quiet) {
    std::printf("spike guard: %lld steps skipped (loss or gradient norm z > 6)\n", static_cast<long long>(skipped));
  }
}

/// The scaler's options: the dtype's defaults, and the spike guard when
/// --spike-guard is on. Data parallel, the guard judges the gradient norm
/// only: it is the reduced gradients' on every rank, while each rank's loss
/// is its own (the ranks must make the same decision).
template <class T>
amp::GradScalerOptions scaler_options(const Args& a, int ranks) {
  amp::GradScalerOptions o = amp::GradScalerOptions::for_dtype(dtype_of<T>);
  o.spike_guard.enabled = a.spike_guard;
  if (a.static_scale > 0) {  // --static-scale
    o.mode = amp::ScalingMode::static_scale;
    o.init_scale = a.static_scale;
  }
  if (ranks > 1) o.spike_guard.loss_threshold = std::numeric_limits<double>::infinity();
  return o;
}

template <class T>
std::optional<double> run_cpu(const Args& a, const ImageSet& train_set, const ImageSet& test_set,
                              const std::vector<std::int64_t>& sample, AddLayers<T> add_layers,
                              dist::Communicator& comm) {
  const int ranks = comm.size(), rank = comm.rank();
  Model<T> m(a, Device::cpu(), nullptr, train_set, test_set, sample, add_layers);
  amp::GradScaler scaler(scaler_options<T>(a, ranks));
  scaler.set_grad_divisor(ranks);
  std::unique_ptr<dist::ZeroOne> zero;
  if (a.zero1) {
    zero = make_zero1(a, comm, m.net.parameters());
    scaler.set_stats_reducer(zero->stats_reducer());
  }
  optim::Optimizer& opt = zero ? zero->optimizer() : *m.opt;
  std::optional<dist::GradientReducer> reducer;
  if (!zero) reducer.emplace(comm, opt);
  // The last partial batch is dropped; data parallel: of each rank's share.
  const std::int64_t steps = ranks == 1 ? m.train.full_batches() : m.train.size() / ranks / a.batch;
  MIXPREC_CHECK(steps > 0, "--batch = ", a.batch, " x ", ranks, " ranks: more than the ", m.train.size(),
                " training images");
  if ((ranks > 1 || zero) && a.schedule == "cosine") opt.set_schedule(optim::LRSchedule::cosine(a.epochs * steps));
  // The schedule is set: a checkpoint's must equal it.
  std::mt19937_64 rng(a.seed);
  RunPosition pos;
  std::string monitor_state;  // a resumed run's: the monitor goes on where it stopped
  std::string fallback_state;  // its layers' precisions (--precision-fallback)
  if (!a.resume.empty()) {
    io::CheckpointExtras x;
    x.rng = &rng;
    if (!zero) fallback_state = restore_fallback_precisions(a.resume, m.net, opt);  // before the weights
    if (zero) {
      zero->load_checkpoint(a.resume, scaler, &x);
    } else {
      io::load_checkpoint(a.resume, opt, scaler, &x);
    }
    pos = resume_position(a, x, rng, steps);
    monitor_state = saved_monitor_state(x);
    print_resumed(a, pos, steps);
  }
  check_stop(a, pos, steps);
  std::optional<monitor::Monitor> mon;  // with --zero1, it watches rank 0's slice
  start_monitor(mon, a, rank, opt, scaler, monitor_state);
  // Declared after the monitor: it goes first.
  std::optional<monitor::PrecisionFallback<T>> fallback;
  if (a.precision_fallback != "off") {
    MIXPREC_CHECK(ranks == 1, "--precision-fallback ", a.precision_fallback, ": one process only for now (under "
                  "mpirun the monitor runs on rank 0, and every rank's layers must stay alike)");
    monitor::PrecisionFallbackOptions fo;
    fo.policy = monitor::parse_fallback_policy(a.precision_fallback, "--precision-fallback");
    fallback.emplace(m.net, opt, *mon, fo);
    if (!fallback_state.empty()) fallback->load_state(fallback_state);
  }
  auto save = [&] {
    io::CheckpointExtras x = checkpoint_extras(a, pos, steps);
    if (mon) x.metadata["monitor.state"] = mon->save_state();
    keep_fallback_state(x, fallback, fallback_state);
    if (zero) {
      zero->save_checkpoint(a.checkpoint, scaler, x);  // every rank: its shard (rank 0 also the index)
    } else if (rank == 0) {
      io::save_checkpoint(a.checkpoint, opt, scaler, x);  // the same bits on every rank
    }
  };
  Progress progress;
  progress.quiet = rank != 0;
  const std::int64_t total = a.epochs * steps;
  const int first_epoch = pos.epoch;
  const std::int64_t first_step = pos.step;
  double accuracy = 0;
  for (int epoch = first_epoch; epoch <= a.epochs; ++epoch) {
    const std::int64_t done_before = epoch == first_epoch ? first_step : 0;
    pos.epoch = epoch;
    pos.step = done_before;
    pos.epoch_rng = rng;
    if (done_before == 0) {
      pos.loss_sum = 0;
      pos.skipped_before = scaler.skipped_steps();
    }
    if (ranks == 1) {
      m.train.shuffle(rng);
    } else {
      m.train.set_order(shard_order(m.train.size(), rng, rank, ranks));
    }
    for (std::int64_t s = 0; s < done_before; ++s) m.train.next();  // resumed: the batches done
    const auto start = std::chrono::steady_clock::now();
    auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
    for (std::int64_t s = done_before + 1; s <= steps; ++s) {
      m.train.next();
      const float loss = nn::softmax_cross_entropy<T>(m.net.forward(m.train.x()), m.train.labels(), scaler.scale(),
                                                      m.net.output_grad());
      pos.loss_sum += loss;
      m.net.backward();
      // The sum over the ranks; the mean is taken in the unscale.
      if (zero) {
        zero->reduce_gradients();  // of this rank's slice
      } else if (ranks > 1) {
        reducer->reduce();
      }
      scaler.set_loss(loss);  // what the spike guard judges (ignored without it)
      if (mon) {
        mon->step(loss);  // scaler.step + scaler.update, watched
      } else {
        scaler.step(opt);
        scaler.update();
      }
      if (zero) zero->gather_weights();
      pos.step = s;
      const std::int64_t done = (epoch - 1) * steps + s;
      if (done == a.lr_jump_step) {  // --lr-jump-step: an induced failure
        for (std::size_t g = 0; g < opt.num_groups(); ++g) opt.set_lr(g, opt.base_lr(g) * a.lr_jump_factor);
      }
      if (saves_at(a, done, total)) save();
      if (done == a.stop_at_step) {
        if (!progress.quiet && progress.tty) std::printf("\n");
        print_stopped(a, pos, steps);
        return std::nullopt;
      }
      if (s % 10 == 0) {
        progress.draw(epoch, s, steps, pos.loss_sum / s, scaler.scale(), scaler.skipped_steps() - pos.skipped_before,
                      (s - done_before) * a.batch * ranks / seconds(), monitor_status(mon));
      }
    }
    // Every rank's images.
    const double images_per_s = (steps - done_before) * a.batch * ranks / seconds();
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
    progress.finish(epoch, pos.loss_sum / steps, scaler.scale(), scaler.skipped_steps() - pos.skipped_before,
                    images_per_s, accuracy, monitor_status(mon));
  }
  print_guard(a, progress, scaler.guard_skipped_steps());
  return accuracy;
}

// The GPU: the data lives on the device and one training step (batch,
// forward, loss, backward, unscale + inf check, AdamW, scale update) is
// captured once in a CUDA graph and replayed for every step. Nothing inside
// an epoch waits for the device: the loss is summed on the device, and the
// progress line reads a pinned copy queued a tenth of an epoch earlier.
// Checkpoints are saved between replays: a save reads the loss sum and
// the state back, which waits for the stream (only on the steps that save).
// A resume loads before the first step, so the graphs are captured after
// it. Two events drop the graphs, and the next step runs eagerly before
// the one after is captured again: an lr jump (a captured step holds its
// lr) and a precision fallback move (the moved layer's buffers are new;
// the move waits for the stream once, then frees the old ones).
//
// Data parallel over `dp` (NCCL, one process per GPU, when mpirun started
// several): as run_cpu, each rank trains on its share with --batch images a
// step, the gradients are summed by a dist::GradientReducer on its side
// stream (inside the captured graph) and averaged in the unscale; rank 0
// prints, saves and runs the monitor. With --zero1 on (NCCL, or one process
// on its GPU), each rank keeps the masters and moments of its slice: the
// gradients are reduce-scattered and the weights all-gathered on the step's
// stream, inside the graph; every rank saves and loads its shard.
template <class T>
std::optional<double> run_gpu(const Args& a, const ImageSet& train_set, const ImageSet& test_set,
                              const std::vector<std::int64_t>& sample, AddLayers<T> add_layers,
                              dist::Communicator* dp = nullptr) {
  const int ranks = dp != nullptr ? dp->size() : 1, rank = dp != nullptr ? dp->rank() : 0;
  const Device dev = dp != nullptr ? dp->device() : Device::cuda(0);
  Stream stream(dev);
  const nn::Context ctx{stream.get()};
  // The epoch's loss sum is added on a second stream, forked from the step's
  // after the loss and joined at the step's end: off the path of the
  // backward pass (a one-thread kernel there cost every step about 2 us).
  Stream side(dev);
  Event loss_done(dev), sum_done(dev);
  // Before the model's first GEMM (its plans are made at the first step).
  nn::set_gemm_algorithms(a.gemm == "timed" ? nn::GemmAlgorithms::timed : nn::GemmAlgorithms::heuristic);
  nn::set_narrow_linear(a.narrow_linear);
  Model<T> m(a, dev, stream.get(), train_set, test_set, sample, add_layers);
  amp::DeviceGradScaler scaler(scaler_options<T>(a, ranks), dev, stream.get());
  scaler.set_grad_divisor(ranks);
  std::unique_ptr<dist::ZeroOne> sharded;  // --zero1 on: this rank's slice of the masters and moments
  if (a.zero1) {
    sharded = make_zero1(a, *dp, m.net.parameters());
    scaler.set_stats_reducer(sharded->device_stats_reducer());
  }
  optim::Optimizer& opt = sharded ? sharded->optimizer() : *m.opt;
  opt.set_stream(stream.get());  // its reads (lr, step counts) wait for this stream
  std::optional<dist::GradientReducer> reducer;
  if (ranks > 1 && !sharded) reducer.emplace(*dp, opt);
  // The last partial batch is dropped; data parallel: of each rank's share.
  const std::int64_t steps = ranks == 1 ? m.train.full_batches() : m.train.size() / ranks / a.batch;
  MIXPREC_CHECK(steps > 0, "--batch = ", a.batch, " x ", ranks, " ranks: more than the ", m.train.size(),
                " training images");
  if ((ranks > 1 || sharded) && a.schedule == "cosine") opt.set_schedule(optim::LRSchedule::cosine(a.epochs * steps));
  std::mt19937_64 rng(a.seed);
  RunPosition pos;
  std::string monitor_state;   // a resumed run's, where it was saved at a logged step
  std::string fallback_state;  // its layers' precisions (--precision-fallback)
  if (!a.resume.empty()) {
    io::CheckpointExtras x;
    x.rng = &rng;
    // Before the weights, and before any capture (it synchronises).
    if (!sharded) fallback_state = restore_fallback_precisions(a.resume, m.net, opt);
    if (sharded) {
      sharded->load_checkpoint(a.resume, scaler, &x);  // every rank its shard; synchronises; before any capture
    } else {
      io::load_checkpoint(a.resume, opt, scaler, &x);  // synchronises; before any capture
    }
    pos = resume_position(a, x, rng, steps);
    monitor_state = saved_monitor_state(x);
    print_resumed(a, pos, steps);
  }
  check_stop(a, pos, steps);
  std::optional<monitor::Monitor> mon;  // with --zero1, it watches rank 0's slice
  start_monitor(mon, a, rank, opt, scaler, monitor_state);
  // A plain and a logged step (the monitor's logged steps do more work),
  // each captured at its first use after an eager first step.
  Graph graphs[2];
  bool first = true;
  // Declared after the monitor and the graphs: it goes first. A move
  // (inside mon->step() or mon->replayed(), between two steps, once the
  // stream is idle) frees the moved layer's old buffers: its on_move drops
  // the graphs that captured them, and the next step runs eagerly (the
  // moved layer makes its new buffers and GEMM plans there) before the one
  // after is captured again.
  std::optional<monitor::PrecisionFallback<T>> fallback;
  if (a.precision_fallback != "off") {
    MIXPREC_CHECK(ranks == 1 && !sharded, "--precision-fallback ", a.precision_fallback, ": one process only for "
                  "now, without --zero1 (every rank's layers must stay alike)");
    monitor::PrecisionFallbackOptions fo;
    fo.policy = monitor::parse_fallback_policy(a.precision_fallback, "--precision-fallback");
    fo.on_move = [&](const monitor::PrecisionMove&) {
      for (Graph& graph : graphs) graph = Graph();
      first = true;
    };
    fallback.emplace(m.net, opt, *mon, fo);
    if (!fallback_state.empty()) fallback->load_state(fallback_state);  // the moves' history
  }
  // Device scalars: [0] the step's loss, [1] a bad-label flag, [2] the
  // epoch's loss sum, then the test set's correct count (int64).
  Buffer scalars(4 * sizeof(float) + sizeof(std::int64_t), dev);
  float* loss = static_cast<float*>(scalars.data());
  scaler.set_loss(loss);  // the spike guard reads the step's loss here (ignored without it)
  auto* correct = reinterpret_cast<std::int64_t*>(loss + 4);
  struct Snapshot {
    int bad_label;   // scalars [1]
    float loss_sum;  // scalars [2]
    amp::DeviceScalerState scaler;
  };
  static_assert(offsetof(Snapshot, loss_sum) == sizeof(int), "one copy reads scalars [1] and [2]");
  PinnedBuffer snapshots(2 * sizeof(Snapshot));
  Event ticks[2] = {Event(dev), Event(dev)}, epoch_start(dev), epoch_end(dev);
  // --step-times: an event after every step of an epoch (the first's
  // interval starts at epoch_start), read at the epoch's end.
  struct CloseFile {
    void operator()(std::FILE* f) const noexcept { std::fclose(f); }
  };
  std::unique_ptr<std::FILE, CloseFile> step_log;
  struct StepEnd {
    Event event;
    bool logged = false;  // by the monitor
  };
  std::vector<StepEnd> step_ends;  // [step - 1]
  if (!a.step_times.empty() && rank == 0) {
    step_log.reset(std::fopen(a.step_times.c_str(), "w"));
    MIXPREC_CHECK(step_log != nullptr, "--step-times ", a.step_times, ": cannot be written");
    std::fprintf(step_log.get(), "epoch\tstep\tlogged\tms\n");
    for (std::int64_t s = 0; s < steps; ++s) step_ends.push_back({Event(dev)});
  }

  auto step = [&] {
    m.train.next();
    nn::softmax_cross_entropy<T>(m.net.forward(m.train.x(), ctx), m.train.labels(), scaler.scale_data(),
                                 m.net.output_grad(), loss, reinterpret_cast<int*>(loss + 1), ctx);
    loss_done.record(stream.get());
    loss_done.make_wait(side.get());
    nn::accumulate(dev, loss + 2, loss, nn::Context{side.get()});
    sum_done.record(side.get());
    m.net.backward(ctx);
    // The sum over the ranks (of this rank's slice with --zero1); the mean in the unscale.
    if (sharded) {
      sharded->reduce_gradients(stream.get());
    } else if (reducer) {
      reducer->reduce(stream.get());
    }
    if (mon) {
      mon->step(loss);  // scaler.step + scaler.update, watched
    } else {
      scaler.step(opt);
      scaler.update();
    }
    if (sharded) sharded->gather_weights(stream.get());  // every rank's updated slice to every rank
    sum_done.make_wait(stream.get());  // the join: the next step's loss overwrites what the sum reads
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
  auto save = [&] {
    // The loss sum so far: a copy to pageable memory, which waits for the
    // stream (every replay queued so far); save_checkpoint then reads the
    // optimizer's and the scaler's state back.
    float sum = 0;
    mixprec::detail::copy_raw(&sum, Device::cpu(), loss + 2, dev, sizeof sum, stream.get());
    pos.loss_sum = sum;
    io::CheckpointExtras x = checkpoint_extras(a, pos, steps);
    // The monitor's state at a logged step only (its steps since the last
    // one are in device memory): a run resumed from elsewhere starts a
    // fresh monitor.
    if (mon && mon->steps() % a.monitor_every == 0) {
      mon->flush();  // the stream is idle already: the read-backs are processed
      x.metadata["monitor.state"] = mon->save_state();
    }
    keep_fallback_state(x, fallback, fallback_state);
    if (sharded) {
      sharded->save_checkpoint(a.checkpoint, scaler, x);  // every rank: its shard
    } else if (rank == 0) {
      io::save_checkpoint(a.checkpoint, opt, scaler, x);  // every rank holds the same
    }
  };

  Progress progress;
  progress.quiet = rank != 0;
  const std::int64_t tick = std::max<std::int64_t>(1, steps / 10);
  const std::int64_t total = a.epochs * steps;
  const int first_epoch = pos.epoch;
  const std::int64_t first_step = pos.step;
  double accuracy = 0;
  std::int64_t skipped_total = pos.skipped_before;  // the scaler's skipped steps when the epoch began
  for (int epoch = first_epoch; epoch <= a.epochs; ++epoch) {
    const std::int64_t done_before = epoch == first_epoch ? first_step : 0;
    pos.epoch = epoch;
    pos.step = done_before;
    pos.epoch_rng = rng;
    pos.skipped_before = skipped_total;
    if (done_before == 0) pos.loss_sum = 0;
    if (ranks == 1) {
      m.train.shuffle(rng);
    } else {
      m.train.set_order(shard_order(m.train.size(), rng, rank, ranks));
    }
    for (std::int64_t s = 0; s < done_before; ++s) m.train.next();  // resumed: the batches done
    // The bad-label flag and the loss sum (a resumed epoch's so far; fp32
    // on the device, so the double it was saved as is exact).
    const struct {
      std::int32_t bad_label;
      float loss_sum;
    } init{0, static_cast<float>(pos.loss_sum)};
    static_assert(sizeof init == 2 * sizeof(float), "scalars [1] and [2]");
    mixprec::detail::copy_raw(loss + 1, dev, &init, Device::cpu(), sizeof init, stream.get());
    epoch_start.record(stream.get());
    for (std::int64_t s = done_before + 1; s <= steps; ++s) {
      const bool logged = mon && mon->logs_next();
      if (!a.graph || first) {
        first = false;  // before the step: a precision move inside it asks for the next one eager
        step();         // eager; the first step also makes every plan and buffer
      } else {
        Graph& graph = graphs[logged ? 1 : 0];
        if (graph.empty()) graph.capture(stream.get(), step);
        graph.replay(stream.get());
        if (mon) mon->replayed();
      }
      if (step_log) {
        StepEnd& e = step_ends[static_cast<std::size_t>(s - 1)];
        e.event.record(stream.get());
        e.logged = logged;
      }
      pos.step = s;
      const std::int64_t done = (epoch - 1) * steps + s;
      if (done == a.lr_jump_step) {  // --lr-jump-step: an induced failure
        for (std::size_t g = 0; g < opt.num_groups(); ++g) opt.set_lr(g, opt.base_lr(g) * a.lr_jump_factor);
        for (Graph& graph : graphs) graph = Graph();  // a captured step holds the lr it was captured with
      }
      if (saves_at(a, done, total)) save();
      if (done == a.stop_at_step) {
        stream.synchronize();
        if (mon) mon->flush();
        scaler.check_errors();
        if (progress.tty) std::printf("\n");
        print_stopped(a, pos, steps);
        return std::nullopt;
      }
      if (s % tick == 0 && s < steps) {  // progress, a tick behind
        snapshot(static_cast<int>(s / tick % 2));
        if (s - tick > done_before) {  // the snapshot of step s - tick was taken in this run
          const int prev = static_cast<int>((s / tick + 1) % 2);  // the snapshot of step s - tick
          ticks[prev].synchronize();  // recorded a tick ago; the device still has a tick queued
          const Snapshot* p = static_cast<const Snapshot*>(snapshots.data()) + prev;
          const std::int64_t done_then = s - tick;
          progress.draw(epoch, done_then, steps, p->loss_sum / done_then, p->scaler.state.scale,
                        p->scaler.skipped - skipped_total,
                        (done_then - done_before) * a.batch * ranks / (1e-3 * ticks[prev].elapsed_ms(epoch_start)),
                        monitor_status(mon));
          scaler.check_errors();
        }
      }
    }
    epoch_end.record(stream.get());
    const Snapshot* end = snapshot(0);
    ticks[0].synchronize();
    if (mon) mon->flush();  // the device is idle: nothing waits
    if (step_log) {  // the device is idle: every event has passed
      for (std::int64_t s = done_before + 1; s <= steps; ++s) {
        const StepEnd& e = step_ends[static_cast<std::size_t>(s - 1)];
        const Event& from = s == done_before + 1 ? epoch_start : step_ends[static_cast<std::size_t>(s - 2)].event;
        std::fprintf(step_log.get(), "%d\t%lld\t%d\t%.6f\n", epoch, static_cast<long long>(s), e.logged ? 1 : 0,
                     e.event.elapsed_ms(from));
      }
      std::fflush(step_log.get());
    }
    const double images_per_s =  // every rank's images
        (steps - done_before) * a.batch * ranks / (1e-3 * epoch_end.elapsed_ms(epoch_start));
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
  if (a.spike_guard) print_guard(a, progress, scaler.guard_skipped_steps());  // a synchronising read, once
  return accuracy;
}

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

/// Loads Fashion-MNIST, prints a header line, trains with the precision
/// and device of `a` (the layers from add_layers<T>) and returns the exit
/// code: 0, or 1 on an error or an accuracy below --min-accuracy. Writes
/// the --report page at the end (rank 0), also after --stop-at-step.
template <template <class> class AddLayersFor>
int train_classifier(const Args& a, const std::vector<std::int64_t>& sample) {
  std::unique_ptr<dist::Communicator> comm;
  std::unique_ptr<dist::Communicator> gpu_comm;  // GPU ranks: NCCL, started through comm (MPI)
  try {
    comm = make_communicator();
    dist::Communicator& c = *comm;
    if (a.device == "cuda" && (c.size() > 1 || a.zero1)) {
#if MIXPREC_EXAMPLES_WITH_NCCL
      // One process per GPU: local rank r of a node takes its GPU r % GPUs.
      // One process with --zero1 on: NCCL with one rank under mpirun, else
      // the one-rank communicator on the GPU.
      if (std::string(c.backend()) == "mpi") {
        gpu_comm = dist::nccl_over_mpi(static_cast<dist::MpiCommunicator&>(c));
      } else {
        gpu_comm = std::make_unique<dist::LocalCommunicator>(Device::cuda(0));
      }
#else
      MIXPREC_CHECK(c.size() == 1, "data parallel on GPU ranks needs NCCL, and this build has no mixprec::nccl "
                    "(nccl.h / libnccl not found by CMake); run the ranks with --device cpu");
      gpu_comm = std::make_unique<dist::LocalCommunicator>(Device::cuda(0));
#endif
    }
    if (c.size() > 1) {
      if (c.rank() != 0) (void)std::freopen("/dev/null", "w", stdout);  // rank 0 reports
      std::printf("data parallel: %d ranks (%s), batch %lld per rank%s\n", c.size(),
                  gpu_comm ? gpu_comm->backend() : c.backend(), static_cast<long long>(a.batch),
                  a.zero1 ? ", ZeRO-1" : "");
    }
    const ImageSet train = load_fashion_mnist(a.data, "train");
    const ImageSet test = load_fashion_mnist(a.data, "t10k");
    MIXPREC_CHECK(a.batch <= train.count, "--batch = ", a.batch, ", larger than the ", train.count,
                  " training images");
    std::printf("%s: %s on %s, %s, batch %lld, %s lr %g%s, %d epochs%s%s%s\n", a.program.c_str(), a.precision.c_str(),
                a.device.c_str(), a.description.c_str(), static_cast<long long>(a.batch), a.optimizer.c_str(), a.lr,
                a.schedule == "cosine" ? " cosine" : "", a.epochs,
                a.device == "cuda" ? (a.graph ? ", CUDA graph" : ", eager") : "",
                a.gemm == "timed" ? ", timed GEMM algorithms" : "",
                a.device == "cuda" && a.narrow_linear ? ", narrow layers through mixprec's kernels" : "");
    if (a.monitor) {
      std::printf("monitor: a logged step every %d steps%s%s%s%s\n", a.monitor_every,
                  a.monitor_log.empty() ? "" : ", log ", a.monitor_log.c_str(), a.report.empty() ? "" : ", report ",
                  a.report.c_str());
    }
    if (!a.checkpoint.empty()) {
      std::string when = a.stop_at_step > 0 ? "at step " + std::to_string(a.stop_at_step) + " (--stop-at-step)"
                                            : std::string("at the end");
      if (a.checkpoint_every > 0) when = "every " + std::to_string(a.checkpoint_every) + " steps and " + when;
      std::printf("checkpoint: %s, %s%s\n", a.checkpoint.c_str(), when.c_str(),
                  a.zero1 ? " (sharded: one file per rank and an index)" : "");
    }
    const bool gpu = a.device == "cuda";
    std::optional<double> accuracy;
    if (a.precision == "fp16") {
      accuracy = gpu ? run_gpu<half>(a, train, test, sample, AddLayersFor<half>::add, gpu_comm.get())
                     : run_cpu<half>(a, train, test, sample, AddLayersFor<half>::add, c);
    } else if (a.precision == "bf16") {
      accuracy = gpu ? run_gpu<bfloat16>(a, train, test, sample, AddLayersFor<bfloat16>::add, gpu_comm.get())
                     : run_cpu<bfloat16>(a, train, test, sample, AddLayersFor<bfloat16>::add, c);
    } else {
      accuracy = gpu ? run_gpu<float>(a, train, test, sample, AddLayersFor<float>::add, gpu_comm.get())
                     : run_cpu<float>(a, train, test, sample, AddLayersFor<float>::add, c);
    }
    // The monitor is gone: its log is complete. Rank 0 ran it.
    if (!a.report.empty() && c.rank() == 0) {
      monitor::write_report(a.monitor_log, a.report, a.program + ": " + a.description);
      std::printf("report: %s\n", a.report.c_str());
    }
    if (accuracy && *accuracy < a.min_accuracy) {
      std::fprintf(stderr, "%s: test accuracy %.4f < --min-accuracy %.4f\n", a.program.c_str(), *accuracy,
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

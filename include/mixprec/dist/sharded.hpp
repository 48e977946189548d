// SPDX-License-Identifier: Apache-2.0
// ShardedOptimizer: ZeRO-1 over a Communicator. Each rank keeps the fp32
// masters and optimizer state of one contiguous slice of the parameters.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/amp/device_grad_scaler.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/core/atomic_file.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/dist/communicator.hpp"
#include "mixprec/io/checkpoint.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/optim/family.hpp"
#include "mixprec/optim/optimizer_base.hpp"
#include "mixprec/optim/state_layout.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

struct ShardOptions {
  /// Where the slices may end.
  enum class Cut {
    /// Only between parameters: each parameter belongs to one rank. Each
    /// interior cut is the parameter boundary nearest the even cut that
    /// leaves every rank a parameter: as even as the parameter sizes allow,
    /// which can be far from even (one large layer). With clipping, the
    /// results are bit-identical to plain data parallelism.
    parameters,
    /// Anywhere: every rank holds N / W elements (give or take one). A
    /// parameter may be split between ranks; with clipping its sum of
    /// squares is then added in two parts, and the clip coefficient may
    /// differ from plain data parallelism's in its last bit.
    elements,
  };
  Cut cut = Cut::parameters;
};

/// What a trainer calls on a ZeRO-1 optimizer, whatever its kind
/// (ShardedOptimizer<Opt> below): for code that picks the optimizer at run
/// time.
class ZeroOne {
 public:
  virtual ~ZeroOne() = default;
  /// This rank's optimizer (masters and state of its slice), to step.
  virtual optim::Optimizer& optimizer() = 0;
  /// For the scaler that steps optimizer(): amp::GradScaler (host
  /// parameters) or amp::DeviceGradScaler (parameters on a GPU).
  virtual amp::GradScaler::StatsReducer stats_reducer() = 0;
  virtual amp::DeviceGradScaler::StatsReducer device_stats_reducer() = 0;
  /// Device communicators queue them on `stream`; host ones ignore it.
  virtual void reduce_gradients(stream_t stream = nullptr) = 0;
  virtual void gather_weights(stream_t stream = nullptr) = 0;
  virtual void save_checkpoint(const std::string& path, const amp::GradScaler& scaler,
                               const io::CheckpointExtras& extras = {}) = 0;
  virtual void load_checkpoint(const std::string& path, amp::GradScaler& scaler,
                               io::CheckpointExtras* extras = nullptr) = 0;
  virtual void save_checkpoint(const std::string& path, const amp::DeviceGradScaler& scaler,
                               const io::CheckpointExtras& extras = {}) = 0;
  virtual void load_checkpoint(const std::string& path, amp::DeviceGradScaler& scaler,
                               io::CheckpointExtras* extras = nullptr) = 0;
};

namespace detail {
// The rule of an optimizer of the family (none for others: no pre-pass known).
template <class Opt>
struct FamilyRule {};
template <class Rule>
struct FamilyRule<optim::Family<Rule>> {
  using type = Rule;
};
template <class Opt, class = void>
struct HasFamilyRule : std::false_type {};
template <class Opt>
struct HasFamilyRule<Opt, std::void_t<typename FamilyRule<Opt>::type>> : std::true_type {};
// Whether these options make the step sum over whole tensors first.
template <class Opt>
bool needs_prepass(const typename Opt::options_type& o) {
  if constexpr (HasFamilyRule<Opt>::value) {
    using Rule = typename FamilyRule<Opt>::type;
    using Kernel = typename Rule::Kernel;
    if constexpr (optim::prepass_sums_v<Kernel> > 0) return Kernel::prepass(Rule::hyper(o, o.lr, 0)) != 0u;
  }
  (void)o;
  return false;
}
}  // namespace detail

/// ZeRO-1 for optimizer `Opt` (optim::AdamW, SGD, ...): the parameters,
/// taken in order as one flat sequence of N elements, are cut into size()
/// contiguous slices (ShardOptions::cut), and this rank's optimizer
/// (shard()) holds masters and state for its slice only. A zero-size
/// parameter belongs to no rank.
///
/// A step, on every rank:
///
///     sharded.reduce_gradients();              // this rank's slice: the sum over the ranks
///     scaler.step(sharded.shard());            // check + update of this rank's slice
///     scaler.update();
///     sharded.gather_weights();                // every rank's updated weights to every rank
///
/// with the scaler's divisor set to size() and its stats reducer to
/// stats_reducer() (once, before the first step): the ranks' non-finite
/// flags and per-parameter sums of squares are combined in one all-gather of
/// 8 bytes a parameter, so skip, scale and clip coefficient are the same on
/// every rank.
///
/// Numerics: reduce_gradients is the communicator's reduce_scatter_sum,
/// whose sums have the bits all_reduce_sum (GradientReducer) gives them
/// (MpiCommunicator), so each rank's update sees exactly the gradients of
/// the unsharded data-parallel run and the weights are bit-identical to
/// that run's; with clipping too when the cut is Cut::parameters.
/// Traffic: a reduce-scatter and an all-gather, the bytes of one all-reduce.
///
/// On GPUs (a NCCL communicator, parameters on its device; the shard's
/// optimizer steps with an amp::DeviceGradScaler): the same four calls,
/// reduce_gradients and gather_weights queued on the step's stream, and
/// device_stats_reducer() on the scaler instead, which or-s the ranks'
/// flags and adds their total sums of squares in one 12-byte NCCL launch
/// (nothing waits on the host; a whole step captures in a CUDA graph).
/// The weights are bit-identical to the unsharded run given the same
/// reduced gradients (with clipping, the coefficient may differ in its last
/// bits: the check pass adds each shard's squares in its own slices).
template <class Opt>
class ShardedOptimizer final : public ZeroOne {
 public:
  ShardedOptimizer(Communicator& comm, std::vector<optim::Param> params, const typename Opt::options_type& options,
                   const ShardOptions& shard_options = {})
      : comm_(&comm), params_(std::move(params)), cut_(shard_options.cut) {
    MIXPREC_CHECK(cut_ == ShardOptions::Cut::parameters || cut_ == ShardOptions::Cut::elements,
                  "ShardedOptimizer: shard_options.cut = ", static_cast<int>(cut_), " is not a ShardOptions::Cut");
    // A pre-pass (LAMB, update clipping) sums over whole tensors: on a slice
    // it would sum the slice, and the run would not be the unsharded one.
    MIXPREC_CHECK(!detail::needs_prepass<Opt>(options), "ShardedOptimizer: these options need per-tensor sums "
                  "before the update (LAMB; AdamOptions::update_clipping), which a slice of a tensor cannot make; this "
                  "version shards optimizers without a pre-pass");
    // Elementwise layouts shard as they are; the 8-bit code's blocks and the
    // stochastic rounding's numbers count elements of a parameter, which a
    // slice would renumber (the run would no longer be the unsharded one's).
    const optim::StateLayout layout = optim::layout_option(options);
    MIXPREC_CHECK(layout.moments != optim::Moments::int8 && layout.moments != optim::Moments::bf16_sr &&
                      layout.master != optim::Master::none,
                  "ShardedOptimizer: StateLayout moments = ", optim::to_string(layout.moments), ", master = ",
                  optim::to_string(layout.master), "; this version shards fp32 or bf16 moments with an fp32 or "
                  "remainder master (8-bit blocks and stochastic rounding would be numbered per slice)");
    std::int64_t total = 0;
    for (const optim::Param& p : params_) {
      MIXPREC_CHECK(p.weight.device() == comm.device() && p.grad.device() == comm.device(),
                    "ShardedOptimizer: parameter \"", p.name, "\" is on ", p.weight.device(), " (its gradient on ",
                    p.grad.device(), "), the ", comm.backend(), " communicator on ", comm.device(),
                    "; they must be on the communicator's device");
      MIXPREC_CHECK(p.grad.dtype() == p.weight.dtype() && p.grad.numel() == p.weight.numel(),
                    "ShardedOptimizer: parameter \"", p.name, "\": the gradient (", dtype_name(p.grad.dtype()), ", ",
                    p.grad.numel(), " elements) must have the weight's dtype and size (", dtype_name(p.weight.dtype()), ", ",
                    p.weight.numel(), ")");
      total += p.weight.numel();
      weights_.push_back(p.weight);
      grads_.push_back(p.grad);
    }
    const int w = comm.size(), r = comm.rank();
    bounds_ = even_bounds(total, w);
    if (cut_ == ShardOptions::Cut::parameters) cut_at_parameters(total);
    for (int k = 0; k < w; ++k) {
      MIXPREC_CHECK(bounds_[k + 1] > bounds_[k], "ShardedOptimizer: rank ", k, " of ", w, " would hold no element (",
                    params_.size(), " parameters, ", total, " elements, cut at ",
                    cut_ == ShardOptions::Cut::parameters ? "parameters" : "elements",
                    "); every rank needs a slice: use fewer ranks",
                    cut_ == ShardOptions::Cut::parameters ? " or ShardOptions::Cut::elements" : "");
    }
    // Every rank's pieces (views of the part of each parameter in its slice);
    // this rank's are its optimizer's parameters.
    pieces_per_rank_.assign(static_cast<std::size_t>(w), 0);
    std::vector<optim::Param> mine;
    std::int64_t at = 0;
    for (const optim::Param& p : params_) {
      const std::int64_t n = p.weight.numel();
      for (int k = 0; k < w; ++k) {
        const std::int64_t a = std::max(at, bounds_[k]), b = std::min(at + n, bounds_[k + 1]);
        if (a >= b) continue;
        pieces_per_rank_[static_cast<std::size_t>(k)] += 1;
        if (k == r) {
          mine.push_back({p.name + "@" + std::to_string(a - at), slice(p.weight, a - at, b - a),
                          slice(p.grad, a - at, b - a)});
        }
      }
      at += n;
    }
    shard_ = std::make_unique<Opt>(std::move(mine), options);
  }

  /// This rank's optimizer: masters and state of its slice only.
  Opt& shard() { return *shard_; }
  const Opt& shard() const { return *shard_; }
  optim::Optimizer& optimizer() override { return *shard_; }
  /// This rank's slice of the flat parameter sequence: [first, last).
  std::int64_t first() const { return bounds_[static_cast<std::size_t>(comm_->rank())]; }
  std::int64_t last() const { return bounds_[static_cast<std::size_t>(comm_->rank()) + 1]; }
  /// Every rank's slice: rank k holds [bounds()[k], bounds()[k + 1]).
  const std::vector<std::int64_t>& bounds() const { return bounds_; }

  /// The scaler's stats reducer (GradScaler::set_stats_reducer): the or of
  /// the ranks' non-finite flags and the sum of every parameter's sum of
  /// squares, added in parameter order (as one process adds them).
  amp::GradScaler::StatsReducer stats_reducer() override {
    MIXPREC_CHECK(comm_->device().is_cpu(), "ShardedOptimizer::stats_reducer: the parameters are on ",
                  comm_->device(), "; use device_stats_reducer() with an amp::DeviceGradScaler");
    return [this](const optim::GradStats& stats, bool& found_inf, double& total) { combine(stats, found_inf, total); };
  }
  /// The amp::DeviceGradScaler's stats reducer (set_stats_reducer) for
  /// parameters on a GPU: Communicator::all_reduce_check on the flag and
  /// the total sum of squares of this rank's check pass, in place.
  amp::DeviceGradScaler::StatsReducer device_stats_reducer() override {
    MIXPREC_CHECK(comm_->device().is_cuda(), "ShardedOptimizer::device_stats_reducer: the parameters are on ",
                  comm_->device(), "; use stats_reducer() with an amp::GradScaler");
    return [this](int* found_inf, double* total, stream_t stream) { comm_->all_reduce_check(found_inf, total, stream); };
  }

  /// After the backward: this rank's slice of the gradients becomes the
  /// sum over the ranks (the other elements hold unspecified values).
  void reduce_gradients(stream_t stream = nullptr) override { comm_->reduce_scatter_sum(grads_, bounds_, stream); }

  /// After the step: every rank's updated slice of the weights to every rank.
  void gather_weights(stream_t stream = nullptr) override { comm_->all_gather_slices(weights_, bounds_, stream); }

  /// Checkpoints: one file per rank plus an index, written at `path`.
  ///
  /// Every rank calls it after update(). Rank r writes its shard (the
  /// ordinary checkpoint of shard(): its slice of the weights, masters,
  /// state, the scaler and `extras`) to `<path>.<id>.rank<r>`, where `<id>`
  /// is new at every save; then, once every rank's file is complete,
  /// rank 0 writes the index `path` (JSON: the world size, the slices and
  /// the files). Each file is written atomically, and the index last: a
  /// crash during a save leaves the previous index and the files it names.
  /// Once the new index is written each rank removes its file of the
  /// previous save to the same `path` from this object (or loaded from it).
  ///
  /// Why one file per rank: no rank gathers the whole state (the memory
  /// ZeRO-1 saves), the ranks write in parallel, and each shard is a
  /// checkpoint in the usual format.
  /// On GPUs (amp::DeviceGradScaler) the same; the shard's file is read
  /// back from the device (io::save_checkpoint synchronises).
  void save_checkpoint(const std::string& path, const amp::GradScaler& scaler,
                       const io::CheckpointExtras& extras = {}) override {
    save(path, scaler, extras);
  }
  void save_checkpoint(const std::string& path, const amp::DeviceGradScaler& scaler,
                       const io::CheckpointExtras& extras = {}) override {
    save(path, scaler, extras);
  }

  /// Resumes what save_checkpoint wrote, on the same number of ranks with
  /// the same parameters and cut: every rank loads its own shard (bit-exact,
  /// as io::load_checkpoint), then the weights are gathered (on GPUs on the
  /// scaler's stream). Every check of the index runs before anything
  /// changes. A checkpoint of another world size is refused: the slices,
  /// and so each file's contents, depend on it.
  void load_checkpoint(const std::string& path, amp::GradScaler& scaler,
                       io::CheckpointExtras* extras = nullptr) override {
    load(path, scaler, extras, nullptr);
  }
  void load_checkpoint(const std::string& path, amp::DeviceGradScaler& scaler,
                       io::CheckpointExtras* extras = nullptr) override {
    load(path, scaler, extras, scaler.stream());
  }

 private:
  template <class Scaler>
  void save(const std::string& path, const Scaler& scaler, const io::CheckpointExtras& extras) {
    MIXPREC_CHECK(!path.empty(), "ShardedOptimizer::save_checkpoint: path is empty");
    std::uint64_t id = 0;
    if (comm_->rank() == 0) id = std::random_device{}() * 0x100000000ull + std::random_device{}();
    id = from_rank0(id);
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(id));
    const std::string file = shard_file(path, hex, comm_->rank());
    io::save_checkpoint(file, *shard_, scaler, extras);
    comm_->barrier();  // every shard is complete
    if (comm_->rank() == 0) {
      nlohmann::json index;
      index["format"] = kIndexFormat;
      index["world_size"] = comm_->size();
      index["cut"] = cut_name();
      index["bounds"] = bounds_;
      std::vector<std::string> files;
      for (int k = 0; k < comm_->size(); ++k) files.push_back(base_name(shard_file(path, hex, k)));
      index["files"] = files;
      const std::string text = index.dump(1);
      mixprec::detail::AtomicFile out(path, "ShardedOptimizer::save_checkpoint");
      out.append(text.data(), text.size());
      out.commit();
    }
    comm_->barrier();  // the index names the new files
    // This rank's file of the previous save to the same index (saves to
    // other paths are other checkpoints, and stay).
    std::string& previous = previous_files_[path];
    if (!previous.empty() && previous != file) std::remove(previous.c_str());
    previous = file;
  }

  template <class Scaler>
  void load(const std::string& path, Scaler& scaler, io::CheckpointExtras* extras, stream_t stream) {
    std::ifstream in(path, std::ios::binary);
    MIXPREC_CHECK(in.good(), "ShardedOptimizer::load_checkpoint: cannot open the index '", path, "'");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    nlohmann::json index = nlohmann::json::parse(text, nullptr, false);
    MIXPREC_CHECK(!index.is_discarded() && index.is_object() && index.value("format", "") == kIndexFormat,
                  "ShardedOptimizer::load_checkpoint: '", path, "' is not the index of a sharded checkpoint");
    const int saved = index.value("world_size", 0);
    MIXPREC_CHECK(saved == comm_->size(), "ShardedOptimizer::load_checkpoint: '", path, "' was saved by ", saved,
                  " ranks, this job has ", comm_->size(), "; resume a sharded checkpoint on the same number of ranks");
    const std::string cut = index.value("cut", "");
    MIXPREC_CHECK(cut == cut_name(), "ShardedOptimizer::load_checkpoint: '", path, "' was cut at ", cut,
                  ", this optimizer cuts at ", cut_name());
    MIXPREC_CHECK(index.contains("bounds") && index["bounds"].is_array() &&
                      index["bounds"].get<std::vector<std::int64_t>>() == bounds_,
                  "ShardedOptimizer::load_checkpoint: '", path, "' holds other slices (", index.value("bounds",
                  nlohmann::json()).dump(), ") than this optimizer's (", nlohmann::json(bounds_).dump(),
                  "): other parameters");
    MIXPREC_CHECK(index.contains("files") && index["files"].is_array() &&
                      index["files"].size() == static_cast<std::size_t>(comm_->size()),
                  "ShardedOptimizer::load_checkpoint: '", path, "' does not list one file per rank");
    const std::string name = index["files"][static_cast<std::size_t>(comm_->rank())].get<std::string>();
    const std::size_t slash = path.rfind('/');
    const std::string file = slash == std::string::npos ? name : path.substr(0, slash + 1) + name;
    io::load_checkpoint(file, *shard_, scaler, extras);
    gather_weights(stream);
    previous_files_[path] = file;
  }

  // Rank 0's value, on every rank (through device memory on a device
  // communicator: NCCL moves device memory only).
  std::uint64_t from_rank0(std::uint64_t v) {
    if (comm_->device().is_cpu()) {
      comm_->broadcast(&v, sizeof v, 0);
      return v;
    }
    Buffer b(sizeof v, comm_->device());
    mixprec::detail::copy_raw(b.data(), comm_->device(), &v, Device::cpu(), sizeof v);
    comm_->broadcast(b.data(), sizeof v, 0);  // the default stream, as the copies
    mixprec::detail::copy_raw(&v, Device::cpu(), b.data(), comm_->device(), sizeof v);
    return v;
  }

  static constexpr const char* kIndexFormat = "mixprec-sharded-checkpoint-1";

  const char* cut_name() const { return cut_ == ShardOptions::Cut::parameters ? "parameters" : "elements"; }
  static std::string shard_file(const std::string& path, const char* id, int rank) {
    return path + "." + id + ".rank" + std::to_string(rank);
  }
  static std::string base_name(const std::string& p) {
    const std::size_t slash = p.rfind('/');
    return slash == std::string::npos ? p : p.substr(slash + 1);
  }

  // Cut k (k = 1 .. W - 1) goes to the start of a non-empty parameter: the
  // one nearest the even cut among those after cut k - 1 that leave a
  // parameter for each rank after k (the lower on a tie). Fewer non-empty
  // parameters than ranks: no such cuts (the constructor refuses).
  void cut_at_parameters(std::int64_t total) {
    std::vector<std::int64_t> starts;  // where each non-empty parameter but the first begins
    std::int64_t at = 0;
    for (const optim::Param& p : params_) {
      if (p.weight.numel() > 0 && at > 0) starts.push_back(at);
      at += p.weight.numel();
    }
    const std::size_t w = bounds_.size() - 1;
    if (starts.size() + 1 < w) {  // leave the even cuts: some rank is empty, refused below
      for (std::size_t k = 1; k < w; ++k) bounds_[k] = 0;
      return;
    }
    std::size_t from = 0;  // candidates: starts[from .. starts.size() - (w - 1 - k)]
    for (std::size_t k = 1; k < w; ++k) {
      const std::size_t last = starts.size() - (w - 1 - k);  // one past the last usable candidate
      std::size_t best = from;
      for (std::size_t c = from; c < last; ++c) {
        const std::int64_t d = std::llabs(starts[c] - bounds_[k]), e = std::llabs(starts[best] - bounds_[k]);
        if (d < e) best = c;
      }
      bounds_[k] = starts[best];
      from = best + 1;
    }
    bounds_.back() = total;
  }

  static TensorRef slice(const TensorRef& t, std::int64_t offset, std::int64_t count) {
    return t.visit([&](auto v) -> TensorRef {
      using T = typename decltype(v)::value_type;
      return TensorView<T>(const_cast<T*>(v.data()) + offset, {count}, v.device());
    });
  }

  // Every rank's {flag, sums of squares of its pieces} gathered (8 bytes a
  // piece), then added in rank order and piece order, that is parameter
  // order, in double: the same bits on every rank; and, when no parameter
  // is split, the bits one process's pass 1 gives.
  void combine(const optim::GradStats& stats, bool& found_inf, double& total) {
    const auto w = static_cast<std::size_t>(comm_->size()), r = static_cast<std::size_t>(comm_->rank());
    MIXPREC_CHECK(stats.sum_squares.size() == pieces_per_rank_[r], "ShardedOptimizer: the stats reducer got ",
                  stats.sum_squares.size(), " parameters, this rank's shard has ", pieces_per_rank_[r],
                  "; set it on the scaler that steps shard()");
    std::vector<std::size_t> bytes(w);
    std::size_t all = 0, at = 0;
    for (std::size_t k = 0; k < w; ++k) {
      bytes[k] = (1 + pieces_per_rank_[k]) * sizeof(double);
      if (k < r) at += 1 + pieces_per_rank_[k];
      all += 1 + pieces_per_rank_[k];
    }
    std::vector<double> gathered(all, 0.0);
    gathered[at] = found_inf ? 1.0 : 0.0;
    std::copy(stats.sum_squares.begin(), stats.sum_squares.end(), gathered.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    comm_->all_gather(gathered.data(), bytes);
    total = 0;
    found_inf = false;
    std::size_t i = 0;
    for (std::size_t k = 0; k < w; ++k) {
      found_inf = found_inf || gathered[i] != 0.0;
      for (std::size_t j = 0; j < pieces_per_rank_[k]; ++j) total += gathered[i + 1 + j];
      i += 1 + pieces_per_rank_[k];
    }
  }

  Communicator* comm_;
  std::vector<optim::Param> params_;
  std::vector<TensorRef> weights_, grads_;
  ShardOptions::Cut cut_;
  std::vector<std::int64_t> bounds_;
  std::vector<std::size_t> pieces_per_rank_;
  std::unique_ptr<Opt> shard_;
  std::map<std::string, std::string> previous_files_;  // index path -> this rank's file of its last save
};

}  // namespace dist
MIXPREC_NAMESPACE_END

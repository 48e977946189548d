// SPDX-License-Identifier: Apache-2.0
// ShardedOptimizer: ZeRO-1 over a Communicator. Each rank keeps the fp32
// masters and optimizer state of one contiguous slice of the parameters.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
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
      : comm_(&comm), params_(std::move(params)), cut_(shard_options.cut), options_(options) {
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
    for (int k = 0; k < w; ++k) pieces_per_rank_[static_cast<std::size_t>(k)] = pieces_of(bounds_, k).size();
    std::vector<optim::Param> mine;
    for (const Piece& c : pieces_of(bounds_, r)) {
      const optim::Param& p = params_[c.param];
      mine.push_back({piece_name(p, c.offset), slice(p.weight, c.offset, c.count), slice(p.grad, c.offset, c.count)});
    }
    shard_ = std::make_unique<Opt>(std::move(mine), options);
    // Device communicators: 16 bytes of device memory for the checkpoints'
    // agreements, made now so that no allocation can fail on one rank there.
    if (comm.device().is_cuda()) scratch_ = Buffer(16, comm.device());
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
    return [this](const optim::Optimizer& opt, int* found_inf, double* total, stream_t stream) {
      // One scaler per sharded optimizer, as stats_reducer()'s rule: another
      // optimizer's sums are not a slice of this one's.
      MIXPREC_CHECK(&opt == shard_.get(), "ShardedOptimizer: the device stats reducer got a ", opt.name(), " of ",
                    opt.num_params(), " parameters, not this rank's shard(); set it on the scaler that steps shard() "
                    "only");
      comm_->all_reduce_check(found_inf, total, step_stream(stream, "device_stats_reducer (the scaler's stream)"));
    };
  }

  /// After the backward: this rank's slice of the gradients becomes the
  /// sum over the ranks (the other elements hold unspecified values).
  /// On GPUs the collectives run on shard().stream(), the stream the check
  /// and the step run on (the scaler's must be the same); `stream` may be
  /// left out or must be that one: on another, nothing would order the
  /// reduction before the check or the step before the gather.
  void reduce_gradients(stream_t stream = nullptr) override {
    comm_->reduce_scatter_sum(grads_, bounds_, step_stream(stream, "reduce_gradients"));
  }

  /// After the step: every rank's updated slice of the weights to every rank.
  void gather_weights(stream_t stream = nullptr) override {
    comm_->all_gather_slices(weights_, bounds_, step_stream(stream, "gather_weights"));
  }

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

  /// Resumes what save_checkpoint wrote, for the same parameters (names,
  /// sizes, dtypes, order), optimizer, options and schedule, then gathers
  /// the weights (on GPUs on the scaler's stream).
  ///
  /// Same slices (the same number of ranks and cut): every rank loads its
  /// own shard file, as io::load_checkpoint does.
  ///
  /// Other slices (another number of ranks, or the other cut): re-sharding.
  /// Every rank reads the old shard files whose slices meet its new slice
  /// (so every file must be readable from every rank: a shared file system,
  /// as the save needs for its index) and assembles its masters, moments,
  /// step counts and weights element by element; the lrs, the schedule's
  /// position and the scaler come from the files, which must agree. The
  /// state is the saved one bit for bit, so the run goes on as the saved
  /// run would on the new number of ranks (the same bits as plain data
  /// parallelism on that many ranks resumed from the same state). `extras`
  /// come from old rank r's file on new rank r (rank 0's where the old job
  /// had fewer ranks). A save to the same `path` afterwards removes the old
  /// files (new rank r the old files k with k % size() == r).
  ///
  /// Every file is read and checked before anything changes: on an error
  /// (a missing file, other parameters, files of different saves) the
  /// optimizer, the scaler and `extras` are as they were.
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
    // A save that fails on one rank fails on every rank (all_ranks_ok, in
    // place of barriers), the new files are removed and the previous index
    // and its files stay: no rank waits for another forever.
    std::exception_ptr failure;
    try {
      io::save_checkpoint(file, *shard_, scaler, extras);
    } catch (...) {
      failure = std::current_exception();
    }
    if (!all_ranks_ok(!failure)) {  // every shard is complete, or the save failed everywhere
      if (!failure) std::remove(file.c_str());
      fail(failure, "ShardedOptimizer::save_checkpoint", path);
    }
    try {
      if (comm_->rank() == 0) write_index(path, hex);
    } catch (...) {
      failure = std::current_exception();
    }
    if (!all_ranks_ok(!failure)) {  // the index names the new files, or the save failed everywhere
      // The new files stay: the index may have been renamed into place
      // before the error (a failed fsync of the directory), and then names
      // them. The previous files stay too.
      fail(failure, "ShardedOptimizer::save_checkpoint", path,
           "this rank's new shard file stays (the index may name it), and so do the previous ones");
    }
    // This rank's files of the previous save to the same index (saves to
    // other paths are other checkpoints, and stay).
    std::vector<std::string>& previous = previous_files_[path];
    for (const std::string& f : previous) {
      if (f != file) std::remove(f.c_str());
    }
    previous = {file};
  }

  void write_index(const std::string& path, const char* hex) {
    {
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
  }

  // What a load reads, checked, before anything changes.
  struct Prepared {
    optim::OptimizerState state;
    std::vector<std::vector<std::uint8_t>> weights;  // this rank's pieces' bytes
    io::detail::ScalerSnapshot scaler;
    io::CheckpointExtras got;
    std::mt19937_64 rng;
    std::vector<std::string> old_files;  // this rank's to remove after its next save to the same index
  };

  // Every step that can fail on one rank only (a missing or corrupt file)
  // runs before an agreement of all the ranks: if any failed, every rank
  // throws (the failed ones their own error) and nothing has changed on
  // any; else every rank applies. No rank is left waiting in a collective.
  template <class Scaler>
  void load(const std::string& path, Scaler& scaler, io::CheckpointExtras* extras, stream_t stream) {
    Prepared prep;
    std::exception_ptr failure;
    try {
      prep = prepare(path, scaler, extras);
    } catch (...) {
      failure = std::current_exception();
    }
    agree(failure, "ShardedOptimizer::load_checkpoint", path);
    // Every check has passed on every rank: apply, as io::load_checkpoint
    // does. What can still fail here (device memory for new state) is
    // agreed on too before the gather, so no rank waits in it; the ranks'
    // states may then differ: load again.
    try {
      shard_->load_state(prep.state);
      scaler.load_state(prep.scaler.state, prep.scaler.applied, prep.scaler.skipped);
      if (scaler.options().spike_guard.enabled) {
        const auto w = static_cast<std::size_t>(scaler.options().spike_guard.window);
        scaler.load_spike_guard(prep.scaler.guard.value_or(
            amp::SpikeGuardSnapshot{{}, std::vector<double>(w, 0.0), std::vector<double>(w, 0.0)}));
      }
      io::detail::write_weights(*shard_, prep.weights);
    } catch (...) {
      failure = std::current_exception();
    }
    agree(failure, "ShardedOptimizer::load_checkpoint (applying)", path,
          "this rank's state was loaded, another's not: load again on every rank");
    if (extras != nullptr) {
      extras->metadata = std::move(prep.got.metadata);
      if (extras->rng != nullptr) *extras->rng = prep.rng;
    }
    gather_weights(stream);
    previous_files_[path] = std::move(prep.old_files);
  }

  // Throws on every rank when `failure` is set on any.
  void agree(const std::exception_ptr& failure, const char* what, const std::string& path,
             const char* here = "nothing changed here") {
    if (!all_ranks_ok(!failure)) fail(failure, what, path, here);
  }
  // This rank's own error, or one saying another rank failed and what that
  // left on this rank.
  [[noreturn]] static void fail(const std::exception_ptr& failure, const char* what, const std::string& path,
                                const char* here = "nothing changed here") {
    if (failure) std::rethrow_exception(failure);
    mixprec::detail::throw_error(what, ": '", path, "': another rank failed (see its error); ", here);
  }

  // Whether every rank passed `ok` = true (a collective: every rank calls it).
  bool all_ranks_ok(bool ok) {
    struct {
      int flag;
      int pad;
      double sum;
    } v{ok ? 0 : 1, 0, 0.0};
    static_assert(sizeof v == 16, "flag at 0, sum at 8");
    if (comm_->device().is_cpu()) {
      comm_->all_reduce_check(&v.flag, &v.sum);
      return v.flag == 0;
    }
    void* b = scratch_.data();
    mixprec::detail::copy_raw(b, comm_->device(), &v, Device::cpu(), sizeof v);
    comm_->all_reduce_check(static_cast<int*>(b), reinterpret_cast<double*>(static_cast<char*>(b) + 8));
    mixprec::detail::copy_raw(&v, Device::cpu(), b, comm_->device(), sizeof v);  // waits for it
    return v.flag == 0;
  }

  // Reads the index and the old files that meet this rank's slice (its own
  // alone with the same slices), and assembles its state element by element.
  template <class Scaler>
  Prepared prepare(const std::string& path, const Scaler& scaler, io::CheckpointExtras* extras) {
    std::ifstream in(path, std::ios::binary);
    MIXPREC_CHECK(in.good(), "ShardedOptimizer::load_checkpoint: cannot open the index '", path, "'");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    nlohmann::json index = nlohmann::json::parse(text, nullptr, false);
    MIXPREC_CHECK(!index.is_discarded() && index.is_object() && index.value("format", "") == kIndexFormat,
                  "ShardedOptimizer::load_checkpoint: '", path, "' is not the index of a sharded checkpoint");
    const int saved = index.value("world_size", 0);
    const nlohmann::json& jb = index.contains("bounds") ? index["bounds"] : nlohmann::json();
    bool ok = saved > 0 && jb.is_array() && jb.size() == static_cast<std::size_t>(saved) + 1;
    for (std::size_t k = 0; ok && k < jb.size(); ++k) ok = jb[k].is_number_integer();
    MIXPREC_CHECK(ok, "ShardedOptimizer::load_checkpoint: '", path, "': world_size = ", saved, ", bounds = ",
                  jb.dump(), "; need world_size > 0 and world_size + 1 integer bounds");
    const std::vector<std::int64_t> old = jb.get<std::vector<std::int64_t>>();
    MIXPREC_CHECK(old.front() == 0 && old.back() == bounds_.back() && std::is_sorted(old.begin(), old.end()),
                  "ShardedOptimizer::load_checkpoint: '", path, "' holds slices ", jb.dump(), " of ", old.back(),
                  " elements; this optimizer's parameters have ", bounds_.back(), ": other parameters");
    const nlohmann::json& jf = index.contains("files") ? index["files"] : nlohmann::json();
    ok = jf.is_array() && jf.size() == static_cast<std::size_t>(saved);
    for (std::size_t k = 0; ok && k < jf.size(); ++k) ok = jf[k].is_string();
    MIXPREC_CHECK(ok, "ShardedOptimizer::load_checkpoint: '", path, "' does not list one file per rank (",
                  saved, " ranks)");
    const std::size_t slash = path.rfind('/');
    std::vector<std::string> files;
    for (const auto& f : jf) {
      const std::string name = f.get<std::string>();
      files.push_back(slash == std::string::npos ? name : path.substr(0, slash + 1) + name);
    }
    MIXPREC_CHECK(!scaler.in_iteration(), "ShardedOptimizer::load_checkpoint: the scaler is in the middle of an "
                  "iteration (update() not called yet)");
    Prepared prep;
    reshard(path, files, old, scaler.options(), extras != nullptr, extras != nullptr && extras->rng != nullptr, prep);
    const auto r = static_cast<std::size_t>(comm_->rank());
    for (std::size_t k = r; k < files.size(); k += static_cast<std::size_t>(comm_->size())) {
      prep.old_files.push_back(files[k]);
    }
    return prep;
  }

  // The part of parameter `param` in one rank's slice.
  struct Piece {
    std::size_t param;
    std::int64_t offset, count;
  };
  // Rank k's pieces under `bounds`, in parameter order.
  std::vector<Piece> pieces_of(const std::vector<std::int64_t>& bounds, int k) const {
    const auto kk = static_cast<std::size_t>(k);
    std::vector<Piece> out;
    std::int64_t at = 0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const std::int64_t n = params_[i].weight.numel();
      const std::int64_t a = std::max(at, bounds[kk]), b = std::min(at + n, bounds[kk + 1]);
      if (a < b) out.push_back({i, a - at, b - a});
      at += n;
    }
    return out;
  }
  static std::string piece_name(const optim::Param& p, std::int64_t offset) {
    return p.name + "@" + std::to_string(offset);
  }

  // What old rank k's shard file holds, read and checked (io::detail::read,
  // which changes nothing) through shard() where the pieces are this rank's,
  // else through an optimizer of that rank's pieces over host memory, built
  // with this shard's options and schedule.
  io::detail::Contents read_shard(const std::string& file, const std::vector<Piece>& pieces,
                                  const amp::GradScalerOptions& scaler_options, io::CheckpointExtras* got,
                                  std::mt19937_64* rng) const {
    const io::SafetensorsFile f = io::SafetensorsFile::read(file);
    // This rank's own slice (a load on the same slices): shard() itself has
    // exactly those pieces, names and options; no host optimizer needed.
    if (pieces.size() == shard_->num_params() &&
        std::equal(pieces.begin(), pieces.end(), pieces_of(bounds_, comm_->rank()).begin(),
                   [](const Piece& a, const Piece& b) {
                     return a.param == b.param && a.offset == b.offset && a.count == b.count;
                   })) {
      return io::detail::read(f, *shard_, scaler_options, got, rng);
    }
    std::vector<Buffer> storage;  // the host weights and gradients; outlive `tmp`
    storage.reserve(2 * pieces.size());
    std::vector<optim::Param> ps;
    for (const Piece& c : pieces) {
      const optim::Param& p = params_[c.param];
      const std::size_t bytes = static_cast<std::size_t>(c.count) * dtype_size(p.weight.dtype());
      for (int j = 0; j < 2; ++j) {
        storage.emplace_back(bytes, Device::cpu());
        std::memset(storage.back().data(), 0, bytes);
      }
      ps.push_back({piece_name(p, c.offset), host_view(p.weight, storage[storage.size() - 2].data(), c.count),
                    host_view(p.weight, storage.back().data(), c.count)});
    }
    Opt tmp(std::move(ps), options_);
    tmp.set_schedule(shard_->schedule());
    return io::detail::read(f, tmp, scaler_options, got, rng);
  }
  static TensorRef host_view(const TensorRef& like, void* data, std::int64_t count) {
    return like.visit([&](auto v) -> TensorRef {
      using T = std::remove_const_t<typename decltype(v)::value_type>;
      return TensorView<T>(static_cast<T*>(data), {count}, Device::cpu());
    });
  }

  // This rank's state from the old slices `old` (see load_checkpoint): reads
  // the old files this rank needs one at a time (one file's contents held
  // at once) and copies what meets its pieces, checked; changes nothing.
  void reshard(const std::string& path, const std::vector<std::string>& files, const std::vector<std::int64_t>& old,
               const amp::GradScalerOptions& scaler_options, bool wants_extras, bool wants_rng, Prepared& prep) {
    const auto r = static_cast<std::size_t>(comm_->rank());
    const std::size_t from = r < files.size() ? r : 0;  // the file whose extras this rank takes
    const std::size_t states = shard_->state_names().size();
    const std::vector<Piece> mine = pieces_of(bounds_, static_cast<int>(r));
    optim::OptimizerState& st = prep.state;
    st.params.resize(mine.size());
    prep.weights.resize(mine.size());
    std::vector<std::int64_t> covered(mine.size(), 0);
    for (std::size_t i = 0; i < mine.size(); ++i) {
      st.params[i].master.assign(static_cast<std::size_t>(mine[i].count), 0.0f);
      st.params[i].state.resize(states);
      prep.weights[i].resize(static_cast<std::size_t>(mine[i].count) * dtype_size(params_[mine[i].param].weight.dtype()));
    }
    bool first = true;
    std::size_t base_rank = 0;
    for (std::size_t k = 0; k < files.size(); ++k) {
      const bool meets = std::max(old[k], bounds_[r]) < std::min(old[k + 1], bounds_[r + 1]);
      if (!meets && k != from) continue;
      const std::vector<Piece> pieces = pieces_of(old, static_cast<int>(k));
      const io::detail::Contents c = read_shard(files[k], pieces, scaler_options, k == from && wants_extras ? &prep.got
                                                : nullptr, k == from && wants_rng ? &prep.rng : nullptr);
      if (first) {
        st.lrs = c.opt.lrs;
        st.applied_steps = c.opt.applied_steps;
        prep.scaler = c.scaler;
        base_rank = k;
        first = false;
      }
      const bool same = c.opt.lrs == st.lrs && c.opt.applied_steps == st.applied_steps &&
                        c.scaler.state.scale == prep.scaler.state.scale && c.scaler.applied == prep.scaler.applied &&
                        c.scaler.skipped == prep.scaler.skipped;
      MIXPREC_CHECK(same, "ShardedOptimizer::load_checkpoint: the shard files of '", path, "' for old ranks ",
                    base_rank, " and ", k, " disagree (lrs, schedule position, scale or counts): not the files of "
                    "one save");
      // This rank's pieces, element by element from the old pieces that meet them.
      for (std::size_t i = 0; i < mine.size(); ++i) {
        const Piece& p = mine[i];
        optim::ParamState& ps = st.params[i];
        const std::size_t e = dtype_size(params_[p.param].weight.dtype());
        for (std::size_t j = 0; j < pieces.size(); ++j) {
          const Piece& q = pieces[j];
          const std::int64_t a = std::max(p.offset, q.offset), b = std::min(p.offset + p.count, q.offset + q.count);
          if (q.param != p.param || a >= b) continue;
          const optim::ParamState& src = c.opt.params[j];
          const auto to = static_cast<std::size_t>(a - p.offset), at = static_cast<std::size_t>(a - q.offset),
                     n = static_cast<std::size_t>(b - a);
          if (covered[i] == 0) {
            ps.step = src.step;
            for (std::size_t s = 0; s < states; ++s) {
              if (src.state[s]) ps.state[s] = std::vector<float>(static_cast<std::size_t>(p.count), 0.0f);
            }
          }
          bool alike = src.step == ps.step;
          for (std::size_t s = 0; s < states; ++s) alike = alike && src.state[s].has_value() == ps.state[s].has_value();
          MIXPREC_CHECK(alike, "ShardedOptimizer::load_checkpoint: parameter \"", params_[p.param].name,
                        "\" has other step counts or state tensors in old rank ", k, "'s file of '", path,
                        "' than in another: not the files of one save");
          std::copy_n(src.master.begin() + static_cast<std::ptrdiff_t>(at), n,
                      ps.master.begin() + static_cast<std::ptrdiff_t>(to));
          for (std::size_t s = 0; s < states; ++s) {
            if (src.state[s]) {
              std::copy_n(src.state[s]->begin() + static_cast<std::ptrdiff_t>(at), n,
                          ps.state[s]->begin() + static_cast<std::ptrdiff_t>(to));
            }
          }
          std::memcpy(prep.weights[i].data() + to * e, c.weights[j].data() + at * e, n * e);
          covered[i] += b - a;
        }
      }
    }
    for (std::size_t i = 0; i < mine.size(); ++i) {
      MIXPREC_CHECK(covered[i] == mine[i].count, "ShardedOptimizer::load_checkpoint: the files of '", path, "' cover ",
                    covered[i], " of the ", mine[i].count, " elements of parameter \"", params_[mine[i].param].name,
                    "\" from ", mine[i].offset, " that this rank holds");
    }
    shard_->check_state(st);
  }

  // The stream a device communicator's collectives run on: the shard's.
  stream_t step_stream(stream_t stream, const char* what) const {
    if (comm_->device().is_cpu()) return stream;
    const stream_t step = shard_->stream();
    MIXPREC_CHECK(stream == nullptr || stream == step, "ShardedOptimizer::", what, ": stream ",
                  static_cast<const void*>(stream), " is not shard().stream() (", static_cast<const void*>(step),
                  "); the check, the step and ZeRO-1's collectives must share one stream: shard().set_stream(s), "
                  "the scaler on s");
    return step;
  }

  // Rank 0's value, on every rank (through device memory on a device
  // communicator: NCCL moves device memory only).
  std::uint64_t from_rank0(std::uint64_t v) {
    if (comm_->device().is_cpu()) {
      comm_->broadcast(&v, sizeof v, 0);
      return v;
    }
    mixprec::detail::copy_raw(scratch_.data(), comm_->device(), &v, Device::cpu(), sizeof v);
    comm_->broadcast(scratch_.data(), sizeof v, 0);  // the default stream, as the copies
    mixprec::detail::copy_raw(&v, Device::cpu(), scratch_.data(), comm_->device(), sizeof v);
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
  Buffer scratch_;  // device communicators: from_rank0 / all_ranks_ok's 16 bytes
  typename Opt::options_type options_;  // the shard's (re-sharding reads old shards through optimizers of them)
  std::unique_ptr<Opt> shard_;
  // index path -> the files this rank removes once it has saved a new index
  // there (its file of its last save, or old files after a re-sharding load)
  std::map<std::string, std::vector<std::string>> previous_files_;
};

}  // namespace dist
MIXPREC_NAMESPACE_END

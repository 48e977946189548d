// SPDX-License-Identifier: Apache-2.0
// DeviceGradScaler: GradScaler with its state in device memory, for
// optimizers whose parameters are on a CUDA device. Nothing in a training
// step synchronises the host, so a whole step can be captured in a CUDA graph.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "mixprec/amp/device_kernels.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/amp/scale_update.hpp"
#include "mixprec/amp/spike_guard.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace amp {

/// torch.amp.GradScaler on a CUDA device, with GradScaler's options and
/// rules (grad_scaler.hpp). The scale, growth and hysteresis trackers, the
/// iteration's found-inf flag and the applied/skipped counters live on the
/// device; every launch goes to stream().
///
///     my_loss_backward<<<...>>>(..., scaler.scale_data());  // or scaler.scale(seed)
///     scaler.step(optimizer);   // pass 1, pass 2, step counts: launches only
///     scaler.update();          // one single-thread launch
///
/// These, unscale() and clip_grad_norm() never synchronise: they return
/// nothing that would need the device's answer. The functions that do
/// answer (scale(), grad_norm(), found_inf(), nonfinite_params(), state(),
/// applied_steps(), skipped_steps()) copy from the device and synchronise
/// stream(): use them for logging, not inside a captured step. The
/// error_at_min_scale error is read lazily: each update() queues a copy of
/// the state into pinned host memory, and update() and check_errors() raise
/// the error once that copy shows a clamped backoff, a step or more later
/// than the host GradScaler would (never in a graph replay: call
/// check_errors() between replays).
class DeviceGradScaler {
 public:
  explicit DeviceGradScaler(const GradScalerOptions& options = {}, Device device = Device::cuda(0),
                            stream_t stream = nullptr)
      : options_((GradScaler::validate(options), options)),
        policy_(GradScaler::policy(options)),
        device_(device),
        stream_(stream) {
    MIXPREC_CHECK(device.is_cuda(), "DeviceGradScaler: device = ", device,
                  ", must be a CUDA device (amp::GradScaler keeps its state on the host)");
    if (built_with_cuda()) {
      backend_ = &mixprec::detail::require_device_backend("DeviceGradScaler", device);
      kernels_ = device_scaler_kernels();
      MIXPREC_CHECK(kernels_ != nullptr, "DeviceGradScaler: the optimizers' CUDA kernels are linked but not the "
                    "scaler's; include <mixprec/cuda/backend.cuh> in one .cu file, which installs both");
    }
    mixprec::detail::require_usable(device, "DeviceGradScaler");
    DeviceScalerState init;
    init.state = GradScaler::initial_state(options);
    state_ = Buffer(sizeof(DeviceScalerState), device);
    mixprec::detail::copy_raw(state_.data(), device, &init, Device::cpu(), sizeof init);
    mirror_ = static_cast<DeviceScalerState*>(backend_->alloc_pinned(sizeof(DeviceScalerState)));
    *mirror_ = init;
    if (options.spike_guard.enabled) {
      guard_policy_ = amp::policy(options.spike_guard);
      guard_ = Buffer(guard_bytes(), device);
      write_guard(SpikeGuard(options.spike_guard, "DeviceGradScaler").snapshot(), nullptr);
    }
  }
  // Does not touch stream(), which may be gone by now; free_pinned waits
  // for the device, so no copy into the mirror is still in flight.
  ~DeviceGradScaler() {
    if (mirror_ != nullptr) backend_->free_pinned(mirror_);
  }
  DeviceGradScaler(const DeviceGradScaler&) = delete;
  DeviceGradScaler& operator=(const DeviceGradScaler&) = delete;

  const GradScalerOptions& options() const { return options_; }
  bool is_enabled() const { return options_.mode != ScalingMode::disabled; }
  Device device() const { return device_; }
  stream_t stream() const { return stream_; }

  /// The loss scale in device memory, for a loss kernel that seeds the
  /// backward pass with S * dL (read it when the kernel runs).
  const float* scale_data() const { return &device_state()->state.scale; }
  /// The whole scaler state in device memory (scale, trackers, applied and
  /// skipped counts), for an asynchronous copy that a loop reads later
  /// (mixprec::copy_to_host_async) instead of a synchronising read.
  const DeviceScalerState* state_data() const { return device_state(); }
  /// Multiplies a device tensor (a loss, or the seed of the backward pass)
  /// by the scale in place, in its own precision. Asynchronous.
  void scale(const TensorRef& t) {
    MIXPREC_CHECK(t.device() == device_, "DeviceGradScaler::scale: the tensor is on ", t.device(),
                  ", the scaler on ", device_);
    MIXPREC_CHECK(!t.read_only(), "DeviceGradScaler::scale: the tensor is a read-only view");
    if (is_enabled()) kernels_->scale(t, scale_data(), stream_);
  }
  /// The current loss scale: a synchronising read.
  float scale() const { return state().scale; }
  /// torch.amp.GradScaler.get_scale(), the same thing: scale(), which
  /// synchronises (as torch's does on a CUDA scaler).
  float get_scale() const { return scale(); }

  /// As GradScaler::set_grad_divisor: the gradients are the sum of
  /// `divisor` ranks' and the unscale divides by it. A captured graph keeps
  /// the divisor its capture saw.
  void set_grad_divisor(double divisor) {
    MIXPREC_CHECK(std::isfinite(divisor) && divisor >= 1.0, "DeviceGradScaler::set_grad_divisor: divisor = ",
                  divisor, ", must be finite and >= 1 (the number of ranks whose gradients are summed)");
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "DeviceGradScaler::set_grad_divisor: an iteration is under way");
    grad_divisor_ = divisor;
  }
  double grad_divisor() const { return grad_divisor_; }

  /// Sharded optimizers on GPUs (dist::ShardedOptimizer, ZeRO-1): each
  /// rank checks only its slice, so after each check pass the scaler hands
  /// the optimizer's non-finite flag and total sum of squares (device
  /// memory) to `reducer` with the optimizer, which queues on `stream` what makes them the
  /// job's in place (ShardedOptimizer::device_stats_reducer(): one NCCL
  /// launch of 12 bytes). Every rank then skips, scales and clips alike,
  /// with no host synchronisation; found_inf() and grad_norm() answer for
  /// the job. Empty (the default): this process's. Not during an iteration.
  using StatsReducer =
      std::function<void(const optim::Optimizer& opt, int* found_inf, double* total_sum_squares, stream_t stream)>;
  void set_stats_reducer(StatsReducer reducer) {
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "DeviceGradScaler::set_stats_reducer: an iteration is under way");
    stats_reducer_ = std::move(reducer);
  }

  /// The spike guard (options().spike_guard): where the iteration's loss
  /// lies in device memory, a float that the guard's kernel reads when it
  /// runs, at the iteration's first step() (the pointer, like a captured
  /// graph, stays until set again). Required once before the first step()
  /// when the guard judges the loss. Data parallel: the value must be the
  /// same on every rank (all-reduce it first, as llm.c does), or the ranks'
  /// decisions part ways; the gradient norm is the reduced gradients'.
  void set_loss(const float* loss) {
    MIXPREC_CHECK(loss != nullptr, "DeviceGradScaler::set_loss: loss is null");
    const auto guard = records_.lock();
    loss_ = loss;
  }

  /// Pass 1 for `opt`, one launch: non-finite check and sums of squares of
  /// its gradients. For users who clip or inspect before step(). A second
  /// call before update() is an error, as in PyTorch.
  void unscale(optim::Optimizer& opt) {
    require_here(opt);
    const auto guard = records_.lock();
    unscale_locked(opt);
  }

  /// torch.nn.utils.clip_grad_norm_ on the unscaled gradients, after
  /// unscale(): the update multiplies them by min(1, max_norm / (norm +
  /// 1e-6)), the coefficient computed on the device. The norm is
  /// grad_norm(opt) (a synchronising read; this returns nothing).
  void clip_grad_norm(optim::Optimizer& opt, double max_norm) {
    records_.check_max_norm(max_norm);
    const auto guard = records_.lock();
    records_.require_can_clip(opt);
    records_.checked(opt, "clip_grad_norm").max_norm = max_norm;
  }

  /// Unscales (unless unscale() already ran), then launches opt's update,
  /// which changes nothing if a gradient is not finite: masters, state and
  /// step counts untouched. The update is one launch: if it cannot be
  /// launched (an error is thrown) nothing changed and the optimizer stays
  /// unscaled, so step() may be called again.
  ///
  /// Threads: as GradScaler (threads that each step their own optimizers
  /// may share a scaler); each call holds the scaler's lock while it
  /// launches. A launch does not wait for the device, except the first
  /// after a change of the device lists (first step, rebind(), new state),
  /// which synchronises while it holds the lock.
  void step(optim::Optimizer& opt) {
    require_here(opt);
    const auto guard = records_.lock();
    require_guard_loss();
    step_locked(opt);
  }

  /// unscale + clip_grad_norm(max_norm) + step.
  void step(optim::Optimizer& opt, double max_norm) {
    records_.check_max_norm(max_norm);  // before unscale() launches anything
    require_here(opt);
    const auto guard = records_.lock();
    require_guard_loss();
    if (records_.stage(opt) == Stage::ready) unscale_locked(opt);
    records_.require_can_clip(opt);
    records_.checked(opt, "clip_grad_norm").max_norm = max_norm;
    step_locked(opt);
  }

 private:
  void unscale_locked(optim::Optimizer& opt) {
    records_.require_can_unscale(opt);
    opt.launch_check(stream_);
    // The pass's results are this scaler's to combine: the plan's device
    // buffers, written by the check kernel, read by the step kernel.
    if (stats_reducer_) {
      stats_reducer_(opt, const_cast<int*>(opt.device_found_inf()),
                     const_cast<double*>(opt.device_total_sum_squares()), stream_);
    }
    Record& r = records_.get(opt);
    r.num_params = opt.num_params();
    r.found_inf = opt.device_found_inf();
    r.total_sum_squares = opt.device_total_sum_squares();
    r.stage = Stage::unscaled;
  }

  void step_locked(optim::Optimizer& opt) {
    records_.require_can_step(opt);
    if (records_.stage(opt) == Stage::ready) unscale_locked(opt);
    Record& r = records_.get(opt);
    records_.require_same_params(opt, r, "step");
    optim::DeviceStepInputs in;
    in.found_inf = opt.device_found_inf();
    in.scale = scale_data();
    in.grad_divisor = grad_divisor_;
    if (r.max_norm > 0) {
      in.total_sum_squares = opt.device_total_sum_squares();
      in.max_norm = r.max_norm;
    }
    if (!guard_.data()) {
      opt.launch_step(in, &device_state()->any_inf, stream_);
    } else {
      // The guard: the step reads found_inf || the guard's skip, and the
      // scale update (any_inf) only found_inf, or-ed in by the combine
      // kernel: a guard skip is no overflow. Two one-thread launches.
      MIXPREC_CHECK(guard_slot_ < kGuardSlots, "DeviceGradScaler::step: more than ", kGuardSlots,
                    " optimizers stepped in one iteration with the spike guard on");
      if (!decided_) launch_guard_decide();
      int* combined = guard_block()->combined + guard_slot_;
      kernels_->guard_combine(&guard_block()->state, opt.device_found_inf(), combined, &device_state()->any_inf,
                              stream_);
      in.found_inf = combined;
      opt.launch_step(in, nullptr, stream_);
      ++guard_slot_;
    }
    r.stage = Stage::stepped;  // only once launched
  }

  // The guard's decision for the iteration, at its first step(): the loss
  // and the norm over every optimizer unscaled by then (with several
  // optimizers, unscale them all before the first step()).
  void launch_guard_decide() {
    GuardDecideInputs in;
    in.loss = options_.spike_guard.judges_loss() ? loss_ : nullptr;
    for (const Record& r : records_.all()) {
      MIXPREC_CHECK(in.count < GuardDecideInputs::kMaxOptimizers, "DeviceGradScaler::step: more than ",
                    GuardDecideInputs::kMaxOptimizers, " optimizers unscaled in one iteration with the spike guard on");
      in.found_inf[in.count] = r.found_inf;
      in.total_sum_squares[in.count] = r.total_sum_squares;
      ++in.count;
    }
    in.scale = scale_data();
    in.grad_divisor = grad_divisor_;
    kernels_->guard_decide(&guard_block()->state, guard_window(), guard_policy_, in, stream_);
    decided_ = true;
  }

 public:
  /// Ends the iteration with one launch: counts it as applied or skipped
  /// (skipped if any optimizer saw a non-finite gradient) and, in dynamic
  /// mode, updates the scale. Then raises the min_scale error if the copy
  /// of an earlier update shows it (see the class comment).
  void update() { update_with(nullptr); }

  /// update() with its one launch made by `fused` (amp::FusedUpdate), which
  /// adds its own end-of-iteration work to it: the same counts, scale,
  /// errors and spike guard as update(). monitor::Monitor calls this, so a
  /// monitored step launches no kernel of the monitor's own.
  void update(FusedUpdate& fused) { update_with(&fused); }

  /// Raises, once, the error_at_min_scale error if an update that has
  /// completed clamped the scale at min_scale. Never synchronises.
  void check_errors() {
    const volatile DeviceScalerState* m = mirror_;
    if (options_.error_at_min_scale && !raised_ && m->state.min_scale_hits > 0) {
      raised_ = true;
      GradScaler::throw_min_scale("DeviceGradScaler", options_.min_scale, m->skipped);
    }
    // max_consecutive_skips: once per streak that reached the limit; the
    // device counts them (streak_limit_hits only rises), so a copy read
    // several updates late still shows every one.
    const std::int64_t limit = options_.max_consecutive_skips;
    if (limit > 0 && m->streak_limit_hits > streak_seen_) {
      streak_seen_ = m->streak_limit_hits;
      GradScaler::throw_too_many_skips("DeviceGradScaler", limit, m->state.scale);
    }
  }

  // --- synchronising reads -------------------------------------------------

  /// The unscaled global L2 norm of opt's gradients from the last unscale().
  float grad_norm(const optim::Optimizer& opt) const {
    {
      const auto guard = records_.lock();
      records_.checked(opt, "grad_norm");
    }
    double total = 0;
    if (stats_reducer_) {  // the job's, combined in place
      mixprec::detail::copy_raw(&total, Device::cpu(), opt.device_total_sum_squares(), device_, sizeof total, stream_);
    } else {
      total = opt.read_check(stream_).total_sum_squares();
    }
    // The scale of this iteration: update() has not run since unscale().
    const float inv_scale = static_cast<float>(1.0 / (static_cast<double>(scale()) * grad_divisor_));
    return static_cast<float>(std::sqrt(total) * inv_scale);
  }
  /// Whether opt saw a non-finite gradient since the last update().
  bool found_inf(const optim::Optimizer& opt) const {
    {
      const auto guard = records_.lock();
      records_.checked(opt, "found_inf");
    }
    if (stats_reducer_) {  // the job's flag, combined in place
      int flag = 0;
      mixprec::detail::copy_raw(&flag, Device::cpu(), opt.device_found_inf(), device_, sizeof flag, stream_);
      return flag != 0;
    }
    return opt.read_check(stream_).any_nonfinite();
  }
  /// Names of opt's parameters whose gradient held inf or NaN, from the last unscale().
  std::vector<std::string> nonfinite_params(const optim::Optimizer& opt) const {
    {
      const auto guard = records_.lock();
      records_.checked(opt, "nonfinite_params");
    }
    const optim::GradStats stats = opt.read_check(stream_);
    std::vector<std::string> names;
    for (std::size_t i = 0; i < stats.nonfinite.size(); ++i) {
      if (stats.nonfinite[i]) names.push_back(opt.param(i).name);
    }
    return names;
  }
  /// As GradScaler's: applied counts iterations with finite gradients
  /// (guard skips included), skipped those with a non-finite gradient.
  std::int64_t applied_steps() const { return read().applied; }
  std::int64_t skipped_steps() const { return read().skipped; }
  ScalerState state() const { return read().state; }
  /// Iterations the spike guard skipped (0 without it). Synchronising.
  std::int64_t guard_skipped_steps() const { return spike_guard_state().skipped; }
  /// The guard's state (last decision, z-scores, counters). Synchronising;
  /// a default state when the guard is off.
  SpikeGuardState spike_guard_state() const {
    SpikeGuardState s;
    if (guard_.data()) {
      mixprec::detail::copy_raw(&s, Device::cpu(), &guard_block()->state, device_, sizeof s, stream_);
    }
    return s;
  }
  /// The guard's state in device memory (null when off), for an
  /// asynchronous copy that a loop reads later.
  const SpikeGuardState* spike_guard_state_data() const { return guard_.data() ? &guard_block()->state : nullptr; }
  /// The guard's window and counters (checkpoints). Synchronising.
  SpikeGuardSnapshot spike_guard_snapshot() const {
    MIXPREC_CHECK(guard_.data() != nullptr, "DeviceGradScaler::spike_guard_snapshot: the spike guard is off");
    SpikeGuardSnapshot snap;
    snap.state = spike_guard_state();
    const auto w = static_cast<std::size_t>(options_.spike_guard.window);
    std::vector<double> both(2 * w);
    mixprec::detail::copy_raw(both.data(), Device::cpu(), guard_window(), device_, both.size() * sizeof(double),
                              stream_);
    snap.loss.assign(both.begin(), both.begin() + static_cast<std::ptrdiff_t>(w));
    snap.grad_norm.assign(both.begin() + static_cast<std::ptrdiff_t>(w), both.end());
    return snap;
  }
  /// Restores them, checked first; not in the middle of an iteration.
  /// Copies on stream(), which synchronises (not while capturing).
  void load_spike_guard(const SpikeGuardSnapshot& snap) {
    MIXPREC_CHECK(guard_.data() != nullptr, "DeviceGradScaler::load_spike_guard: the spike guard is off");
    check_snapshot(options_.spike_guard, snap, "DeviceGradScaler::load_spike_guard");
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "DeviceGradScaler::load_spike_guard: an iteration is under way (update() "
                  "not called yet)");
    write_guard(snap, stream_);
  }
  /// Whether an iteration is under way: unscale or step called, update not yet.
  bool in_iteration() const {
    const auto guard = records_.lock();
    return !records_.all().empty();
  }

  /// Restores a saved state and counters (checkpoints), checked as
  /// GradScaler::check_state does; not in the middle of an iteration.
  /// Copies on stream(), which synchronises (not while capturing).
  void load_state(const ScalerState& state, std::int64_t applied, std::int64_t skipped) {
    GradScaler::check_state(options_, state, applied, skipped);
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "DeviceGradScaler::load_state: an iteration is under way (update() not "
                  "called yet)");
    DeviceScalerState s;
    s.state = state;
    s.applied = applied;
    s.skipped = skipped;
    mixprec::detail::copy_raw(state_.data(), device_, &s, Device::cpu(), sizeof s, stream_);
    *mirror_ = s;
    raised_ = s.state.min_scale_hits > 0;
    streak_seen_ = 0;  // the loaded state counts no hits
  }

 private:
  void update_with(FusedUpdate* fused) {
    const auto guard = records_.lock();
    records_.require_some("update");
    // An optimizer unscaled but never stepped still counts: its found-inf
    // goes into the iteration's flag (step()'s finish does that otherwise).
    for (const Record& r : records_.all()) {
      if (r.stage == Stage::unscaled) kernels_->or_flag(r.found_inf, &device_state()->any_inf, stream_);
    }
    const bool dynamic = options_.mode == ScalingMode::dynamic;
    if (fused != nullptr) {
      fused->launch(device_state(), policy_, dynamic, stream_);
    } else {
      kernels_->update_scale(device_state(), policy_, dynamic, stream_);
    }
    // The iteration ends on the host once its launch is queued: a launch
    // that throws leaves the records, and update() can be called again
    // (the flag ORs above are idempotent).
    records_.clear();
    decided_ = false;
    guard_slot_ = 0;
    backend_->copy_to_host_async(mirror_, device_state(), sizeof(DeviceScalerState), stream_);
    check_errors();
  }

  using Stage = detail::Stage;
  struct Record : detail::RecordBase {
    const int* found_inf = nullptr;  // the optimizer's pass 1 flag (device)
    const double* total_sum_squares = nullptr;  // and its sum of squares (device)
  };

  // The spike guard in device memory: its state, one combined flag per
  // optimizer stepped in an iteration, then the window (2 x window doubles).
  static constexpr int kGuardSlots = 64;
  struct GuardBlock {
    SpikeGuardState state;
    int combined[kGuardSlots];
  };
  static constexpr std::size_t kGuardWindowOffset = (sizeof(GuardBlock) + 15) / 16 * 16;
  std::size_t guard_bytes() const {
    return kGuardWindowOffset + 2 * static_cast<std::size_t>(options_.spike_guard.window) * sizeof(double);
  }
  GuardBlock* guard_block() const { return static_cast<GuardBlock*>(guard_.data()); }
  double* guard_window() const {
    return reinterpret_cast<double*>(static_cast<char*>(guard_.data()) + kGuardWindowOffset);
  }
  // Writes a (checked) snapshot into the device block, the last decision's
  // fields afresh.
  void write_guard(const SpikeGuardSnapshot& snap, stream_t stream) {
    std::vector<char> bytes(guard_bytes(), 0);
    GuardBlock block{};
    block.state.count = snap.state.count;
    block.state.next = snap.state.next;
    block.state.streak = snap.state.streak;
    block.state.skipped = snap.state.skipped;
    std::memcpy(bytes.data(), &block, sizeof block);
    std::memcpy(bytes.data() + kGuardWindowOffset, snap.loss.data(), snap.loss.size() * sizeof(double));
    std::memcpy(bytes.data() + kGuardWindowOffset + snap.loss.size() * sizeof(double), snap.grad_norm.data(),
                snap.grad_norm.size() * sizeof(double));
    mixprec::detail::copy_raw(guard_.data(), device_, bytes.data(), Device::cpu(), bytes.size(), stream);
  }
  // Before anything of a step changes (lock held).
  void require_guard_loss() const {
    MIXPREC_CHECK(!guard_.data() || !options_.spike_guard.judges_loss() || loss_ != nullptr || decided_,
                  "DeviceGradScaler::step: the spike guard judges the loss (spike_guard.loss_threshold = ",
                  options_.spike_guard.loss_threshold,
                  "): call set_loss(device pointer) before the first step(), or set loss_threshold = +inf");
  }

  void require_here(const optim::Optimizer& opt) const {
    MIXPREC_CHECK(opt.on_device() && opt.device() == device_, "DeviceGradScaler: the parameters of this ",
                  opt.name(), " are on ", opt.device(), ", the scaler on ", device_,
                  opt.on_device() ? "" : " (for parameters on the host use amp::GradScaler)");
  }
  DeviceScalerState* device_state() const { return static_cast<DeviceScalerState*>(state_.data()); }
  DeviceScalerState read() const {
    DeviceScalerState s;
    mixprec::detail::copy_raw(&s, Device::cpu(), state_.data(), device_, sizeof s, stream_);
    return s;
  }

  GradScalerOptions options_;
  ScalePolicy policy_;
  Device device_;
  stream_t stream_;
  optim::DeviceBackend* backend_ = nullptr;
  DeviceScalerKernels* kernels_ = nullptr;
  Buffer state_;                         // one DeviceScalerState
  DeviceScalerState* mirror_ = nullptr;  // pinned: the state as of the last completed update()
  bool raised_ = false;
  std::int64_t streak_seen_ = 0;  // streak_limit_hits already raised
  double grad_divisor_ = 1.0;
  StatsReducer stats_reducer_;  // set_stats_reducer; empty: this process's flag and sums
  detail::Records<Record> records_{"DeviceGradScaler"};
  Buffer guard_;  // the spike guard (GuardBlock + window); empty when off
  SpikeGuardPolicy guard_policy_;
  const float* loss_ = nullptr;  // set_loss
  bool decided_ = false;         // the guard judged this iteration
  int guard_slot_ = 0;           // optimizers stepped this iteration (their combined flags)
};

}  // namespace amp
MIXPREC_NAMESPACE_END

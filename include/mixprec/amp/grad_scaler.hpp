// SPDX-License-Identifier: Apache-2.0
// GradScaler: dynamic loss scaling with torch.amp.GradScaler's API and
// semantics, driving the optimizers' fused check and update passes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/amp/scale_update.hpp"
#include "mixprec/amp/spike_guard.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace amp {

enum class ScalingMode {
  /// The scale grows and backs off (torch.amp.GradScaler).
  dynamic,
  /// The scale stays at init_scale; non-finite steps are still skipped.
  static_scale,
  /// Scale 1, no unscaling; non-finite steps are still skipped (unlike a
  /// disabled torch GradScaler, which steps regardless).
  disabled,
};

/// torch.amp.GradScaler's options and defaults, plus hysteresis, min_scale,
/// max_scale and error_at_min_scale.
struct GradScalerOptions {
  ScalingMode mode = ScalingMode::dynamic;
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int64_t growth_interval = 2000;
  /// Back off only after this many consecutive non-finite steps (1 = torch).
  std::int64_t hysteresis = 1;
  /// Backoff never goes below this; the default, FLT_MIN, only keeps the scale
  /// from becoming subnormal or 0.
  double min_scale = std::numeric_limits<float>::min();
  /// Growth never goes above this (and never to inf whatever it is).
  double max_scale = std::numeric_limits<double>::infinity();
  /// update() throws once when a backoff is clamped at min_scale.
  bool error_at_min_scale = false;
  /// Give up after this many consecutive skipped (non-finite) iterations:
  /// update() throws when the streak reaches it, once per streak. 0 (the
  /// default) never gives up, as torch.
  std::int64_t max_consecutive_skips = 0;
  /// Skips steps whose loss or gradient norm is an outlier (spike_guard.hpp);
  /// off by default. Its skips are counted apart (guard_skipped_steps()).
  SpikeGuardOptions spike_guard;

  /// The defaults for a model whose gradients have this dtype: dynamic
  /// scaling for float16, scaling disabled for bfloat16 and float32 (their
  /// range needs none); non-finite steps are skipped in every mode.
  static GradScalerOptions for_dtype(DType grad_dtype) {
    GradScalerOptions o;
    if (grad_dtype != DType::float16) o.mode = ScalingMode::disabled;
    return o;
  }
};

namespace detail {

/// Where an optimizer is in the current iteration.
enum class Stage { ready, unscaled, stepped };

/// What both scalers remember per optimizer between update() calls.
struct RecordBase {
  std::uint64_t opt = 0;  // Optimizer::id(): never reused, unlike an address
  std::size_t num_params = 0;
  Stage stage = Stage::ready;
  double max_norm = 0;  // > 0 once clip_grad_norm ran
};

/// The per-optimizer records of one iteration and PyTorch's call-order
/// rules, for the scaler called `who` ("GradScaler", "DeviceGradScaler").
template <class Record>
class Records {
 public:
  explicit Records(const char* who) : who_(who) {}
  // Not copyable: a scaler is one object its threads share (copy its
  // state with state() and load_state()).
  Records(const Records&) = delete;
  Records& operator=(const Records&) = delete;

  /// Every member below is called with this lock held: a scaler may be
  /// shared by threads that each step their own optimizers.
  std::unique_lock<std::mutex> lock() const { return std::unique_lock<std::mutex>(mutex_); }

  /// Marks `opt` as being unscaled or stepped by the calling thread until
  /// the returned guard goes; refuses an optimizer another thread is
  /// unscaling or stepping. Called with `held` locked; the guard's
  /// destructor takes `held` again if it was released meanwhile (declare
  /// the guard after the lock, so that it goes first).
  class Busy {
   public:
    Busy(Records& r, std::uint64_t id, std::unique_lock<std::mutex>& held) : r_(&r), id_(id), held_(&held) {}
    Busy(const Busy&) = delete;
    Busy& operator=(const Busy&) = delete;
    ~Busy() {
      if (!held_->owns_lock()) held_->lock();
      r_->busy_.erase(std::find(r_->busy_.begin(), r_->busy_.end(), id_));
    }

   private:
    Records* r_;
    std::uint64_t id_;
    std::unique_lock<std::mutex>* held_;
  };
  Busy begin(const optim::Optimizer& opt, const char* what, std::unique_lock<std::mutex>& held) {
    MIXPREC_CHECK(std::find(busy_.begin(), busy_.end(), opt.id()) == busy_.end(), who_, "::", what,
                  ": another thread is in unscale() or step() on this ", opt.name(),
                  "; an optimizer is stepped by one thread at a time");
    busy_.push_back(opt.id());  // reserved before the guard exists
    return Busy(*this, opt.id(), held);
  }
  void require_idle(const char* what) const {
    MIXPREC_CHECK(busy_.empty(), who_, "::", what, ": another thread is still in unscale() or step()");
  }

  /// The optimizer's record, made on first use: call it once the work it
  /// records has been done, so a refused call leaves no record behind.
  Record& get(const optim::Optimizer& opt) {
    if (Record* r = find(opt)) return *r;
    items_.emplace_back();
    items_.back().opt = opt.id();
    return items_.back();
  }
  /// The optimizer's stage (ready when it has no record).
  Stage stage(const optim::Optimizer& opt) const {
    const Record* r = const_cast<Records&>(*this).find(opt);
    return r ? r->stage : Stage::ready;
  }
  /// The record of an optimizer unscaled since the last update(), or an
  /// error naming `what`.
  const Record& checked(const optim::Optimizer& opt, const char* what) const {
    for (const Record& r : items_) {
      if (r.opt == opt.id() && r.stage != Stage::ready) return r;
    }
    mixprec::detail::throw_error(who_, "::", what, ": no unscale() on this ", opt.name(),
                                 " since the last update()");
  }
  Record& checked(const optim::Optimizer& opt, const char* what) {
    return const_cast<Record&>(std::as_const(*this).checked(opt, what));
  }

  void require_can_unscale(const optim::Optimizer& opt) const {
    const Stage s = stage(opt);
    MIXPREC_CHECK(s != Stage::unscaled, who_, "::unscale: already called on this ", opt.name(),
                  " since the last update()");
    MIXPREC_CHECK(s != Stage::stepped, who_, "::unscale: called after step() on this ", opt.name(),
                  "; call update() first");
  }
  void require_can_clip(const optim::Optimizer& opt) {
    MIXPREC_CHECK(std::find(busy_.begin(), busy_.end(), opt.id()) == busy_.end(), who_,
                  "::clip_grad_norm: another thread is in unscale() or step() on this ", opt.name());
    const Record& r = checked(opt, "clip_grad_norm");
    MIXPREC_CHECK(r.stage == Stage::unscaled, who_, "::clip_grad_norm: step() already ran on this ", opt.name(),
                  " since the last update()");
    require_same_params(opt, r, "clip_grad_norm");
  }
  void require_can_step(const optim::Optimizer& opt) const {
    MIXPREC_CHECK(stage(opt) != Stage::stepped, who_, "::step: already called on this ", opt.name(),
                  " since the last update()");
  }
  // Parameters added after unscale() were never checked: refuse to step them.
  void require_same_params(const optim::Optimizer& opt, const Record& r, const char* what) const {
    MIXPREC_CHECK(opt.num_params() == r.num_params, who_, "::", what, ": ", opt.name(), " has ", opt.num_params(),
                  " parameters, ", r.num_params, " when unscale() checked them; call update() before adding parameters");
  }
  void require_some(const char* what) const {
    MIXPREC_CHECK(!items_.empty(), who_, "::", what, ": no unscale() or step() since the last update()");
  }
  void check_max_norm(double max_norm) const {
    MIXPREC_CHECK(std::isfinite(max_norm) && max_norm > 0.0, who_, ": max_norm = ", max_norm,
                  ", must be finite and > 0");
  }

  const std::vector<Record>& all() const { return items_; }
  std::vector<Record>& all() { return items_; }
  void clear() { items_.clear(); }

 private:
  Record* find(const optim::Optimizer& opt) {
    for (Record& r : items_) {
      if (r.opt == opt.id()) return &r;
    }
    return nullptr;
  }

  const char* who_;
  std::vector<Record> items_;
  std::vector<std::uint64_t> busy_;  // optimizers a thread is unscaling or stepping
  mutable std::mutex mutex_;
};

}  // namespace detail

/// Dynamic loss scaling. A training step, in PyTorch's words:
///
///     loss_grad_seed = scaler.scale(1.0f);   // or scaler.scale(loss)
///     ... backward writes scaled gradients ...
///     scaler.step(optimizer);                // check, unscale, (clip,) update or skip
///     scaler.update();
///
/// Unlike PyTorch, gradients are never rewritten: unscale() reads them once
/// to find non-finite values and the norm, and the inverse scale and the
/// clip coefficient are applied inside the optimizer's update, which reads
/// them a second time. Several optimizers can share one scaler; update()
/// backs off if any of them saw a non-finite gradient.
class GradScaler {
 public:
  explicit GradScaler(const GradScalerOptions& options = {}) : options_(options), guard_(options.spike_guard) {
    validate(options);
    state_ = initial_state(options);
    policy_ = policy(options);
  }

  /// The state a scaler with these options starts from.
  static ScalerState initial_state(const GradScalerOptions& o) {
    ScalerState s;
    s.scale = o.mode == ScalingMode::disabled ? 1.0f : static_cast<float>(o.init_scale);
    return s;
  }
  /// The options as the update rule takes them.
  static ScalePolicy policy(const GradScalerOptions& o) {
    ScalePolicy p;
    p.growth_factor = o.growth_factor;
    p.backoff_factor = o.backoff_factor;
    p.growth_interval = static_cast<std::int32_t>(o.growth_interval);
    p.hysteresis = static_cast<std::int32_t>(o.hysteresis);
    p.min_scale = static_cast<float>(o.min_scale);
    p.max_scale = static_cast<float>(o.max_scale);
    p.max_consecutive_skips = o.max_consecutive_skips;
    return p;
  }
  /// The error update() raises once when a backoff is clamped at min_scale.
  [[noreturn]] static void throw_min_scale(const char* who, double min_scale, std::int64_t skipped) {
    mixprec::detail::throw_error(who, "::update: the scale would fall below min_scale = ", min_scale, " after ",
                                 skipped, " skipped steps; gradients keep overflowing (check the loss and the model)");
  }

  /// The error update() raises when max_consecutive_skips iterations in a row were skipped.
  [[noreturn]] static void throw_too_many_skips(const char* who, std::int64_t limit, float scale) {
    mixprec::detail::throw_error(who, "::update: ", limit, " consecutive iterations skipped (max_consecutive_skips = ",
                                 limit, "; the scale is now ", scale,
                                 "): every gradient keeps overflowing or is NaN (check the loss and the model)");
  }

  static void validate(const GradScalerOptions& o) {
    amp::validate(o.spike_guard, "GradScaler");
    MIXPREC_CHECK(o.max_consecutive_skips >= 0, "GradScaler: max_consecutive_skips = ", o.max_consecutive_skips,
                  ", must be >= 0 (0: never give up)");
    MIXPREC_CHECK(std::isfinite(o.init_scale) && o.init_scale > 0.0 &&
                      o.init_scale <= std::numeric_limits<float>::max(),
                  "GradScaler: init_scale = ", o.init_scale, ", must be finite in float and > 0");
    MIXPREC_CHECK(std::isfinite(o.growth_factor) && o.growth_factor > 1.0,
                  "GradScaler: growth_factor = ", o.growth_factor, ", must be finite and > 1");
    MIXPREC_CHECK(o.backoff_factor > 0.0 && o.backoff_factor < 1.0, "GradScaler: backoff_factor = ",
                  o.backoff_factor, ", must be in (0, 1)");
    MIXPREC_CHECK(o.growth_interval > 0 && o.growth_interval <= std::numeric_limits<std::int32_t>::max(),
                  "GradScaler: growth_interval = ", o.growth_interval, ", must be in [1, 2^31)");
    MIXPREC_CHECK(o.hysteresis > 0 && o.hysteresis <= std::numeric_limits<std::int32_t>::max(),
                  "GradScaler: hysteresis = ", o.hysteresis, ", must be in [1, 2^31)");
    MIXPREC_CHECK(o.min_scale >= std::numeric_limits<float>::min() &&
                      o.min_scale <= std::numeric_limits<float>::max(),
                  "GradScaler: min_scale = ", o.min_scale,
                  ", must be a normal float (>= 1.17549e-38, finite)");
    MIXPREC_CHECK(o.max_scale >= o.min_scale, "GradScaler: max_scale = ", o.max_scale,
                  ", must be >= min_scale = ", o.min_scale);
    if (o.mode != ScalingMode::disabled) {
      MIXPREC_CHECK(o.init_scale >= o.min_scale && o.init_scale <= o.max_scale,
                    "GradScaler: init_scale = ", o.init_scale, ", must be in [min_scale, max_scale] = [",
                    o.min_scale, ", ", o.max_scale, "]");
    }
  }

  const GradScalerOptions& options() const { return options_; }
  bool is_enabled() const { return options_.mode != ScalingMode::disabled; }

  /// The current loss scale (1 when disabled). No side effects.
  float scale() const { return state_.scale; }
  /// torch.amp.GradScaler.get_scale(), the same thing: scale().
  float get_scale() const { return scale(); }

  /// Data parallelism: the stored gradients are the SUM of `divisor` ranks'
  /// gradients (dist::GradientReducer sums them); the unscale divides by it
  /// too, inv_scale = float(1 / (scale * divisor)) in double, so the update
  /// sees their mean without a pass of its own. 1 (the default) is a
  /// single process. Not during an iteration.
  void set_grad_divisor(double divisor) {
    MIXPREC_CHECK(std::isfinite(divisor) && divisor >= 1.0, "GradScaler::set_grad_divisor: divisor = ", divisor,
                  ", must be finite and >= 1 (the number of ranks whose gradients are summed)");
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "GradScaler::set_grad_divisor: an iteration is under way");
    grad_divisor_ = divisor;
  }
  double grad_divisor() const { return grad_divisor_; }

  /// Sharded optimizers (dist::ShardedOptimizer, ZeRO-1): each rank checks
  /// only its slice of the gradients. When set, `reducer(stats, found_inf,
  /// total_sum_squares)` is called after every pass 1 with this rank's
  /// per-parameter stats and their or / sum, and must replace the last two
  /// with the job's (one small collective), so the skip decision and the
  /// clip coefficient are the same everywhere. It runs outside the
  /// scaler's lock and must be called on every rank in the same order (as
  /// any collective). Empty: a single process.
  using StatsReducer = std::function<void(const optim::GradStats& stats, bool& found_inf, double& total_sum_squares)>;
  void set_stats_reducer(StatsReducer reducer) {
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "GradScaler::set_stats_reducer: an iteration is under way");
    stats_reducer_ = std::move(reducer);
  }
  /// loss * scale(): what the backward pass starts from.
  float scale(float loss) const { return loss * state_.scale; }

  /// The spike guard (options().spike_guard): the iteration's loss, which
  /// the guard judges at the iteration's first step(). Required before that
  /// step when the guard judges the loss; ignored when it does not. Data
  /// parallel: every rank must pass the same value (the loss all-reduced
  /// over the ranks, as llm.c does), or the ranks' decisions, and then
  /// their weights, part ways; the gradient norm needs nothing (it is the
  /// norm of the reduced gradients). Forgotten at update().
  void set_loss(float loss) {
    const auto guard = records_.lock();
    MIXPREC_CHECK(!decided_, "GradScaler::set_loss: the spike guard has judged this iteration already (step() ran); "
                  "set the loss before the iteration's first step()");
    loss_ = loss;
    has_loss_ = true;
  }

  /// Pass 1 for `opt`: finds non-finite gradients and measures the gradient
  /// norm, reading each gradient once. For users who clip (clip_grad_norm)
  /// or inspect (grad_norm, found_inf) before step(). A second call before
  /// update() is an error, as in PyTorch.
  ///
  /// Threads: a scaler may be shared by threads that each unscale and step
  /// their own optimizers (the records are locked; the passes run outside
  /// the lock, in parallel). One optimizer is stepped by one thread at a
  /// time: a second thread is refused with an error. update() ends the
  /// iteration for all of them: call it once they are done.
  void unscale(optim::Optimizer& opt) {
    require_host(opt);
    std::unique_lock<std::mutex> guard = records_.lock();
    records_.require_can_unscale(opt);
    const auto busy = records_.begin(opt, "unscale", guard);
    guard.unlock();
    unscale_busy(opt);
  }

  /// The unscaled global L2 norm of opt's gradients, from the last
  /// unscale(); inf or NaN when a gradient is not finite.
  float grad_norm(const optim::Optimizer& opt) const {
    const auto guard = records_.lock();
    return norm_of(records_.checked(opt, "grad_norm"));
  }

  /// torch.nn.utils.clip_grad_norm_ on the unscaled gradients, after
  /// unscale(): the update will multiply them by
  /// min(1, max_norm / (total_norm + 1e-6)). Returns total_norm.
  float clip_grad_norm(optim::Optimizer& opt, double max_norm) {
    records_.check_max_norm(max_norm);
    const auto guard = records_.lock();
    records_.require_can_clip(opt);
    Record& r = records_.checked(opt, "clip_grad_norm");
    const float total = norm_of(r);
    // torch: max_norm / (total_norm + 1e-6) on a float32 tensor, which
    // Tensor.__rtruediv__ evaluates as reciprocal() * max_norm: two roundings.
    const float coef = (1.0f / (total + 1e-6f)) * static_cast<float>(max_norm);
    r.max_norm = max_norm;
    r.clip_coef = coef < 1.0f ? coef : 1.0f;
    return total;
  }

  /// Unscales (unless unscale() already ran), then applies opt's update if
  /// every gradient is finite, or skips it whole: masters, state and step
  /// counts untouched. Returns whether the step was applied. If the update
  /// throws (an allocation that fails, a bad lr), the optimizer is as it
  /// was before the call and stays unscaled: step() may be called again.
  bool step(optim::Optimizer& opt) {
    require_host(opt);
    std::unique_lock<std::mutex> guard = records_.lock();
    records_.require_can_step(opt);
    require_guard_loss("step");
    const auto busy = records_.begin(opt, "step", guard);
    const bool ready = records_.stage(opt) == Stage::ready;
    guard.unlock();
    if (ready) unscale_busy(opt);
    guard.lock();
    const Record& r = records_.get(opt);
    records_.require_same_params(opt, r, "step");
    const bool found_inf = r.found_inf;
    const optim::GradTransform t{r.inv_scale, r.clip_coef};
    const bool outlier = judge_iteration();  // the guard's skip: the scaler's update never sees it
    guard.unlock();
    if (!found_inf && !outlier) opt.apply(t);  // outside the lock: other threads step their optimizers meanwhile
    guard.lock();
    // Only now: an update that threw leaves the optimizer unscaled, not stepped.
    records_.get(opt).stage = Stage::stepped;
    return !found_inf && !outlier;
  }

  /// unscale + clip_grad_norm(max_norm) + step, for the common case.
  bool step(optim::Optimizer& opt, double max_norm) {
    records_.check_max_norm(max_norm);  // before unscale() changes anything
    require_host(opt);
    std::unique_lock<std::mutex> guard = records_.lock();
    require_guard_loss("step");
    const bool ready = records_.stage(opt) == Stage::ready;
    guard.unlock();
    if (ready) unscale(opt);
    clip_grad_norm(opt, max_norm);
    return step(opt);
  }

  /// Ends the iteration: counts it as applied or skipped (skipped if any
  /// optimizer saw a non-finite gradient) and, in dynamic mode, updates the
  /// scale (scale_update.hpp). With error_at_min_scale, throws once, after
  /// the update is complete, when the scale is clamped at min_scale for the
  /// first time; with max_consecutive_skips = K, throws (after the update)
  /// when K iterations in a row have been skipped. Every counter saturates.
  void update() {
    const auto guard = records_.lock();
    records_.require_some("update");
    records_.require_idle("update");
    bool found_inf = false;
    for (const Record& r : records_.all()) found_inf = found_inf || r.found_inf;
    records_.clear();
    decided_ = false;
    has_loss_ = false;
    std::int64_t& count = found_inf ? skipped_ : applied_;
    count = saturating_increment(count);
    const std::int32_t hits = state_.min_scale_hits;
    if (options_.mode == ScalingMode::dynamic) {
      update_scale(state_, found_inf, policy_);
    } else {
      state_.skip_streak = found_inf ? saturating_increment(state_.skip_streak) : 0;
    }
    if (options_.error_at_min_scale && hits == 0 && state_.min_scale_hits > 0) {
      throw_min_scale("GradScaler", options_.min_scale, skipped_);
    }
    if (options_.max_consecutive_skips > 0 && state_.skip_streak == options_.max_consecutive_skips) {
      throw_too_many_skips("GradScaler", options_.max_consecutive_skips, state_.scale);
    }
  }

  /// Whether opt saw a non-finite gradient since the last update().
  bool found_inf(const optim::Optimizer& opt) const {
    const auto guard = records_.lock();
    return records_.checked(opt, "found_inf").found_inf;
  }
  /// Pass 1's per-parameter results for opt (scaled sums of squares,
  /// non-finite flags), from the last unscale().
  optim::GradStats grad_stats(const optim::Optimizer& opt) const {
    const auto guard = records_.lock();
    return records_.checked(opt, "grad_stats").stats;
  }
  /// The inverse scale opt's gradients are unscaled with this iteration.
  float inv_scale(const optim::Optimizer& opt) const {
    const auto guard = records_.lock();
    return records_.checked(opt, "inv_scale").inv_scale;
  }
  /// Names of opt's parameters whose gradient held inf or NaN, from the last unscale().
  std::vector<std::string> nonfinite_params(const optim::Optimizer& opt) const {
    const auto guard = records_.lock();
    const Record& r = records_.checked(opt, "nonfinite_params");
    std::vector<std::string> names;
    for (std::size_t i = 0; i < r.stats.nonfinite.size(); ++i) {
      if (r.stats.nonfinite[i]) names.push_back(opt.param(i).name);
    }
    return names;
  }

  /// Iterations whose gradients were all finite (guard skips included: the
  /// scale treats them as clean) and iterations with a non-finite gradient
  /// (overflow skips). The optimizer's applied_steps() counts applied updates.
  std::int64_t applied_steps() const { return applied_; }
  std::int64_t skipped_steps() const { return skipped_; }
  /// Iterations the spike guard skipped (0 without it): apart from
  /// skipped_steps(), and counted in applied_steps().
  std::int64_t guard_skipped_steps() const {
    const auto guard = records_.lock();
    return guard_.skipped_steps();
  }
  /// The guard's state: its last decision (skip, reasons, z-scores) and window counters.
  SpikeGuardState spike_guard_state() const {
    const auto guard = records_.lock();
    return guard_.state();
  }
  /// The guard's window and counters, for checkpoints (io/checkpoint.hpp
  /// saves them when the guard is enabled).
  SpikeGuardSnapshot spike_guard_snapshot() const {
    const auto guard = records_.lock();
    return guard_.snapshot();
  }
  /// Restores them, checked first (check_snapshot); not in the middle of an
  /// iteration. A resumed run then decides as the uninterrupted one.
  void load_spike_guard(const SpikeGuardSnapshot& snap) {
    check_snapshot(options_.spike_guard, snap, "GradScaler::load_spike_guard");
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "GradScaler::load_spike_guard: an iteration is under way (update() not "
                  "called yet)");
    guard_.load(snap, "GradScaler::load_spike_guard");
  }
  const ScalerState& state() const { return state_; }
  /// Whether an iteration is under way: unscale or step called, update not yet.
  bool in_iteration() const {
    const auto guard = records_.lock();
    return !records_.all().empty();
  }

  /// Throws, naming the field and its value, unless a scaler with options
  /// `o` could be in `state` after `applied` + `skipped` iterations: scale
  /// finite and > 0 (in [min_scale, max_scale] in dynamic mode, the fixed
  /// scale otherwise), trackers and counts >= 0, growth_tracker below
  /// growth_interval, hysteresis_tracker below hysteresis.
  static void check_state(const GradScalerOptions& o, const ScalerState& state, std::int64_t applied,
                          std::int64_t skipped) {
    const float fixed = initial_state(o).scale;
    MIXPREC_CHECK(std::isfinite(state.scale) && state.scale > 0.0f, "GradScaler::load_state: scale = ", state.scale,
                  ", must be finite and > 0");
    if (o.mode == ScalingMode::dynamic) {
      MIXPREC_CHECK(state.scale >= static_cast<float>(o.min_scale) && state.scale <= static_cast<float>(o.max_scale),
                    "GradScaler::load_state: scale = ", state.scale, ", must be in [min_scale, max_scale] = [",
                    o.min_scale, ", ", o.max_scale, "]");
    } else {
      MIXPREC_CHECK(state.scale == fixed, "GradScaler::load_state: scale = ", state.scale, ", a ",
                    o.mode == ScalingMode::disabled ? "disabled" : "static", " scaler's scale is ", fixed);
    }
    MIXPREC_CHECK(state.growth_tracker >= 0 && state.growth_tracker < o.growth_interval,
                  "GradScaler::load_state: growth_tracker = ", state.growth_tracker, ", must be in [0, growth_interval = ",
                  o.growth_interval, ")");
    MIXPREC_CHECK(state.hysteresis_tracker >= 0 && state.hysteresis_tracker < o.hysteresis,
                  "GradScaler::load_state: hysteresis_tracker = ", state.hysteresis_tracker,
                  ", must be in [0, hysteresis = ", o.hysteresis, ")");
    MIXPREC_CHECK(state.min_scale_hits >= 0, "GradScaler::load_state: min_scale_hits = ", state.min_scale_hits,
                  ", must be >= 0");
    MIXPREC_CHECK(state.skip_streak >= 0 && state.skip_streak <= skipped, "GradScaler::load_state: skip_streak = ",
                  state.skip_streak, ", must be in [0, skipped = ", skipped, "]");
    MIXPREC_CHECK(applied >= 0 && skipped >= 0, "GradScaler::load_state: applied = ", applied, ", skipped = ",
                  skipped, "; counts must be >= 0");
  }

  /// Restores a saved state and counters (checkpoints). Checked first
  /// (check_state); not in the middle of an iteration (after unscale or step,
  /// before update).
  void load_state(const ScalerState& state, std::int64_t applied, std::int64_t skipped) {
    check_state(options_, state, applied, skipped);
    const auto guard = records_.lock();
    MIXPREC_CHECK(records_.all().empty(), "GradScaler::load_state: an iteration is under way (update() not called yet)");
    state_ = state;
    applied_ = applied;
    skipped_ = skipped;
  }

 private:
  using Stage = detail::Stage;
  struct Record : detail::RecordBase {
    optim::GradStats stats;
    float inv_scale = 1.0f;
    float clip_coef = 1.0f;
    bool found_inf = false;
    double total_sum_squares = 0;  // this rank's, or the job's (set_stats_reducer)
  };

  static void require_host(const optim::Optimizer& opt) {
    MIXPREC_CHECK(!opt.on_device(), "GradScaler: the parameters of this ", opt.name(), " are on ", opt.device(),
                  "; GradScaler keeps its state on the host, use amp::DeviceGradScaler");
  }
  // Pass 1 with `opt` marked busy by the caller (the lock not held: the
  // pass reads every gradient), then its record, under the lock.
  void unscale_busy(optim::Optimizer& opt) {
    optim::GradStats stats = opt.check_grads();
    bool found_inf = stats.any_nonfinite();
    double total = stats.total_sum_squares();
    if (stats_reducer_) stats_reducer_(stats, found_inf, total);  // the job's, on every rank alike
    const auto guard = records_.lock();
    Record& r = records_.get(opt);
    // PyTorch takes the reciprocal in double and rounds it to float (with
    // a divisor of 1, 1 / (scale * 1) is that same double).
    r.inv_scale = static_cast<float>(1.0 / (static_cast<double>(state_.scale) * grad_divisor_));
    r.stats = std::move(stats);
    r.found_inf = found_inf;
    r.total_sum_squares = total;
    r.num_params = opt.num_params();
    r.stage = Stage::unscaled;
  }
  static float norm_of(const Record& r) {
    return static_cast<float>(std::sqrt(r.total_sum_squares) * r.inv_scale);
  }
  // Called with the lock held, before anything of the step changes.
  void require_guard_loss(const char* what) const {
    MIXPREC_CHECK(!guard_.enabled() || !options_.spike_guard.judges_loss() || has_loss_ || decided_, "GradScaler::",
                  what, ": the spike guard judges the loss (spike_guard.loss_threshold = ",
                  options_.spike_guard.loss_threshold,
                  "): call set_loss(loss) before the iteration's first step(), or set loss_threshold = +inf");
  }
  // The guard's decision for the iteration, made at its first step() (lock
  // held) from the loss and the norm over every optimizer unscaled by then
  // (with several optimizers, unscale them all before the first step()).
  bool judge_iteration() {
    if (!guard_.enabled()) return false;
    if (!decided_) {
      bool any_inf = false;
      double total = 0;
      float inv_scale = 1.0f;
      for (const Record& r : records_.all()) {
        any_inf = any_inf || r.found_inf;
        total += r.total_sum_squares;
        inv_scale = r.inv_scale;  // the same for every optimizer of the iteration
      }
      const float norm = static_cast<float>(std::sqrt(total) * inv_scale);  // as grad_norm()
      const double loss = has_loss_ ? static_cast<double>(loss_) : std::numeric_limits<double>::quiet_NaN();
      guard_skip_ = guard_.step(loss, norm, any_inf);
      decided_ = true;
    }
    return guard_skip_;
  }

  GradScalerOptions options_;
  ScalePolicy policy_;
  ScalerState state_;
  detail::Records<Record> records_{"GradScaler"};
  double grad_divisor_ = 1.0;
  StatsReducer stats_reducer_;
  std::int64_t applied_ = 0;
  std::int64_t skipped_ = 0;
  SpikeGuard guard_;
  float loss_ = 0;           // set_loss, this iteration
  bool has_loss_ = false;
  bool decided_ = false;     // the guard judged this iteration (its first step())
  bool guard_skip_ = false;  // and skips it
};

}  // namespace amp
MIXPREC_NAMESPACE_END

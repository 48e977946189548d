// SPDX-License-Identifier: Apache-2.0
// Monitor: watches one optimizer and its GradScaler while training, on the
// host or on a CUDA device, and says when and why mixed-precision training
// goes unstable (docs/monitor.md).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mixprec/amp/device_grad_scaler.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/monitor/detectors.hpp"
#include "mixprec/monitor/device_ops.hpp"
#include "mixprec/monitor/jsonl.hpp"
#include "mixprec/monitor/tensorboard.hpp"
#include "mixprec/monitor/record.hpp"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {

struct MonitorOptions {
  /// A logged step every `every` steps: its details (per-parameter norms,
  /// update ratios, eps share, exponent histograms) are measured, and
  /// everything since the previous one is read back in one copy.
  int every = 10;
  /// The JSONL log (docs/monitor.md); empty: no log.
  std::string log_path;
  /// A resumed run (load_state): append to log_path, without a second
  /// header, instead of starting it anew (a missing or empty file gets its
  /// header).
  bool append_log = false;
  /// Print events to warning_stream (stderr when null). The detectors
  /// rate-limit them (DetectorOptions::repeat_interval).
  bool warnings = true;
  std::FILE* warning_stream = nullptr;
  /// Device: read-backs in flight in pinned memory before the host waits
  /// for the oldest (the host then runs at most slots * every steps ahead).
  int readback_slots = 8;
  DetectorOptions detectors;
  /// A TensorBoard event file in this directory (created if missing):
  /// every step's loss, loss scale, gradient norm and skip; at each logged
  /// step every parameter's gradient norm, update ratio, eps share and
  /// gradient-exponent histogram, the fp16 shares, each event and the
  /// forecast (docs/monitor.md lists the tags). Empty: none.
  std::string tensorboard_dir;
  /// Called with every record, the events the detectors found in it and
  /// the forecast after it, in step order, on the thread that calls step()
  /// or flush(): to route them to a logger of your own.
  std::function<void(const LogRecord&, const std::vector<Event>&, const Forecast&)> on_record;
};

/// Watches one optimizer and the scaler that steps it. A training step calls
/// monitor.step(loss) where it would call scaler.step(opt); scaler.update():
///
///     amp::DeviceGradScaler scaler;            // or amp::GradScaler on the host
///     monitor::MonitorOptions mo;
///     mo.every = 10;
///     mo.log_path = "run.jsonl";
///     monitor::Monitor monitor(opt, scaler, mo);
///     for (int step = 0; step < steps; ++step) {
///       const float* loss = forward_and_backward(scaler.scale_data());  // yours: loss on the device
///       monitor.step(loss);                    // scaler.step(opt) + scaler.update() + the figures
///     }
///     monitor.flush();                         // the last read-backs (synchronises)
///
/// Every step records its loss, loss scale, whether it was skipped, the
/// global gradient norm and which parameters had non-finite gradients. Every
/// `every`-th step is logged: the check pass also counts the exponent
/// histogram of every gradient (the same reads), and the update pass sums
/// the update ratio, the eps share and the precursors on what it has in
/// cache (Optimizer::set_precursors). On a device all of this stays in
/// device memory, the step's record shares the scaler's end-of-iteration
/// launch (a monitored step launches no more kernels than an unmonitored
/// one), and at a logged step that launch also writes the read-back into
/// pinned host memory; the host reads it a step or more later, never
/// synchronising (unless `readback_slots` read-backs are outstanding). Each
/// read-back goes through the detectors, into the log and, as warnings, to
/// stderr.
///
/// CUDA graphs: a captured step bakes in whether it is logged. Capture two
/// graphs, one with logs_next() false and one with it true, replay the one
/// logs_next() names, and call replayed() after each replay:
///
///     Graph& g = graphs[monitor.logs_next()];
///     if (g.empty()) g.capture(stream, step);  // step() calls monitor.step(loss)
///     g.replay(stream);
///     monitor.replayed();
///
/// The monitor holds references to the optimizer and scaler: they must
/// outlive it, and keep the parameters they had (a group added to the
/// optimizer afterwards is refused at the next step). Memory: a few KiB per
/// parameter.
class Monitor {
 public:
  Monitor(optim::Optimizer& opt, amp::GradScaler& scaler, const MonitorOptions& options = {})
      : Monitor(opt, options, &scaler, nullptr) {}
  Monitor(optim::Optimizer& opt, amp::DeviceGradScaler& scaler, const MonitorOptions& options = {})
      : Monitor(opt, options, nullptr, &scaler) {}
  ~Monitor() {
    if (pinned_ != nullptr) optim::device_backend()->free_pinned(pinned_);
  }
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  /// Host: scaler.step(opt) (with clip_grad_norm(max_norm) when max_norm >
  /// 0) and scaler.update(), with the step's figures. Returns whether the
  /// step was applied.
  bool step(float loss, double max_norm = 0) {
    MIXPREC_CHECK(host_ != nullptr, "Monitor::step(float loss): the parameters are on ", opt_.device(),
                  "; pass the loss as a device pointer (const float*)");
    check_params("step");
    const bool logged = logs_next();
    if (logged) {
      // The update pass sums the precursors on the chunks it has in cache
      // (Optimizer::set_precursors), the check pass the histograms.
      std::fill(precursor_sums_.begin(), precursor_sums_.end(), 0.0);
      opt_.set_precursors(precursor_sums_.data());
      std::fill(host_hist_.begin(), host_hist_.end(), 0);
      opt_.set_grad_histogram(host_hist_.data());
    }
    bool applied = false;
    // The spike guard judges this loss (give the monitor the loss the ranks agree on).
    if (host_->options().spike_guard.enabled) host_->set_loss(loss);
    try {
      applied = max_norm > 0 ? host_->step(opt_, max_norm) : host_->step(opt_);
    } catch (...) {
      opt_.set_grad_histogram(nullptr);
      opt_.set_precursors(nullptr);
      throw;
    }
    opt_.set_grad_histogram(nullptr);
    opt_.set_precursors(nullptr);
    const optim::GradStats& stats = host_->grad_stats(opt_);
    StepSample s;
    s.step = steps_ + 1;
    s.loss = loss;
    s.scale = host_->scale();
    s.skipped = host_->found_inf(opt_);
    s.guard_skipped = host_->options().spike_guard.enabled && host_->spike_guard_state().skip != 0;
    // Data parallel: the gradients are sums over grad_divisor() ranks.
    const double norm_scale = static_cast<double>(s.scale) * host_->grad_divisor();
    s.grad_norm = std::sqrt(stats.total_sum_squares()) / norm_scale;
    for (std::size_t i = 0; i < stats.nonfinite.size(); ++i) {
      if (stats.nonfinite[i]) s.nonfinite_params.push_back(static_cast<int>(i));
    }
    pending_.steps.push_back(s);
    if (logged) pending_.params = host_params(stats, norm_scale, applied);
    host_->update();
    steps_ += 1;
    if (logged) {
      LogRecord r = std::move(pending_);
      pending_ = LogRecord{};  // first: process() can throw (a responder's exception)
      process(std::move(r));
    }
    return applied;
  }

  /// Device: the same with the loss in device memory (null: not recorded),
  /// launches only. The figures come back with the next logged step. The
  /// monitor adds no launch to the step: the scaler's update() launches
  /// the record (or, at a logged step, the publish) in place of its own
  /// kernel (amp::FusedUpdate).
  void step(const float* loss, double max_norm = 0) {
    MIXPREC_CHECK(device_scaler_ != nullptr, "Monitor::step(const float* loss): the parameters are on ",
                  opt_.device(), "; pass the loss as a float");
    check_params("step");
    amp::DeviceGradScaler& scaler = *device_scaler_;
    const stream_t stream = scaler.stream();
    ensure_plan();
    const bool capturing = plan_->capturing(stream);
    const bool logged = logs_next();
    if (logged) {
      // A logged step that ran its check pass and stopped before its
      // publish (an exception) left its counts in the buffers; unless it is
      // being retried (the scaler does not check the gradients again), they go.
      if (dirty_ && !scaler.in_iteration()) plan_->clear(stream);
      if (!capturing) dirty_ = true;  // (a capture runs nothing)
      opt_.set_grad_histogram(plan_->histogram());
      opt_.set_precursors(plan_->precursors());
    }
    // The spike guard reads this loss (the one the ranks agree on).
    if (loss != nullptr && scaler.options().spike_guard.enabled) scaler.set_loss(loss);
    try {
      if (max_norm > 0) {
        scaler.step(opt_, max_norm);
      } else {
        scaler.step(opt_);
      }
    } catch (...) {
      opt_.set_grad_histogram(nullptr);
      opt_.set_precursors(nullptr);
      throw;
    }
    opt_.set_grad_histogram(nullptr);
    opt_.set_precursors(nullptr);
    EndStep end;
    end.plan = plan_.get();
    end.in.loss = loss;
    end.in.scale = scaler.scale_data();
    end.in.found_inf = opt_.device_found_inf();
    end.in.total_sum_squares = opt_.device_total_sum_squares();
    end.in.sum_squares = opt_.device_sum_squares();
    end.in.nonfinite = opt_.device_nonfinite();
    if (const amp::SpikeGuardState* g = scaler.spike_guard_state_data()) end.in.guard_skip = &g->skip;
    end.pinned = logged ? pinned_ : nullptr;
    end.slots = options_.readback_slots;
    try {
      scaler.update(end);  // can throw (error_at_min_scale) after the step is recorded
    } catch (...) {
      if (end.launched) {
        if (logged) dirty_ = false;
        if (!capturing) advance(logged);  // the device counted it: so does the host
      }
      throw;
    }
    if (logged) dirty_ = false;
    if (!capturing) advance(logged);
  }

  /// Whether the next step is a logged one.
  bool logs_next() const { return (steps_ + 1) % options_.every == 0; }
  /// Throws unless the optimizer still has the parameters the monitor was
  /// made for (its buffers are sized for them).
  void check_params(const char* what) const {
    MIXPREC_CHECK(opt_.num_params() == info_.params.size(), "Monitor::", what, ": the ", opt_.name(), " has ",
                  opt_.num_params(), " parameters, the monitor was made for ", info_.params.size(),
                  "; make the monitor after the last add_param_group");
  }
  /// A replayed CUDA graph ran one monitored step (see the class comment).
  void replayed() {
    MIXPREC_CHECK(device_scaler_ != nullptr, "Monitor::replayed: this monitor watches a host optimizer");
    MIXPREC_CHECK(plan_ != nullptr, "Monitor::replayed: no step has been captured or run yet");
    advance(logs_next());
  }
  /// Device: waits for the read-backs in flight and processes them
  /// (synchronises the scaler's stream). Host: nothing to wait for.
  void flush() {
    if (device_scaler_ == nullptr || plan_ == nullptr) return;
    optim::device_backend()->synchronize(device_scaler_->stream());
    poll();
    MIXPREC_CHECK(consumed_ == submitted_, "Monitor::flush: ", submitted_ - consumed_,
                  " read-backs did not arrive; was every replay followed by replayed()?");
  }

  /// What the monitor remembers, as one JSON line, for a checkpoint
  /// (io::CheckpointExtras::metadata): its step and record counts, the
  /// steps since the last record (host), and the detectors' windows, rate
  /// limits, events and forecast. Device: call flush() first, at a logged
  /// step (the steps since it are still in device memory); load_state
  /// takes host monitors' states only, for now.
  std::string save_state() const {
    MIXPREC_CHECK(consumed_ == submitted_, "Monitor::save_state: ", submitted_ - consumed_,
                  " read-backs are in flight; call flush() first");
    MIXPREC_CHECK(device_scaler_ == nullptr || steps_ % options_.every == 0, "Monitor::save_state: step ", steps_,
                  " is not a logged step (every ", options_.every, "); on the device save after a logged step");
    nlohmann::json j;
    j["format"] = "mixprec-monitor-state-1";
    j["steps"] = steps_;
    j["records"] = records_;
    j["every"] = options_.every;
    j["params"] = info_.params.size();
    nlohmann::json pending = nlohmann::json::array();
    for (const StepSample& s : pending_.steps) {
      pending.push_back(
          {s.step, num(s.loss), num(s.scale), s.skipped, num(s.grad_norm), s.nonfinite_params, s.guard_skipped});
    }
    j["pending"] = pending;
    j["detectors"] = detectors_.state();
    return j.dump();
  }
  /// Takes save_state()'s line back into a monitor of the same run (same
  /// optimizer parameters and `every`), before its first step: the steps go
  /// on from where they stopped, and the detectors remember what they had
  /// seen. With append_log the log goes on in the same file. Every check
  /// runs before anything changes.
  ///
  /// A device monitor's state is saved at a logged step (save_state), so
  /// its device counts start there: the first step makes the device's
  /// buffers with the loaded step count (ensure_plan).
  void load_state(const std::string& state) {
    MIXPREC_CHECK(steps_ == 0, "Monitor::load_state: ", steps_, " steps already monitored; load before the first");
    const nlohmann::json j = nlohmann::json::parse(state, nullptr, false);
    MIXPREC_CHECK(!j.is_discarded() && j.is_object() && j.value("format", "") == "mixprec-monitor-state-1",
                  "Monitor::load_state: not a monitor state (save_state's JSON)");
    MIXPREC_CHECK(j.value("every", 0) == options_.every && j.value("params", std::size_t{0}) == info_.params.size(),
                  "Monitor::load_state: the state is of a run with every = ", j.value("every", 0), " and ",
                  j.value("params", std::size_t{0}), " parameters; this one has every = ", options_.every, " and ",
                  info_.params.size());
    LogRecord pending;
    std::int64_t steps = 0, records = 0;
    try {
      steps = j.at("steps").get<std::int64_t>();
      records = j.at("records").get<std::int64_t>();
      for (const auto& p : j.at("pending")) {
        StepSample s;
        s.step = p.at(0).get<std::int64_t>();
        s.loss = from(p.at(1));
        s.scale = from(p.at(2));
        s.skipped = p.at(3).get<bool>();
        s.grad_norm = from(p.at(4));
        s.nonfinite_params = p.at(5).get<std::vector<int>>();
        if (p.size() > 6) s.guard_skipped = p.at(6).get<bool>();  // (states saved before the guard have 6)
        pending.steps.push_back(std::move(s));
      }
    } catch (const nlohmann::json::exception& e) {
      mixprec::detail::throw_error("Monitor::load_state: a malformed state: ", e.what());
    }
    MIXPREC_CHECK(steps >= 0 && records >= 0 && (device_scaler_ == nullptr || pending.steps.empty()),
                  "Monitor::load_state: steps = ", steps, ", records = ", records, ", ", pending.steps.size(),
                  " pending steps: not a state this monitor can go on from");
    MIXPREC_CHECK(device_scaler_ == nullptr || steps % options_.every == 0, "Monitor::load_state: steps = ", steps,
                  " is not a logged step (every ", options_.every, "); a device monitor goes on from a logged step");
    detectors_.restore(j.at("detectors"));  // checks, then changes
    steps_ = steps;
    records_ = records;
    pending_ = std::move(pending);
  }

  /// What a record's events may set off (monitor/precision_fallback.hpp):
  /// called at each record with the record and the events the detectors
  /// raised in it, before they are written anywhere; returns events of its
  /// own (what it did or advises), which join them in the log, the
  /// warnings, TensorBoard, on_record, events() and the saved state. Host
  /// monitors call it inside step(), after the scaler's update, so it may
  /// change the model and rebind the optimizer's parameters; a device
  /// monitor calls it when a read-back arrives, steps later. One at a
  /// time; an empty function removes it.
  using Responder = std::function<std::vector<Event>(const LogRecord&, const std::vector<Event>&)>;
  void set_responder(Responder responder) { responder_ = std::move(responder); }

  const MonitorOptions& options() const { return options_; }
  const RunInfo& info() const { return info_; }
  /// Steps monitored (replayed ones included) and records processed.
  std::int64_t steps() const { return steps_; }
  std::int64_t records() const { return records_; }
  /// Every event so far, the latest forecast, the latest record (null
  /// before the first), a short line for a progress bar.
  const std::vector<Event>& events() const { return detectors_.events(); }
  Forecast forecast() const { return detectors_.forecast(); }
  const LogRecord* last_record() const { return records_ > 0 ? &last_ : nullptr; }
  std::string status_line() const { return detectors_.status_line(); }

 private:
  Monitor(optim::Optimizer& opt, const MonitorOptions& options, amp::GradScaler* host,
          amp::DeviceGradScaler* device)
      : opt_(opt), options_(validated(options)), host_(host), device_scaler_(device),
        info_(run_info(opt, host != nullptr ? host->options() : device->options(), options.every)),
        detectors_(info_, options.detectors) {
    MIXPREC_CHECK(opt.num_params() > 0, "Monitor: the ", opt.name(), " has no parameters");
    if (host != nullptr) {
      MIXPREC_CHECK(!opt.on_device(), "Monitor: the parameters of this ", opt.name(), " are on ", opt.device(),
                    "; monitor them with their amp::DeviceGradScaler");
      precursor_sums_.resize(info_.params.size() * optim::Optimizer::kPrecursorSums);
      host_hist_.resize(info_.params.size() * Bins::count);
    } else {
      MIXPREC_CHECK(opt.on_device() && opt.device() == device->device(), "Monitor: the parameters of this ",
                    opt.name(), " are on ", opt.device(), ", the DeviceGradScaler on ", device->device());
      MIXPREC_CHECK(device_kernels() != nullptr, "Monitor: the parameters are on ", opt.device(),
                    " but no CUDA kernels are linked into this program; compile one .cu file that includes "
                    "<mixprec/cuda/backend.cuh>");
      for (std::size_t g = 0; g < opt.num_groups(); ++g) {
        MIXPREC_CHECK(opt.layout(g).master == optim::Master::fp32, "Monitor: group ", g, " of this ", opt.name(),
                      " keeps no fp32 master (StateLayout::master = ", optim::to_string(opt.layout(g).master),
                      "); the device monitor reads fp32 masters on skipped steps: keep Master::fp32 to monitor it on ",
                      opt.device());
      }
      layout_ = ReadbackLayout::of(options_.every, static_cast<int>(info_.params.size()));
      pinned_ = optim::device_backend()->alloc_pinned(layout_.bytes * static_cast<std::size_t>(options_.readback_slots));
      std::memset(pinned_, 0, layout_.bytes * static_cast<std::size_t>(options_.readback_slots));
    }
    if (!options_.log_path.empty()) {
      // Appending to a log that holds nothing yet: it still starts with its header.
      std::error_code ec;
      const bool fresh = !options_.append_log || !std::filesystem::exists(options_.log_path, ec) ||
                         std::filesystem::file_size(options_.log_path, ec) == 0;
      writer_ = std::make_unique<JsonlWriter>(options_.log_path, options_.append_log);
      if (fresh) writer_->write(header_json(info_));
    }
    if (!options_.tensorboard_dir.empty()) tensorboard_ = std::make_unique<TensorBoardWriter>(options_.tensorboard_dir);
  }

  static MonitorOptions validated(const MonitorOptions& o) {
    MIXPREC_CHECK(o.every >= 1 && o.every <= 1000000, "Monitor: every = ", o.every, ", must be in [1, 1000000]");
    MIXPREC_CHECK(o.readback_slots >= 2 && o.readback_slots <= 1024, "Monitor: readback_slots = ",
                  o.readback_slots, ", must be in [2, 1024]");
    return o;
  }

  static RunInfo run_info(const optim::Optimizer& opt, const amp::GradScalerOptions& s, int every) {
    RunInfo info;
    info.optimizer = opt.name();
    info.device = opt.device().str();
    info.scaling = s.mode == amp::ScalingMode::dynamic ? "dynamic"
                   : s.mode == amp::ScalingMode::static_scale ? "static" : "disabled";
    info.init_scale = s.mode == amp::ScalingMode::disabled ? 1.0 : s.init_scale;
    info.min_scale = s.min_scale;
    info.max_scale = s.max_scale;
    info.every = every;
    for (std::size_t i = 0; i < opt.num_params(); ++i) {
      const optim::Param& p = opt.param(i);
      info.params.push_back({p.name, p.grad.numel(), dtype_name(p.grad.dtype())});
    }
    return info;
  }

  // The logged step's per-parameter figures on the host: the update pass's
  // precursor sums where the step was applied; a skipped step moved
  // nothing (update ratio 0) and its eps share is read from the moments it
  // left as they were.
  std::vector<ParamSample> host_params(const optim::GradStats& stats, double scale, bool applied) const {
    std::vector<ParamSample> out(info_.params.size());
    for (std::size_t i = 0; i < out.size(); ++i) {
      ParamSample& p = out[i];
      const auto n = static_cast<double>(info_.params[i].numel);
      const double* sums = precursor_sums_.data() + i * optim::Optimizer::kPrecursorSums;
      p.grad_norm = std::sqrt(stats.sum_squares[i]) / scale;
      p.nonfinite = stats.nonfinite[i] != 0;
      const optim::SecondMoment sm = opt_.second_moment(i);
      const bool has_v = sm.state >= 0;  // lean moments: no fp32 pointer, a second moment still
      if (applied) {
        p.update_ratio = sums[3] > 0 ? std::sqrt(sums[2] / sums[3]) : std::nan("");
        if (n > 0) {
          p.lost_update_share = sums[4] / n;
          if (has_v) {
            p.eps_share = sums[1] / n;
            p.v_ratio_rms = std::sqrt(sums[0] / n);
          }
        }
      } else {
        p.update_ratio = 0;
        if (sm.v != nullptr && n > 0) p.eps_share = eps_share_of(i, sm);
      }
      for (std::size_t b = 0; b < p.hist.size(); ++b) p.hist[b] = host_hist_[i * Bins::count + b];
    }
    return out;
  }
  // The share of parameter i's second moment under eps^2 once
  // bias-corrected (a skipped step: read from the moments).
  double eps_share_of(std::size_t i, const optim::SecondMoment& sm) const {
    const auto n = static_cast<std::size_t>(info_.params[i].numel);
    const float v_scale = optim::v_hat_scale(sm.beta2, static_cast<double>(opt_.step_count(i)));
    const float eps2 = sm.eps * sm.eps;
    std::size_t count = 0;
    for (std::size_t k = 0; k < n; ++k) count += sm.v[k] * v_scale < eps2 ? 1 : 0;
    return static_cast<double>(count) / static_cast<double>(n);
  }

  // Device: the kernels' view of the parameters, made at the first step
  // (when the optimizer's state exists) and again if its second-moment
  // buffers were made since (an option switched on later).
  void ensure_plan() {
    std::vector<const float*> v(info_.params.size());
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = opt_.second_moment(i).v;
    if (plan_ != nullptr && v == plan_v_) return;
    MIXPREC_CHECK(plan_ == nullptr || !submitted_pending(), "Monitor: the optimizer's state buffers changed "
                  "while read-backs are in flight; call flush() first");
    // The old plan's ring holds the steps since the last logged one.
    MIXPREC_CHECK(plan_ == nullptr || steps_ % options_.every == 0, "Monitor: the optimizer's state buffers changed "
                  "at step ", steps_, ", between logged steps (every ", options_.every, "); change them after a "
                  "logged step");
    std::vector<DeviceParamInfo> params(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
      const optim::SecondMoment sm = opt_.second_moment(i);
      params[i].master = opt_.master(i).data();
      params[i].numel = opt_.master(i).numel();
      params[i].v = sm.v;
      params[i].step = opt_.device_step_count(i);
      params[i].eps = sm.eps;
      params[i].beta2 = sm.beta2;
    }
    // The device's counts go on from the host's, at a logged step (steps_
    // a multiple of every: checked above, and by load_state).
    PlanStart start;
    start.steps = steps_;
    start.published = submitted_;
    plan_ = device_kernels()->make_plan(params, options_.every, opt_.device(), start);
    plan_v_ = std::move(v);
    readback_base_ = steps_ - submitted_ * options_.every;
  }
  bool submitted_pending() const { return consumed_ != submitted_; }

  // The host's count moves on; a logged step's read-back is now in flight.
  // Keeps a slot free for the next one, waiting for the oldest if need be.
  // It waits for that one read-back only, not for the stream: the steps
  // queued behind it keep the device busy while the host writes the log
  // (a stream synchronisation here drained the queue, and the device stood
  // idle while the host processed the records: 5.5% of step time at every
  // 10 in the MLP example).
  void advance(bool logged) {
    steps_ += 1;
    if (logged) submitted_ += 1;
    poll();
    if (submitted_ - consumed_ < options_.readback_slots - 1) return;
    const stream_t stream = device_scaler_->stream();
    while (!arrived()) {
      if (optim::device_backend()->idle(stream)) {
        MIXPREC_CHECK(arrived(), "Monitor: read-back ", consumed_ + 1, " did not arrive though its stream is idle; "
                      "was every replay followed by replayed()?");
        break;
      }
      std::this_thread::yield();
    }
    poll();
  }

  // Whether the oldest read-back in flight has arrived.
  bool arrived() const {
    const volatile ReadbackHeader* h = reinterpret_cast<const volatile ReadbackHeader*>(slot(consumed_));
    return h->seq == consumed_ + 1;
  }
  const char* slot(std::int64_t readback) const {
    return static_cast<const char*>(pinned_) +
           static_cast<std::size_t>(readback % options_.readback_slots) * layout_.bytes;
  }

  // Processes every read-back that has arrived, in order.
  void poll() {
    while (consumed_ < submitted_ && arrived()) {
      std::atomic_thread_fence(std::memory_order_acquire);
      LogRecord r = read_back(slot(consumed_));
      consumed_ += 1;  // before process(): a responder that throws does not make it read this one again
      process(std::move(r));
    }
  }

  LogRecord read_back(const char* slot) const {
    const auto* header = reinterpret_cast<const ReadbackHeader*>(slot);
    const int k = options_.every;
    const std::size_t np = info_.params.size();
    const std::int64_t last = readback_base_ + (consumed_ + 1) * k;
    MIXPREC_CHECK(header->steps == last, "Monitor: read-back ", consumed_ + 1, " holds steps up to ", header->steps,
                  ", expected ", last, "; was every replay followed by replayed()?");
    const auto* steps = reinterpret_cast<const DeviceStep*>(slot + layout_.steps);
    const auto* flags = reinterpret_cast<const std::int32_t*>(slot + layout_.nonfinite);
    const auto* sums = reinterpret_cast<const DeviceParamSums*>(slot + layout_.sums);
    const auto* hist = reinterpret_cast<const std::uint64_t*>(slot + layout_.hist);
    LogRecord r;
    // Data parallel: the gradients are sums over grad_divisor() ranks (the
    // divisor of now: a trainer sets it once, before the first step).
    const double divisor = device_scaler_->grad_divisor();
    for (int j = 0; j < k; ++j) {
      StepSample s;
      s.step = last - k + 1 + j;
      s.loss = steps[j].loss;
      s.scale = steps[j].scale;
      s.skipped = steps[j].found_inf != 0;
      s.guard_skipped = steps[j].guard_skip != 0;
      s.grad_norm = std::sqrt(steps[j].sum_squares) / (s.scale * divisor);
      for (std::size_t i = 0; i < np; ++i) {
        if (flags[static_cast<std::size_t>(j) * np + i] != 0) s.nonfinite_params.push_back(static_cast<int>(i));
      }
      r.steps.push_back(std::move(s));
    }
    const double scale = r.steps.back().scale * divisor;
    r.params.resize(np);
    for (std::size_t i = 0; i < np; ++i) {
      ParamSample& p = r.params[i];
      const DeviceParamSums& s = sums[i];
      p.grad_norm = std::sqrt(s.grad_sum_squares) / scale;
      p.update_ratio = s.weight_sum_squares > 0 ? std::sqrt(s.update_sum_squares / s.weight_sum_squares)
                                                : std::nan("");
      const auto n = static_cast<double>(info_.params[i].numel);
      if (s.has_v != 0 && n > 0) p.eps_share = s.eps_count / n;
      // The precursors: from the update pass, so only where it ran.
      if (!r.steps.back().skipped && !r.steps.back().guard_skipped && n > 0) {
        p.lost_update_share = s.lost_count / n;
        if (opt_.second_moment(i).state >= 0) p.v_ratio_rms = std::sqrt(s.v_ratio_sum / n);
      }
      p.nonfinite = s.nonfinite != 0;
      for (int b = 0; b < Bins::count; ++b) p.hist[static_cast<std::size_t>(b)] = hist[i * Bins::count + static_cast<std::size_t>(b)];
    }
    return r;
  }

  void process(LogRecord r) {
    sync_dtypes();
    std::vector<Event> found = detectors_.observe(r);
    // The responder (the precision fallback) may throw (its on_move does,
    // after a move is complete): the record is still logged and counted
    // once, then the exception goes on to the caller.
    std::exception_ptr responder_error;
    if (responder_) {
      std::vector<Event> more;
      try {
        more = responder_(r, found);
      } catch (...) {
        responder_error = std::current_exception();
      }
      for (const Event& e : more) detectors_.record_event(e);
      found.insert(found.end(), more.begin(), more.end());
      sync_dtypes();
    }
    const Forecast f = detectors_.forecast();
    if (writer_) writer_->write(record_json(info_, r, f, found));
    if (tensorboard_) write_tensorboard(r, f, found);
    if (options_.on_record) options_.on_record(r, found, f);
    if (options_.warnings) {
      std::FILE* out = options_.warning_stream != nullptr ? options_.warning_stream : stderr;
      for (const Event& e : found) {
        std::fprintf(out, "mixprec monitor: step %lld: %s%s%s: %s Try: %s\n", static_cast<long long>(e.step),
                     to_string(e.kind), e.param.empty() ? "" : " in ", e.param.c_str(), e.message.c_str(),
                     e.suggestion.c_str());
      }
      if (!found.empty()) {
        const std::string line = forecast_line(f);
        if (!line.empty()) std::fprintf(out, "mixprec monitor: forecast: %s\n", line.c_str());
      }
    }
    last_ = std::move(r);
    records_ += 1;
    if (responder_error) std::rethrow_exception(responder_error);
  }

  // A parameter whose gradient changed dtype since (Optimizer::rebind, a
  // layer moved to another precision): the detectors' underflow checks
  // follow it. The log's header keeps the dtypes the run started with.
  void sync_dtypes() {
    for (std::size_t i = 0; i < info_.params.size(); ++i) {
      const char* now = dtype_name(opt_.param(i).grad.dtype());
      if (info_.params[i].dtype != now) {
        detectors_.set_param_dtype(i, now);
        info_.params[i].dtype = now;
      }
    }
  }

  // The record's figures as TensorBoard scalars and histograms; what is
  // not a number (a skipped step's norm, an optimizer without eps) is left
  // out. Flushed once per record.
  void write_tensorboard(const LogRecord& r, const Forecast& f, const std::vector<Event>& found) {
    TensorBoardWriter& tb = *tensorboard_;
    for (const StepSample& s : r.steps) {
      if (std::isfinite(s.loss)) tb.add_scalar("loss", s.loss, s.step);
      tb.add_scalar("loss_scale", s.scale, s.step);
      if (std::isfinite(s.grad_norm)) tb.add_scalar("grad_norm", s.grad_norm, s.step);
      tb.add_scalar("skipped", s.skipped ? 1.0 : 0.0, s.step);
      if (guard_on_) tb.add_scalar("guard_skipped", s.guard_skipped ? 1.0 : 0.0, s.step);
    }
    const std::int64_t step = r.last().step;
    for (std::size_t i = 0; i < r.params.size() && i < info_.params.size(); ++i) {
      const ParamSample& p = r.params[i];
      const std::string& n = info_.params[i].name;
      if (std::isfinite(p.grad_norm)) tb.add_scalar("grad_norm/" + n, p.grad_norm, step);
      if (std::isfinite(p.update_ratio)) tb.add_scalar("update_ratio/" + n, p.update_ratio, step);
      if (std::isfinite(p.eps_share)) tb.add_scalar("eps_share/" + n, p.eps_share, step);
      if (std::isfinite(p.v_ratio_rms)) tb.add_scalar("v_ratio_rms/" + n, p.v_ratio_rms, step);
      if (std::isfinite(p.lost_update_share)) tb.add_scalar("lost_update_share/" + n, p.lost_update_share, step);
      tb.add_histogram("grad_exponent/" + n, exponent_histogram(p.hist), step);
    }
    const Histogram all = r.overall();
    tb.add_histogram("grad_exponent", exponent_histogram(all), step);
    const Fp16Shares shares = fp16_shares(all);
    tb.add_scalar("fp16/underflow_share", shares.underflow, step);
    tb.add_scalar("fp16/subnormal_share", shares.subnormal, step);
    tb.add_scalar("fp16/overflow_share", shares.overflow, step);
    for (const Event& e : found) tb.add_scalar(std::string("events/") + to_string(e.kind), e.value, e.step);
    if (std::isfinite(f.steps_to_min_scale)) tb.add_scalar("forecast/steps_to_min_scale", f.steps_to_min_scale, step);
    if (std::isfinite(f.steps_to_underflow)) tb.add_scalar("forecast/steps_to_underflow", f.steps_to_underflow, step);
    if (std::isfinite(f.loss_slope)) tb.add_scalar("forecast/loss_slope", f.loss_slope, step);
    tb.flush();
  }

  static nlohmann::json num(double x) { return state_number(x); }
  static double from(const nlohmann::json& j) { return state_number(j); }

  static std::string forecast_line(const Forecast& f) {
    std::string s;
    char buf[160];
    if (std::isfinite(f.steps_to_min_scale)) {
      std::snprintf(buf, sizeof buf, "the scale reaches min_scale in ~%.0f steps; ", f.steps_to_min_scale);
      s += buf;
    }
    if (std::isfinite(f.steps_to_underflow)) {
      std::snprintf(buf, sizeof buf, "the underflow share crosses its threshold in ~%.0f steps; ", f.steps_to_underflow);
      s += buf;
    }
    if (f.diverging) s += "the loss is diverging; ";
    if (!s.empty()) s.resize(s.size() - 2);
    return s;
  }

  optim::Optimizer& opt_;
  MonitorOptions options_;
  amp::GradScaler* host_ = nullptr;
  amp::DeviceGradScaler* device_scaler_ = nullptr;
  // The scaler's spike guard is on: its skips go to TensorBoard too.
  bool guard_on_ = (host_ != nullptr ? host_->options() : device_scaler_->options()).spike_guard.enabled;
  RunInfo info_;
  Detectors detectors_;
  std::unique_ptr<JsonlWriter> writer_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  Responder responder_;
  std::int64_t steps_ = 0, records_ = 0;
  LogRecord last_;
  // Host.
  LogRecord pending_;
  std::vector<double> precursor_sums_;  // host: the logged step's (Optimizer::set_precursors)
  std::vector<std::uint64_t> host_hist_;
  // Device.
  // The scaler's end of iteration with the step's record (and, at a
  // logged step, the publish) in the same launch.
  struct EndStep final : amp::FusedUpdate {
    DeviceMonitorPlan* plan = nullptr;
    DeviceStepInputs in;
    void* pinned = nullptr;  // a logged step's read-back slots; null: record only
    int slots = 0;
    bool launched = false;
    void launch(amp::DeviceScalerState* s, const amp::ScalePolicy& policy, bool dynamic, stream_t stream) override {
      ScalerUpdate update;
      update.state = s;
      update.policy = policy;
      update.dynamic = dynamic;
      plan->end_step(in, update, pinned, slots, stream);
      launched = true;
    }
  };
  std::unique_ptr<DeviceMonitorPlan> plan_;
  bool dirty_ = false;  // a logged step's counts may be in the plan's buffers with no publish to zero them
  std::vector<const float*> plan_v_;
  ReadbackLayout layout_;
  void* pinned_ = nullptr;
  std::int64_t submitted_ = 0, consumed_ = 0;  // read-backs launched, processed
  // Read-back n (counting from 1 in this process) holds the steps up to
  // readback_base_ + n * every: 0 unless the monitor resumed (load_state)
  // or its plan was made again mid-run (ensure_plan).
  std::int64_t readback_base_ = 0;
};

}  // namespace monitor
MIXPREC_NAMESPACE_END

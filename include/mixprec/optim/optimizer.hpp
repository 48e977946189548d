// SPDX-License-Identifier: Apache-2.0
// Optimizer: the interface every mixprec optimizer implements, and the
// parameter bookkeeping they share (model weight and gradient views, fp32
// masters, fp32 state, step counts, parameter groups, the lr schedule).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/core/saturating.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/fp_mode.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/cpu_step.hpp"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/param.hpp"
#include "mixprec/optim/precursors.hpp"
#include "mixprec/optim/schedule.hpp"
#include "mixprec/optim/state_layout.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// The interface the GradScaler drives, and the shared bookkeeping.
///
/// Each parameter gets an fp32 master weight, initialised from its model
/// weight, and the optimizer's fp32 state (zeros, made on first use). An
/// applied step updates master and state and then rewrites the model weight
/// from the master, rounding to nearest even. (A group's StateLayout may
/// keep the state in bf16 or 8 bits and the master as a remainder or not at
/// all: optim/state_layout.hpp.) A parameter's step count counts
/// applied steps only. The CPU path reads each gradient once in check_grads()
/// and once in apply(), and never writes it.
///
/// All parameters of an optimizer live on one device. On a CUDA device the
/// masters, state, step counts and applied-step count live there too, made
/// when a group is added (so the first step can be captured in a CUDA graph),
/// and steps run as kernel launches through the installed DeviceBackend
/// (device_backend.hpp): step() and the launch_* functions queue work on a
/// stream and return; reading a count (step_count, applied_steps, lr) copies
/// it to the host and so synchronises.
class Optimizer {
 public:
  virtual ~Optimizer() {
    if (order_event_ != nullptr) device_backend()->destroy_event(order_event_);
  }
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  /// The optimizer's name as in torch.optim ("SGD", "Adam", ...).
  virtual const char* name() const = 0;
  /// A number no other optimizer in this process has had; the GradScaler
  /// keys its per-iteration records on it. (Optimizers can be neither copied
  /// nor moved; hold them by value or in a unique_ptr.)
  std::uint64_t id() const { return id_; }

  std::size_t num_params() const { return slots_.size(); }
  std::size_t num_groups() const { return group_lrs_.size(); }
  const Param& param(std::size_t i) const { return slot(i).param; }
  /// Index of the parameter called `name`; throws if there is none.
  std::size_t find(const std::string& name) const {
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].param.name == name) return i;
    }
    detail::throw_error(this->name(), ": no parameter named \"", name, "\"");
  }
  std::size_t group_of(std::size_t i) const { return slot(i).group; }
  /// Parameter i's fp32 master weight, on the parameters' device. Throws
  /// where the group keeps no fp32 master (StateLayout::master remainder or
  /// none): master_values(i) reads those.
  const Tensor<float>& master(std::size_t i) const {
    const Slot& s = slot(i);
    MIXPREC_CHECK(layout_of(i).master == Master::fp32, name(), "::master: parameter \"", s.param.name,
                  "\" keeps no fp32 master (its group's StateLayout::master is ", to_string(layout_of(i).master),
                  "); master_values(i) reconstructs it");
    return s.master;
  }
  /// Parameter i's master weight, as fp32 values on the host, in any layout
  /// (remainder: reconstructed exactly; none: the model weight widened).
  /// Device parameters: a synchronising copy.
  std::vector<float> master_values(std::size_t i) const {
    (void)slot(i);  // checks i
    std::vector<float> out(static_cast<std::size_t>(numel_of(i)));
    read_master(i, out.data());
    return out;
  }
  /// The group's state layout (StateLayout: how moments and master are kept).
  const StateLayout& layout(std::size_t group) const { return group_layouts_.at(check_group(group)); }
  /// Applied steps of parameter i (torch's state['step']). Device
  /// parameters: a synchronising read.
  std::int64_t step_count(std::size_t i) const {
    const Slot& s = slot(i);
    return on_device() ? read_count(s.device_step) : s.step;
  }
  /// Applied steps of the optimizer; this is what schedules advance on.
  /// Device parameters: a synchronising read.
  std::int64_t applied_steps() const { return on_device() ? read_count(applied_device()) : applied_steps_; }

  /// Where the parameters, masters, state and step counts live (the first
  /// group's device; cpu before any group).
  Device device() const { return device_; }
  bool on_device() const { return device_.is_cuda(); }
  /// The stream step() launches on when the parameters are on a device
  /// (default: the default stream). amp::DeviceGradScaler uses its own.
  stream_t stream() const { return stream_; }
  void set_stream(stream_t stream) { stream_ = stream; }

  /// The group's lr before the schedule.
  double base_lr(std::size_t group) const { return group_lrs_.at(check_group(group)); }
  /// The lr the next applied step will use: base_lr * schedule.factor(applied_steps()).
  double lr(std::size_t group) const { return base_lr(group) * schedule_.factor(applied_steps()); }
  void set_lr(std::size_t group, double lr) {
    check_lr(lr);
    check_group_lr(check_group(group), lr);
    group_lrs_.at(group) = lr;
    on_lr_changed(group, lr);
  }
  const LRSchedule& schedule() const { return schedule_; }
  void set_schedule(const LRSchedule& schedule) {
    schedule.validate();
    schedule_ = schedule;
  }

  /// Pass 1: reads every gradient once; writes nothing. Device parameters:
  /// one launch on stream(), then a synchronising read of its results.
  /// Host arithmetic runs with IEEE subnormals whatever the caller's FPU
  /// mode (core/fp_mode.hpp).
  GradStats check_grads() const {
    GradStats stats;
    const detail::IeeeFpMode ieee;
    if (on_device()) {
      Optimizer& self = const_cast<Optimizer&>(*this);  // the plan is a cache
      self.launch_check(stream_);
      std::vector<int> nonfinite;
      plan_->read_check(stats.sum_squares, nonfinite, stream_);
      stats.nonfinite.assign(nonfinite.begin(), nonfinite.end());
      return stats;
    }
    stats.nonfinite.resize(slots_.size());
    stats.sum_squares.resize(slots_.size());
    float g[kChunk];
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const Slot& s = slots_[i];
      const std::int64_t n = s.param.grad.numel();
      double sum = 0;
      float nonfinite = 0;
      std::int64_t done = 0;
      std::uint64_t* bins = grad_histogram_ ? grad_histogram_ + i * kHistogramBins : nullptr;
#if MIXPREC_OPTIM_AVX2
      if (detail::cpu_has_avx2_f16c() && bins == nullptr) {
        s.param.grad.visit([&](auto grad) { done = cpu::check_avx2(grad.data(), n, sum, nonfinite); });
      }
#endif
      for (std::int64_t off = done; off < n; off += kChunk) {
        const std::int64_t m = std::min<std::int64_t>(kChunk, n - off);
        cpu::load_float(s.param.grad, off, m, g);
        if (bins != nullptr) cpu::count_exponents(g, m, bins);  // the chunk is in L1: no second read
        if (m == kChunk) {
          cpu::sum_block(g, sum, nonfinite);
        } else {
          cpu::sum_tail(g, m, sum, nonfinite);
        }
      }
      stats.nonfinite[i] = !(nonfinite == 0.0f);  // NaN compares unequal
      stats.sum_squares[i] = sum;
    }
    return stats;
  }

  /// Pass 2 on the host: one applied step with gradients transformed by
  /// `t`. The caller (GradScaler::step) has decided that the gradients are
  /// finite. Device parameters take launch_step() instead.
  ///
  /// Nothing changes unless the whole step is applied: every group's
  /// scheduled lr is checked first (a non-finite lr throws, naming the group
  /// and the values), then every state buffer is made (a failed allocation
  /// throws and drops the buffers this call made), then every parameter is
  /// updated, which cannot fail. Host arithmetic runs with IEEE subnormals
  /// whatever the caller's FPU mode (core/fp_mode.hpp).
  void apply(const GradTransform& t = {}) {
    MIXPREC_CHECK(!on_device(), name(), "::apply: the parameters are on ", device_,
                  "; use step(), or amp::DeviceGradScaler, which launch the device step");
    for (std::size_t g = 0; g < group_lrs_.size(); ++g) check_scheduled_lr(g);
    allocate_all();
    const detail::IeeeFpMode ieee;
    before_update(t);
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      s.step = saturating_increment(s.step);
      update_param(i, t);
      s.fresh_state = 0;
    }
    applied_steps_ = saturating_increment(applied_steps_);
  }

  /// A plain step with the gradients as they are (no scaler): torch's
  /// optimizer.step(). Does not check for non-finite values. Device
  /// parameters: launched on stream(), no synchronisation.
  void step() {
    if (!on_device()) {
      apply(GradTransform{});
      return;
    }
    DeviceStepInputs in;
    in.found_inf = reinterpret_cast<const int*>(constants_.data());  // 0
    in.scale = reinterpret_cast<const float*>(static_cast<const char*>(constants_.data()) + sizeof(int));  // 1
    launch_step(in, nullptr, stream_);
  }

  /// Checks every weight and gradient buffer before each eager device launch
  /// (check_buffers): for debugging a trainer whose buffers move. Off by default.
  void set_buffer_checks(bool on) { buffer_checks_ = on; }
  bool buffer_checks() const { return buffer_checks_; }

  /// Device parameters: steps the kernel skipped because a group's
  /// scheduled lr (or that lr as a float) was not finite (a synchronising
  /// read). Validated options and schedules never produce one; the host path
  /// throws instead. 0 on the host.
  std::int64_t nonfinite_lr_steps() const { return on_device() ? read_count(applied_device() + 1) : 0; }

  /// Points parameter i at new buffers: for a trainer that reallocates a
  /// weight or gradient between steps (the optimizer keeps the views it was
  /// given; a freed buffer would be written after it is gone). Same shape
  /// and device as before, dtypes may change; the new weight is not read
  /// (the master stays the source of truth) and is written at the next
  /// applied step. Checked as add_param_group checks (no overlaps, not
  /// read-only) before anything changes. Device parameters: the device
  /// lists (weights, masters, state and the gradients pass 1 reads) are
  /// made again at the next launch, or at update_device_lists(), which
  /// synchronise; a captured CUDA graph still holds the old addresses.
  void rebind(std::size_t i, TensorRef weight, TensorRef grad) {
    const Slot& s = slot(i);
    const std::string& n = s.param.name;
    const Shape& shape = s.param.weight.shape();
    MIXPREC_CHECK(weight.shape() == shape && grad.shape() == shape, name(),
                  "::rebind: parameter \"", n, "\": weight shape ", weight.shape(), ", grad shape ", grad.shape(),
                  ", the parameter's is ", shape);
    MIXPREC_CHECK(layout_of(i).master == Master::fp32, name(), "::rebind: parameter \"", n,
                  "\": its group keeps no fp32 master (StateLayout::master = ", to_string(layout_of(i).master),
                  "), so the model weight is part of the master and cannot be swapped for another buffer");
    MIXPREC_CHECK(weight.device() == device_ && grad.device() == device_, name(), "::rebind: parameter \"", n,
                  "\": weight on ", weight.device(), ", grad on ", grad.device(), ", the optimizer's parameters are on ",
                  device_);
    MIXPREC_CHECK(weight.numel() == 0 || (weight.data() && grad.data()), name(), "::rebind: parameter \"", n,
                  "\" has a null weight or grad");
    MIXPREC_CHECK(!weight.read_only(), name(), "::rebind: parameter \"", n, "\": the weight is a read-only view");
    MIXPREC_CHECK(!weight.overlaps(grad), name(), "::rebind: parameter \"", n,
                  "\": the weight shares memory with its gradient");
    for (std::size_t k = 0; k < slots_.size(); ++k) {
      if (k == i) continue;
      const Param& q = slots_[k].param;
      MIXPREC_CHECK(!weight.overlaps(q.weight) && !weight.overlaps(q.grad) && !q.weight.overlaps(grad), name(),
                    "::rebind: parameter \"", n, "\": the new buffers share memory with parameter \"", q.name, "\"");
    }
    Slot& w = slots_[i];
    w.param.weight = std::move(weight);
    w.param.grad = std::move(grad);
    params_changed_ = true;
  }

  /// Device parameters: makes the device lists of the current buffers now
  /// when rebind() or new state changed them, instead of at the next
  /// launch: for a trainer that may capture a CUDA graph next (the lists
  /// are uploaded by synchronising copies, which a capture refuses). Waits
  /// for the device's queued work before freeing the old lists. Host
  /// parameters: nothing to do.
  void update_device_lists() {
    if (on_device()) ensure_plan();
  }

  /// Device parameters: waits until every launch of this optimizer queued
  /// so far has finished (the stream of its last launch, a scaler's, and
  /// stream()): after it, its weights, gradients and lists are no longer
  /// read by the device, and buffers it was given may be freed. Not while
  /// one of them is capturing a CUDA graph. Host parameters: nothing.
  void synchronize() const {
    if (!on_device()) return;
    DeviceBackend& b = *device_backend();
    if (has_launched_ && last_stream_ != stream_) b.synchronize(last_stream_);
    b.synchronize(stream_);
  }

  /// Device parameters: whether a launch of this optimizer (a check or a
  /// step) was ever queued while its stream was capturing a CUDA graph;
  /// such a graph holds the addresses of the buffers and lists it saw, so a
  /// change of buffers (rebind) makes it stale: it must be dropped, and
  /// captured again after one eager step. False on the host.
  bool captured() const { return captured_; }

  /// Device parameters: throws, naming the parameter, unless every weight
  /// and gradient still lies in live device memory (a buffer freed since
  /// the optimizer was given it, and not rebound). Runs whenever the device
  /// lists are made (the first launch, after rebind() or new state), and
  /// before every eager launch when set_buffer_checks(true); call it
  /// yourself before a graph replay if buffers may have moved. It costs two
  /// driver queries per parameter (about 6 ms a step for the 2^30 benchmark
  /// model's ~2,000 tensors on an H200), hence not on by default. Cannot see
  /// a buffer freed and then reallocated at the same address. Host
  /// parameters: nothing to check.
  void check_buffers() const {
    if (!on_device()) return;
    DeviceBackend& b = *device_backend();
    for (const Slot& s : slots_) {
      for (const TensorRef* t : {&s.param.weight, &s.param.grad}) {
        MIXPREC_CHECK(b.is_device_memory(t->data(), t->bytes(), device_), name(), ": parameter \"", s.param.name,
                      "\": its ", t == &s.param.weight ? "weight" : "gradient", " (", t->data(), ", ", t->bytes(),
                      " bytes) is no longer device memory on ", device_,
                      "; a buffer that moves must be rebound (Optimizer::rebind) before the next step");
      }
    }
  }

  // --- checkpoints (mixprec/io/checkpoint.hpp) -------------------------------

  /// The names of the per-parameter state tensors, in torch.optim's words
  /// (Adam: exp_avg, exp_avg_sq, max_exp_avg_sq), indexed as in ParamState.
  virtual std::vector<std::string> state_names() const = 0;

  /// A host copy of the training state. Device parameters: copies on
  /// stream(), which synchronises it.
  OptimizerState save_state() const {
    OptimizerState out;
    if (on_device()) order_accesses();
    out.lrs = group_lrs_;
    out.applied_steps = applied_steps();
    const std::size_t count = state_names().size();
    // Step counts: on a device one copy per group (its counts are contiguous).
    std::vector<std::int64_t> steps(slots_.size());
    for (std::size_t i = 0, g = 0; i < slots_.size(); ++g) {
      std::size_t n = 0;
      while (i + n < slots_.size() && slots_[i + n].group == g) ++n;
      if (on_device()) {
        detail::copy_raw(steps.data() + i, Device::cpu(), group_steps_[g].data(), device_, n * sizeof(std::int64_t),
                         stream_);
      } else {
        for (std::size_t k = 0; k < n; ++k) steps[i + k] = slots_[i + k].step;
      }
      i += n;
    }
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      ParamState p;
      p.master = master_values(i);
      p.state.resize(count);
      for (std::size_t k = 0; k < count; ++k) {
        if (has_state(i, k)) p.state[k] = state_values(i, k);
      }
      p.step = steps[i];
      out.params.push_back(std::move(p));
    }
    return out;
  }

  /// Throws, naming the parameter and the value, unless `st` fits this
  /// optimizer: as many parameters and groups, every array the size of its
  /// parameter, no more state tensors than state_names(), counts >= 0, lrs
  /// finite and >= 0.
  void check_state(const OptimizerState& st) const {
    MIXPREC_CHECK(st.params.size() == slots_.size(), name(), "::load_state: the state holds ", st.params.size(),
                  " parameters, the optimizer has ", slots_.size());
    MIXPREC_CHECK(st.lrs.size() == group_lrs_.size(), name(), "::load_state: the state holds ", st.lrs.size(),
                  " parameter groups, the optimizer has ", group_lrs_.size());
    for (std::size_t g = 0; g < st.lrs.size(); ++g) {
      MIXPREC_CHECK(std::isfinite(st.lrs[g]) && st.lrs[g] >= 0.0, name(), "::load_state: lrs[", g, "] = ",
                    st.lrs[g], ", must be finite and >= 0");
      check_group_lr(g, st.lrs[g]);  // and what the group's options allow (the step size stays a finite float)
    }
    MIXPREC_CHECK(st.applied_steps >= 0, name(), "::load_state: applied_steps = ", st.applied_steps, ", must be >= 0");
    const std::size_t count = state_names().size();
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const ParamState& p = st.params[i];
      const std::string& n = slots_[i].param.name;
      const auto numel = static_cast<std::size_t>(numel_of(i));
      MIXPREC_CHECK(p.master.size() == numel, name(), "::load_state: parameter \"", n, "\": master has ",
                    p.master.size(), " elements, the parameter ", numel);
      MIXPREC_CHECK(p.state.size() <= count, name(), "::load_state: parameter \"", n, "\": ", p.state.size(),
                    " state tensors, a ", name(), " keeps ", count);
      for (std::size_t k = 0; k < p.state.size(); ++k) {
        MIXPREC_CHECK(!p.state[k] || p.state[k]->size() == numel, name(), "::load_state: parameter \"", n,
                      "\": ", state_names()[k], " has ", p.state[k] ? p.state[k]->size() : 0,
                      " elements, the parameter ", numel);
      }
      MIXPREC_CHECK(p.step >= 0, name(), "::load_state: parameter \"", n, "\": step = ", p.step, ", must be >= 0");
    }
    // The values: a state that no run could have reached would turn the
    // next step into NaN (a sqrt of a negative moment) or keep it there.
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const ParamState& p = st.params[i];
      const std::string& n = slots_[i].param.name;
      check_values(p.master, "master", n, [](float x) { return std::isfinite(x); }, "finite");
      for (std::size_t k = 0; k < p.state.size(); ++k) {
        if (!p.state[k]) continue;
        check_values(*p.state[k], state_names()[k].c_str(), n, [](float x) { return std::isfinite(x); }, "finite");
      }
      check_state_values(i, p);
    }
  }

  /// Replaces the training state with `st` (from save_state or a
  /// checkpoint): masters, state tensors (made where `st` has them and they
  /// do not exist yet, dropped where `st` has none), step counts, base lrs,
  /// applied steps. The model weights are not touched, except where the
  /// group keeps no fp32 master (StateLayout::master remainder or none): the
  /// weight is part of the master there, and is written. check_state(st) runs
  /// first and new state tensors are allocated before anything is copied:
  /// a bad state changes nothing. Device parameters: copies on stream() and
  /// makes the device lists again (synchronises; not while capturing).
  void load_state(const OptimizerState& st) {
    check_state(st);
    const std::size_t count = state_names().size();
    // Every allocation before the first copy. Device parameters: the state
    // the options need is made now (zeros, marked fresh: SGD's momentum then
    // starts from the gradient), as prepare_device would; on the host, state
    // the file lacks is made when first used, as in a fresh run.
    if (on_device()) {
      for (std::size_t i = 0; i < slots_.size(); ++i) allocate_state(i);
    }
    std::vector<std::vector<Tensor<float>>> made(slots_.size());  // state the file has and this lacks
    std::vector<std::vector<Packed>> made_packed(slots_.size());  // the same, lean moments
    std::vector<std::vector<bool>> make(slots_.size(), std::vector<bool>(count, false));
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      made[i].resize(count);
      made_packed[i].resize(count);
      for (std::size_t k = 0; k < st.params[i].state.size(); ++k) {
        if (st.params[i].state[k] && !has_state(i, k)) {
          if (layout_of(i).moments == Moments::fp32) {
            made[i][k] = Tensor<float>(slots_[i].param.weight.shape(), device_);
          } else {
            made_packed[i][k] = make_packed(i);
          }
          make[i][k] = true;
        }
      }
    }
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (s.state.size() < count) s.state.resize(count);
      if (s.packed.size() < count) s.packed.resize(count);
      for (std::size_t k = 0; k < count; ++k) {
        if (make[i][k]) {
          s.state[k] = std::move(made[i][k]);
          s.packed[k] = std::move(made_packed[i][k]);
          s.made |= 1u << k;
          params_changed_ = true;
        }
      }
    }
    if (on_device()) {
      ensure_plan();      // the device lists of the final buffers (uploads, synchronises)
      order_accesses();   // the copies below come after every step queued so far
    }
    // Copies.
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      const ParamState& p = st.params[i];
      write_master(i, p.master);
      for (std::size_t k = 0; k < count; ++k) {
        const std::uint32_t bit = 1u << k;
        if (k < p.state.size() && p.state[k].has_value()) {
          write_state(i, k, *p.state[k]);
          s.fresh_state &= ~bit;
        } else if (has_state(i, k) && on_device()) {
          // The options need it, the file has none: as made fresh.
          if (layout_of(i).moments == Moments::fp32) {
            fill(s.state[k], 0.0f);
          } else {
            zero_buffer(s.packed[k].values, stream_);  // after order_accesses(), on the optimizer's stream
            zero_buffer(s.packed[k].scales, stream_);
          }
          s.fresh_state |= bit;
        } else if (has_state(i, k)) {
          s.state[k] = Tensor<float>();  // host: made on first use, as in a fresh run
          if (k < s.packed.size()) s.packed[k] = Packed();
          s.made &= ~bit;
          s.fresh_state &= ~bit;
          params_changed_ = true;
        }
      }
      if (on_device()) {
        detail::copy_raw(s.device_step, device_, &p.step, Device::cpu(), sizeof p.step, stream_);
      } else {
        s.step = p.step;
      }
    }
    if (on_device()) {
      detail::copy_raw(applied_device(), device_, &st.applied_steps, Device::cpu(), sizeof st.applied_steps, stream_);
      device_backend()->synchronize(stream_);  // the zeros and copies are in place before any other stream runs a step
    } else {
      applied_steps_ = st.applied_steps;
    }
    for (std::size_t g = 0; g < st.lrs.size(); ++g) {
      group_lrs_[g] = st.lrs[g];
      on_lr_changed(g, st.lrs[g]);
    }
  }

  /// Sets every parameter's master to masters[i] and its model weight to
  /// the master rounded to the weight's type (loading trained weights);
  /// moments and step counts stay. Sizes, and that every value is finite,
  /// are checked before any change.
  void load_weights(const std::vector<std::vector<float>>& masters) {
    const detail::IeeeFpMode ieee;
    MIXPREC_CHECK(masters.size() == slots_.size(), name(), "::load_weights: ", masters.size(),
                  " arrays for ", slots_.size(), " parameters");
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      MIXPREC_CHECK(masters[i].size() == static_cast<std::size_t>(numel_of(i)), name(),
                    "::load_weights: parameter \"", slots_[i].param.name, "\": ", masters[i].size(),
                    " values, the parameter has ", numel_of(i));
      check_values(masters[i], "weight", slots_[i].param.name, [](float x) { return std::isfinite(x); }, "finite",
                   "::load_weights");
    }
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (layout_of(i).master != Master::fp32) {
        write_master(i, masters[i]);  // writes the weight too
        continue;
      }
      from_host(masters[i], s.master);
      s.param.weight.visit([&](auto w) {
        using T = typename decltype(w)::value_type;
        std::vector<T> rounded(masters[i].size());
        convert_n(masters[i].data(), rounded.size(), rounded.data());
        detail::copy_raw(w.data(), device_, rounded.data(), Device::cpu(), rounded.size() * sizeof(T), stream_);
      });
    }
  }

  // --- for monitors (mixprec::monitor) --------------------------------------

  /// Bins of the log2 histogram that the check pass can count (the layout of
  /// monitor::Bins: 0 zeros, 63 inf/NaN, e = floor(log2|x|) in bin
  /// clamp(e, -45, 16) + 46).
  static constexpr std::size_t kHistogramBins = cpu::kHistogramBins;
  /// While set, every check pass (check_grads, launch_check) also adds the
  /// exponent histogram of each stored gradient to bins[i * 64 + b], on the
  /// parameters' device (the caller zeroes them): the elements it already
  /// reads, no second pass. Null (the default) stops it. A CUDA graph keeps
  /// the setting its capture saw.
  void set_grad_histogram(std::uint64_t* bins) { grad_histogram_ = bins; }
  std::uint64_t* grad_histogram() const { return grad_histogram_; }

  /// Sums the update pass makes per parameter while set_precursors(sums) is
  /// on (the monitor's precursors of instability; null, the default, stops
  /// it): sums[i * kPrecursorSums + j] gets, over parameter i's elements, with
  /// g the gradient the update uses, v the second moment after the update
  /// bias-corrected (the update's v-hat; optimizers without one add 0 to the
  /// first two), m the master before and m' after the step, and w the 16-bit
  /// weight before it:
  ///   j = 0  g^2 / max(v, eps^2)            (Wortsman et al. 2023: RMS > 1 precedes spikes)
  ///   j = 1  1 where v < eps^2              (eps dominates the denominator)
  ///   j = 2  (m' - m)^2                     (the update's norm, squared)
  ///   j = 3  m^2                            (the weight's norm, squared)
  ///   j = 4  1 where |m' - m| < ulp(w) / 2  (an update that rounding to the weight's type would lose
  ///                                          without a master)
  /// The caller zeroes them; a skipped step adds nothing. Host parameters:
  /// computed on the chunk the update has in L1 (no second read of the
  /// gradients, masters or state; the fused AVX2 loop gives way to the
  /// chunked one, which has the same bits). Device parameters: `sums` is
  /// device memory, and the step kernel adds each block's terms with
  /// atomics (the sums' last bits depend on the order blocks finish); a
  /// captured CUDA graph keeps the pointer its capture saw.
  static constexpr std::size_t kPrecursorSums = optim::kPrecursorSums;
  void set_precursors(double* sums) { precursors_ = sums; }
  double* precursors() const { return precursors_; }
  /// Parameter i's second moment (see SecondMoment); {} when it has none.
  virtual SecondMoment second_moment(std::size_t i) const {
    (void)slot(i);
    return {};
  }
  /// Device parameters: where parameter i's step count lives on the device
  /// (kernels read it for bias corrections); null on the host.
  const std::int64_t* device_step_count(std::size_t i) const { return slot(i).device_step; }

  // --- the device path, as amp::DeviceGradScaler drives it -----------------

  /// Pass 1 over every gradient, one launch on `stream`; results at
  /// device_found_inf() and device_total_sum_squares().
  ///
  /// Streams: an optimizer's device work (checks and steps) runs in the
  /// order the host queued it, whatever the streams: a launch on another
  /// stream than the last one first waits, on the device, for the work
  /// queued so far on that one (an event; the host never waits). So checks
  /// and steps of one optimizer on two streams never overlap on its
  /// buffers. (Not while capturing a graph, which orders its own nodes.)
  void launch_check(stream_t stream) {
    require_device("launch_check");
    ensure_plan();
    note_capture(stream);
    if (buffer_checks_ && !captured_now_) check_buffers();
    order_after_last(stream);
    plan_->check(stream, grad_histogram_);
  }
  /// Pass 1's results in device memory (valid once launch_check ran).
  const int* device_found_inf() const { return require_plan("device_found_inf").found_inf(); }
  const double* device_total_sum_squares() const {
    return require_plan("device_total_sum_squares").total_sum_squares();
  }
  /// Pass 1's per-parameter sums of squares (double) and non-finite flags
  /// (int), in device memory.
  const double* device_sum_squares() const { return require_plan("device_sum_squares").sum_squares(); }
  const int* device_nonfinite() const { return require_plan("device_nonfinite").nonfinite(); }
  /// Pass 1's per-parameter results on the host (synchronises `stream`).
  GradStats read_check(stream_t stream) const {
    GradStats stats;
    std::vector<int> nonfinite;
    require_plan("read_check").read_check(stats.sum_squares, nonfinite, stream);
    stats.nonfinite.assign(nonfinite.begin(), nonfinite.end());
    return stats;
  }

  /// Pass 2 on the device, every group and the step's count in ONE launch
  /// on `stream`: reads in.found_inf, in.scale and (for clipping)
  /// in.total_sum_squares when the kernel runs; with *found_inf nonzero
  /// nothing changes. `any_inf` (optional, device) is or-ed with
  /// *found_inf. State that the options need and that does not exist yet
  /// (an option switched on later) is made first, which synchronises; a
  /// failure there, or a launch that fails, leaves the optimizer as it was
  /// (state made by this call is dropped again).
  void launch_step(DeviceStepInputs in, int* any_inf, stream_t stream) {
    require_device("launch_step");
    MIXPREC_CHECK(in.found_inf && in.scale, name(), "::launch_step: found_inf and scale must point to device memory");
    MIXPREC_CHECK(!in.total_sum_squares || (std::isfinite(in.max_norm) && in.max_norm > 0), name(),
                  "::launch_step: max_norm = ", in.max_norm, ", must be finite and > 0 when clipping");
    const std::vector<std::pair<std::size_t, std::size_t>> made = allocate_all();
    try {
      ensure_plan();
      note_capture(stream);
      if (buffer_checks_ && !captured_now_) check_buffers();
      order_after_last(stream);
      in.applied_steps = applied_device();
      in.any_inf = any_inf;
      in.precursors = precursors_;
      in.nonfinite_lr_steps = applied_device() + 1;
      launch_groups(*plan_, in, stream);
    } catch (...) {
      drop_state(made);
      throw;
    }
    for (Slot& s : slots_) s.fresh_state = 0;
  }

 protected:
  static constexpr std::int64_t kChunk = cpu::kChunk;

  /// A state tensor in a lean layout: bf16 values, or 8-bit codes and a
  /// float scale per lean::kBlock values.
  struct Packed {
    Buffer values;
    Buffer scales;
  };

  struct Slot {
    Param param;
    std::size_t group = 0;
    Tensor<float> master;              // StateLayout::master fp32 only
    std::vector<Tensor<float>> state;  // StateLayout::moments fp32
    std::vector<Packed> packed;        // other moments
    Buffer remainder;                  // master remainder: uint16 lower halves
    Buffer tie_bits;                   // master remainder: one bit an element (lean::split_master)
    std::int64_t step = 0;                  // host parameters
    std::int64_t* device_step = nullptr;    // device parameters: in the group's step buffer
    std::uint32_t fresh_state = 0;  // bit k: state k was created for the step under way
    std::uint32_t made = 0;         // bit k: state k exists
  };

  Optimizer() : id_(next_id()) {}

  const Slot& slot(std::size_t i) const {
    MIXPREC_CHECK(i < slots_.size(), name(), ": parameter index ", i, ", there are ", slots_.size());
    return slots_[i];
  }
  Slot& slot(std::size_t i) { return const_cast<Slot&>(std::as_const(*this).slot(i)); }

  std::size_t check_group(std::size_t group) const {
    MIXPREC_CHECK(group < group_lrs_.size(), name(), ": group = ", group, ", there are ",
                  group_lrs_.size());
    return group;
  }

  void check_lr(double lr) const {
    MIXPREC_CHECK(std::isfinite(lr) && lr >= 0.0 && lr <= static_cast<double>(std::numeric_limits<float>::max()),
                  name(), ": lr = ", lr, ", must be >= 0 and finite as a float");
  }
  /// Throws unless `lr` suits group g's other options (OptimizerBase
  /// validates the options with it).
  virtual void check_group_lr(std::size_t group, double lr) const {
    (void)group;
    (void)lr;
  }

  /// Validates a whole group before anything is added (nothing half-added).
  void add_group(std::vector<Param> params, double lr, const StateLayout& layout = {}) {
    check_lr(lr);
    MIXPREC_CHECK(!params.empty(), name(), ": the parameter list is empty");
    const Device device = slots_.empty() ? params[0].weight.device() : device_;
    check_layout(layout, params);
    std::set<std::string> names;
    for (const Slot& s : slots_) names.insert(s.param.name);
    for (std::size_t k = 0; k < params.size(); ++k) {
      const Param& p = params[k];
      const std::string label = p.name.empty() ? "#" + std::to_string(k) : "\"" + p.name + "\"";
      MIXPREC_CHECK(!p.name.empty(), name(), ": parameter ", label, " has an empty name");
      MIXPREC_CHECK(names.insert(p.name).second, name(), ": parameter name ", label,
                    " is used twice");
      MIXPREC_CHECK(p.weight.shape() == p.grad.shape(), name(), ": parameter ", label,
                    ": weight shape ", p.weight.shape(), " != grad shape ", p.grad.shape());
      MIXPREC_CHECK(p.weight.numel() == 0 || (p.weight.data() && p.grad.data()), name(),
                    ": parameter ", label, " has a null weight or grad");
      MIXPREC_CHECK(p.weight.device() == device && p.grad.device() == device, name(), ": parameter ", label,
                    ": weight on ", p.weight.device(), ", grad on ", p.grad.device(), "; every parameter of an "
                    "optimizer must be on one device (", device, ")");
    }
    if (device.is_cuda()) {
      // A missing backend is the likelier mistake in a CUDA build, and the
      // more useful message (also where no device is present).
      if (built_with_cuda()) detail::require_device_backend(name(), device);
      detail::require_usable(device, name());
    }
    // Weights are written every step: none may be read-only, and none may
    // share memory with another weight or with any gradient.
    std::vector<const Param*> all;
    for (const Slot& s : slots_) all.push_back(&s.param);
    for (const Param& p : params) all.push_back(&p);
    for (const Param* p : all) {
      MIXPREC_CHECK(!p->weight.read_only(), name(), ": parameter \"", p->name,
                    "\": the weight is a read-only view (TensorView<const T>); the optimizer writes it");
      for (const Param* q : all) {
        MIXPREC_CHECK(p == q || !p->weight.overlaps(q->weight), name(), ": the weights of \"", p->name,
                      "\" and \"", q->name, "\" share memory; tie parameters by passing them once");
        MIXPREC_CHECK(!p->weight.overlaps(q->grad), name(), ": the weight of \"", p->name,
                      "\" shares memory with the gradient of \"", q->name, "\"");
      }
    }
    // Build the new slots aside (this allocates and may throw), then append
    // them with operations that cannot throw.
    const std::size_t group = group_lrs_.size();
    std::vector<Slot> added;
    added.reserve(params.size());
    Buffer steps, applied, constants;
    if (device.is_cuda()) {
      // The group's step counts, zeros; the optimizer's applied-step count
      // and the constants {int 0, float 1} for plain steps, once.
      steps = make_device_counts(params.size(), device);
      if (slots_.empty()) {
        applied = make_device_counts(2, device);  // applied steps, steps skipped for a non-finite lr
        constants = Buffer(sizeof(int) + sizeof(float), device);
        const int zero = 0;
        const float one = 1.0f;
        char bytes[sizeof zero + sizeof one];
        std::memcpy(bytes, &zero, sizeof zero);
        std::memcpy(bytes + sizeof zero, &one, sizeof one);
        detail::copy_raw(constants.data(), device, bytes, Device::cpu(), sizeof bytes);
      }
    }
    const detail::IeeeFpMode ieee;
    for (std::size_t k = 0; k < params.size(); ++k) {
      Param& p = params[k];
      Slot s;
      if (layout.master == Master::remainder) {
        // The master starts as the weight: its lower half is zero.
        const auto n = static_cast<std::size_t>(p.weight.numel());
        s.remainder = Buffer(n * sizeof(std::uint16_t), device);
        s.tie_bits = Buffer((n + 31) / 32 * sizeof(std::uint32_t), device);
        zero_buffer(s.remainder);
        zero_buffer(s.tie_bits);
      } else if (layout.master == Master::fp32) {
        s.master = Tensor<float>(p.weight.shape(), device);
        if (device.is_cuda()) {
          if (p.weight.numel() > 0) device_backend()->to_float(p.weight, s.master.data(), nullptr);
        } else {
          p.weight.visit([&](auto w) { convert(w, s.master); });
        }
      }  // Master::none: the weight is the only copy
      if (device.is_cuda()) s.device_step = static_cast<std::int64_t*>(steps.data()) + k;
      s.param = std::move(p);
      s.group = group;
      added.push_back(std::move(s));
    }
    if (device.is_cuda()) device_backend()->synchronize(nullptr);  // masters written before any use
    slots_.reserve(slots_.size() + added.size());
    group_lrs_.reserve(group_lrs_.size() + 1);
    group_layouts_.reserve(group_layouts_.size() + 1);
    group_steps_.reserve(group_steps_.size() + 1);
    for (Slot& s : added) slots_.push_back(std::move(s));
    group_lrs_.push_back(lr);
    group_layouts_.push_back(layout);
    group_steps_.push_back(std::move(steps));
    if (slots_.size() == added.size()) {
      device_ = device;
      applied_device_ = std::move(applied);
      constants_ = std::move(constants);
    }
    plan_.reset();
  }

  /// Device parameters: makes the state the options need now for every
  /// parameter, and the device lists, so that the first step launches
  /// without synchronising (it can be captured in a CUDA graph). State made
  /// here starts as zeros like any other; SGD's momentum buffers still start
  /// as a copy of the first gradient because step counts of 1 say so.
  void prepare_device() {
    if (!on_device()) return;
    MIXPREC_CHECK(group_lrs_.size() <= kMaxDeviceGroups, name(), ": ", group_lrs_.size(),
                  " parameter groups; a device optimizer takes at most ", kMaxDeviceGroups,
                  " (a step is one launch carrying every group's hyperparameters)");
    for (std::size_t i = 0; i < slots_.size(); ++i) allocate_state(i);
    for (Slot& s : slots_) s.fresh_state = 0;
    ensure_plan();
  }

  /// Undoes the last add_group (when what follows it fails). Never throws.
  void drop_last_group() noexcept {
    const std::size_t group = group_lrs_.size() - 1;
    while (!slots_.empty() && slots_.back().group == group) slots_.pop_back();
    group_lrs_.pop_back();
    group_layouts_.pop_back();
    group_steps_.pop_back();
    if (slots_.empty()) {
      device_ = Device::cpu();
      applied_device_ = Buffer();
      constants_ = Buffer();
    }
    plan_.reset();
    params_changed_ = false;
  }

  /// Launches pass 2 for every group: DevicePlan::step with this
  /// optimizer's hyperparameters, one entry per group, in group order.
  virtual void launch_groups(DevicePlan& plan, const DeviceStepInputs& in, stream_t stream) = 0;

  /// The first parameter of group g (groups are contiguous).
  std::size_t first_of_group(std::size_t g) const {
    std::size_t i = 0;
    while (i < slots_.size() && slots_[i].group != g) ++i;
    return i;
  }

  /// Throws unless the lr group g's next applied step will use is finite
  /// and finite as a float: the host path's refusal, before any change.
  void check_scheduled_lr(std::size_t g) const {
    const double f = schedule_.factor(applied_steps_);
    const double l = group_lrs_[g] * f;
    MIXPREC_CHECK(std::isfinite(l) && l >= 0.0 && l <= static_cast<double>(std::numeric_limits<float>::max()),
                  name(), "::step: group ", g, "'s lr = ", l, " at applied step ", applied_steps_, " (base lr ",
                  group_lrs_[g], " x schedule factor ", f, ") is not a finite float; nothing was changed");
  }

  /// Per-optimizer invariants of a loaded state (check_state): throws,
  /// naming the tensor and the first bad index (check_values).
  virtual void check_state_values(std::size_t i, const ParamState& p) const {
    (void)i;
    (void)p;
  }
  /// Throws unless ok(v[k]) for every k, naming the first k that is not.
  template <class Ok>
  void check_values(const std::vector<float>& v, const char* tensor, const std::string& param, Ok ok,
                    const char* must, const char* where = "::load_state") const {
    for (std::size_t k = 0; k < v.size(); ++k) {
      MIXPREC_CHECK(ok(v[k]), name(), where, ": parameter \"", param, "\": ", tensor, "[", k, "] = ", v[k],
                    ", must be ", must);
    }
  }

  /// Creates the state buffers parameter i will need at its next step.
  virtual void allocate_state(std::size_t i) = 0;
  /// Called when set_lr changes a group's base lr, so options stay in sync.
  virtual void on_lr_changed(std::size_t group, double lr) = 0;
  /// Updates master and state of parameter i (its step count already
  /// incremented). Implementations call update_elements.
  virtual void update_param(std::size_t i, const GradTransform& t) = 0;
  /// Called by apply() once the state exists, before the first
  /// update_param: a pass over every parameter that the updates need
  /// (optim/family.hpp's pre-pass). Must not change any state.
  virtual void before_update(const GradTransform& t) { (void)t; }

  /// True once state tensor k of parameter i exists.
  bool has_state(std::size_t i, std::size_t k) const {
    // A flag, not the tensor's shape: for an empty parameter an unmade
    // tensor has the master's shape too.
    return (slots_[i].made >> k) & 1u;
  }

  /// State tensor k of parameter i, created as zeros on first use (from
  /// allocate_state, before the step changes anything). Null where the
  /// group's moments are not fp32 (the tensor is made, packed).
  float* state(std::size_t i, std::size_t k) {
    Slot& s = slots_[i];
    if (s.state.size() <= k) s.state.resize(k + 1);
    if (s.packed.size() <= k) s.packed.resize(k + 1);
    const bool packed = layout_of(i).moments != Moments::fp32;
    if (!has_state(i, k)) {
      if (packed) {
        s.packed[k] = make_packed(i);
      } else {
        Tensor<float> t(s.param.weight.shape(), device_);
        fill(t, 0.0f);
        s.state[k] = std::move(t);
      }
      s.made |= 1u << k;
      s.fresh_state |= 1u << k;
      params_changed_ = true;  // the device lists hold the state pointers
    }
    return packed ? nullptr : s.state[k].data();
  }
  /// State tensor k of parameter i if it exists as fp32 values, else null
  /// (never creates it).
  const float* existing_state(std::size_t i, std::size_t k) const {
    return has_state(i, k) && layout_of(i).moments == Moments::fp32 ? slots_[i].state[k].data() : nullptr;
  }

  /// Whether state tensor k never holds negative values (a second moment):
  /// the 8-bit layout then spends the sign bit on precision.
  virtual bool nonnegative_state(std::size_t k) const {
    (void)k;
    return false;
  }

  const StateLayout& layout_of(std::size_t i) const { return group_layouts_[slots_[i].group]; }
  std::int64_t numel_of(std::size_t i) const { return slots_[i].param.weight.numel(); }

  /// Parameter i's master as fp32 values, into out[0, numel).
  void read_master(std::size_t i, float* out) const {
    const Slot& s = slot(i);
    const auto n = static_cast<std::size_t>(numel_of(i));
    if (n == 0) return;
    switch (layout_of(i).master) {
      case Master::fp32:
        order_accesses();
        detail::copy_raw(out, Device::cpu(), s.master.data(), device_, n * sizeof(float), stream_);
        return;
      case Master::remainder: {
        const std::vector<std::uint16_t> w = weight_values<std::uint16_t>(i);  // bf16 bits
        const std::vector<std::uint16_t> r = download<std::uint16_t>(s.remainder);
        const std::vector<std::uint32_t> t = download<std::uint32_t>(s.tie_bits);
        for (std::size_t e = 0; e < n; ++e) out[e] = lean::join_master(w[e], r[e], (t[e / 32] >> (e % 32)) & 1u);
        return;
      }
      case Master::none:
        s.param.weight.visit([&](auto w) {
          using T = typename decltype(w)::value_type;
          const std::vector<T> h = weight_values<T>(i);
          convert_n(h.data(), n, out);
        });
        return;
    }
  }
  /// Sets parameter i's master to `v` (sizes checked by the caller). Where
  /// the group keeps no fp32 master this writes the model weight: rounded to
  /// nearest (remainder: with the remainder that gives `v` back exactly).
  void write_master(std::size_t i, const std::vector<float>& v) {
    Slot& s = slots_[i];
    const std::size_t n = v.size();
    switch (layout_of(i).master) {
      case Master::fp32:
        from_host(v, s.master);
        return;
      case Master::remainder: {
        if (!on_device()) {  // in place: nothing to allocate, so nothing half-written
          auto* w = static_cast<std::uint16_t*>(s.param.weight.data());
          auto* r = static_cast<std::uint16_t*>(s.remainder.data());
          auto* t = static_cast<std::uint32_t*>(s.tie_bits.data());
          for (std::size_t e = 0; e < n; ++e) {
            const lean::SplitMaster m = lean::split_master(v[e]);
            w[e] = m.weight;
            r[e] = m.remainder;
            const std::uint32_t bit = 1u << (e % 32);
            t[e / 32] = m.tie_up ? (t[e / 32] | bit) : (t[e / 32] & ~bit);
          }
          return;
        }
        // Device: staged on the host, then copied. (A failed allocation of
        // the staging here, after earlier parameters were written, would
        // leave a load half-done: device lean layouts only.)
        std::vector<std::uint16_t> w(n), r(n);
        std::vector<std::uint32_t> t((n + 31) / 32, 0u);
        for (std::size_t e = 0; e < n; ++e) {
          const lean::SplitMaster m = lean::split_master(v[e]);
          w[e] = m.weight;
          r[e] = m.remainder;
          t[e / 32] |= static_cast<std::uint32_t>(m.tie_up) << (e % 32);
        }
        write_weight(i, w);
        upload(s.remainder, r);
        upload(s.tie_bits, t);
        return;
      }
      case Master::none:
        s.param.weight.visit([&](auto w) {
          using T = typename decltype(w)::value_type;
          if (!on_device()) {
            convert_n(v.data(), n, w.data());
            return;
          }
          std::vector<T> h(n);
          convert_n(v.data(), n, h.data());
          write_weight(i, h);
        });
        return;
    }
  }
  /// State tensor k of parameter i (which exists) as fp32 values.
  std::vector<float> state_values(std::size_t i, std::size_t k) const {
    const Slot& s = slots_[i];
    const Moments moments = layout_of(i).moments;
    if (moments == Moments::fp32) return to_host(s.state[k]);
    const std::int64_t n = numel_of(i);
    std::vector<float> out(static_cast<std::size_t>(n));
    const std::vector<std::uint8_t> values = download<std::uint8_t>(s.packed[k].values);
    const std::vector<float> scales = download<float>(s.packed[k].scales);
    decode_raw(moments, nonnegative_state(k), values.data(), scales.data(), 0, n, out.data());
    return out;
  }
  /// Sets state tensor k of parameter i (which exists) to `v`, encoded in
  /// the group's layout.
  void write_state(std::size_t i, std::size_t k, const std::vector<float>& v) {
    const Moments moments = layout_of(i).moments;
    if (moments == Moments::fp32) {
      from_host(v, slots_[i].state[k]);
      return;
    }
    Packed& p = slots_[i].packed[k];
    if (!on_device()) {  // in place
      encode(i, k, 0, static_cast<std::int64_t>(v.size()), v.data());
      return;
    }
    std::vector<std::uint8_t> values(p.values.bytes());
    std::vector<float> scales(p.scales.bytes() / sizeof(float));
    encode_raw(moments, nonnegative_state(k), values.data(), scales.data(), 0, static_cast<std::int64_t>(v.size()),
               v.data());
    upload(p.values, values);
    upload(p.scales, scales);
  }
  /// True when state k of parameter i was created for the step under way.
  bool fresh_state(std::size_t i, std::size_t k) const { return (slots_[i].fresh_state >> k) & 1u; }

  /// The chunked path's gradients: m stored values from off widened to
  /// fp32, then unscaled and clipped as the fused loop does.
  static void load_gradients(const TensorRef& grad, std::int64_t off, std::int64_t m, const GradTransform& t,
                             float* g) {
    cpu::load_float(grad, off, m, g);
    if (t.inv_scale != 1.0f) {
      for (std::int64_t k = 0; k < m; ++k) g[k] *= t.inv_scale;
    }
    if (t.clip_coef != 1.0f) {
      for (std::int64_t k = 0; k < m; ++k) g[k] *= t.clip_coef;
    }
  }
  /// The formula over one chunk of m elements (chunk[0] the masters, the
  /// rest state) on 4-lane vectors and scalars, with parameter i's
  /// precursor terms when they are on (chunk[v_array] the second moment).
  template <std::size_t N, class Formula>
  void formula_chunk(std::size_t i, float* const (&chunk)[N], const float* g, std::int64_t m, Formula& formula,
                     int v_array) {
    float before[kChunk];
    if (precursors_ != nullptr) std::memcpy(before, chunk[0], static_cast<std::size_t>(m) * sizeof(float));
    std::int64_t k = 0;
#if MIXPREC_HAS_VECTOR_EXT
    k = cpu::formula_lanes<simd::f32x4, N>(m, chunk, g, formula);
#endif
    for (; k < m; ++k) {
      float v[N];
      for (std::size_t a = 0; a < N; ++a) v[a] = chunk[a][k];
      cpu::call_formula(formula, v, g[k], std::make_index_sequence<N>{});
      for (std::size_t a = 0; a < N; ++a) chunk[a][k] = v[a];
    }
    if (precursors_ == nullptr) return;
    const float* v = nullptr;
    if constexpr (N > 1) {  // (with N = 1 GCC's -Warray-bounds sees chunk[v_array] even where it cannot run)
      if (v_array > 0 && v_array < static_cast<int>(N)) v = chunk[v_array];
    }
    add_precursors(i, before, chunk[0], v, g, m);
  }

  /// One applied step of parameter i: for every element, the stored
  /// gradient is widened to fp32 and transformed by t, `formula` updates the
  /// fp32 arrays (arrays[0] is the master, the rest optimizer state) in
  /// place, and the new master is rounded into the model weight.
  ///
  /// Two paths with identical bits (the same IEEE operations in the same
  /// order, no FMA): on x86-64 CPUs with AVX2 and F16C, one fused pass over
  /// 8 elements at a time, compiled for AVX2 through a target attribute and
  /// chosen at run time; elsewhere (and for the tail), L1-sized chunks:
  /// widen the gradients, transform, apply the formula on 4-lane vectors and
  /// scalars, round the chunk's masters into the weight.
  template <std::size_t N, class Formula>
  void update_elements(std::size_t i, const GradTransform& t, float* const (&arrays)[N],
                       Formula&& formula, int v_array = -1) {
    Slot& s = slots_[i];
    const std::int64_t n = s.master.numel();
    std::int64_t done = 0;
#if MIXPREC_OPTIM_AVX2
    if (detail::cpu_has_avx2_f16c() && precursors_ == nullptr) {
      s.param.grad.visit([&](auto grad) {
        s.param.weight.visit([&](auto weight) {
          done = cpu::fused_avx2<N>(n, grad.data(), weight.data(), arrays, t, formula);
        });
      });
    }
#endif
    float g[kChunk];
    for (std::int64_t off = done; off < n; off += kChunk) {
      const std::int64_t m = std::min<std::int64_t>(kChunk, n - off);
      load_gradients(s.param.grad, off, m, t, g);
      float* chunk[N];
      for (std::size_t a = 0; a < N; ++a) chunk[a] = arrays[a] + off;
      formula_chunk<N>(i, chunk, g, m, formula, v_array);
      s.param.weight.visit([&](auto w) {
        convert_n(s.master.data() + off, static_cast<std::size_t>(m), w.data() + off);
      });
    }
  }

  /// What the precursors need of the step under way (Family sets it):
  /// which state tensor is the second moment (-1: none), eps^2 and the
  /// factor that bias-corrects v (float(1 / (1 - beta2^step)), as the
  /// monitor's eps share has always read it).
  struct PrecursorSpec {
    int state = -1;
    float eps2 = 0;
    float v_scale = 1;
  };
  PrecursorSpec precursor_spec_;

  /// update_elements over the master and the state tensors `states` (N - 1
  /// indices): the formula sees arrays[0] = master, arrays[a] = state
  /// states[a - 1]. In a lean layout (StateLayout) each chunk of master and
  /// state is decoded to fp32, updated by the same formula, and encoded
  /// again (update_elements_lean).
  template <std::size_t N, class Formula>
  void update_states(std::size_t i, const GradTransform& t, const std::array<int, N - 1>& states,
                     Formula&& formula) {
    if (layout_of(i).lean()) {
      update_elements_lean<N>(i, t, states, formula, precursor_array<N>(states));
      return;
    }
    float* arrays[N];
    arrays[0] = slots_[i].master.data();
    for (std::size_t a = 1; a < N; ++a) arrays[a] = state(i, static_cast<std::size_t>(states[a - 1]));
    update_elements<N>(i, t, arrays, formula, precursor_array<N>(states));
  }
  // The position of the second moment in update_elements' arrays (-1: none).
  template <std::size_t N>
  int precursor_array(const std::array<int, N - 1>& states) const {
    for (std::size_t a = 1; a < N; ++a) {
      if (states[a - 1] == precursor_spec_.state) return static_cast<int>(a);
    }
    return -1;
  }
  // Adds parameter i's precursor terms of m elements (see set_precursors):
  // before: the masters before the step, after: after it, v: the second
  // moment after it (null: none), g: the gradients the update used.
  void add_precursors(std::size_t i, const float* before, const float* after, const float* v, const float* g,
                      std::int64_t m) {
    double acc[kPrecursorSums] = {0, 0, 0, 0, 0};
    const float eps2 = precursor_spec_.eps2, v_scale = precursor_spec_.v_scale;
    slots_[i].param.weight.visit([&](auto w) {
      using T = typename decltype(w)::value_type;
      for (std::int64_t e = 0; e < m; ++e) {
        add_precursor_terms<T>(acc, before[e], after[e], g[e], v != nullptr, v != nullptr ? v[e] : 0.0f, v_scale,
                               eps2);
      }
    });
    double* out = precursors_ + i * kPrecursorSums;
    for (std::size_t j = 0; j < kPrecursorSums; ++j) out[j] += acc[j];
  }

  /// The step of a lean layout, chunk by chunk (L1-sized; a chunk is a
  /// whole number of 8-bit blocks and tie-bit words): the gradients widened
  /// and transformed as in update_elements, the master and the state
  /// decoded to fp32, the formula on 4-lane vectors and scalars (the
  /// portable path's operations: the same bits as fp32 state given the same
  /// values), then the state encoded (bf16_sr: stochastically, from the
  /// moments' stream of this step's key) and the master written back: fp32
  /// master rounded to the weight; remainder split into weight, remainder
  /// and tie bit; none rounded stochastically into the weight.
  template <std::size_t N, class Formula>
  void update_elements_lean(std::size_t i, const GradTransform& t, const std::array<int, N - 1>& states,
                            Formula& formula, int v_array) {
    static_assert(kChunk % lean::kBlock == 0 && kChunk % 32 == 0, "a chunk holds whole blocks and tie words");
    Slot& s = slots_[i];
    const StateLayout& layout = layout_of(i);
    const std::int64_t n = numel_of(i);
    const bool packed = layout.moments != Moments::fp32;
    const std::uint64_t key = lean::rounding_key(layout.seed, i, static_cast<std::uint64_t>(s.step));
    const std::uint64_t moments_key = lean::moment_key(key);
    float g[kChunk];
    float buf[N][kChunk];
    for (std::int64_t off = 0; off < n; off += kChunk) {
      const std::int64_t m = std::min<std::int64_t>(kChunk, n - off);
      load_gradients(s.param.grad, off, m, t, g);
      float* chunk[N];
      if (layout.master == Master::fp32) {
        chunk[0] = s.master.data() + off;
      } else if (layout.master == Master::remainder) {
        const auto* w = static_cast<const std::uint16_t*>(s.param.weight.data()) + off;
        const auto* r = static_cast<const std::uint16_t*>(s.remainder.data()) + off;
        const auto* tie = static_cast<const std::uint32_t*>(s.tie_bits.data()) + off / 32;
        for (std::int64_t e = 0; e < m; ++e) buf[0][e] = lean::join_master(w[e], r[e], (tie[e / 32] >> (e % 32)) & 1u);
        chunk[0] = buf[0];
      } else {
        cpu::load_float(s.param.weight, off, m, buf[0]);
        chunk[0] = buf[0];
      }
      for (std::size_t a = 1; a < N; ++a) {
        const auto k = static_cast<std::size_t>(states[a - 1]);
        if (packed) {
          decode(i, k, off, m, buf[a]);
          chunk[a] = buf[a];
        } else {
          chunk[a] = s.state[k].data() + off;
        }
      }
      formula_chunk<N>(i, chunk, g, m, formula, v_array);
      if (packed) {
        if (layout.moments == Moments::bf16_sr) {
          // One number an element, for each of its state tensors.
          std::uint32_t r[kChunk];
          for (std::int64_t e = 0; e < m; ++e) r[e] = lean::rounding_bits(moments_key, static_cast<std::uint64_t>(off + e));
          for (std::size_t a = 1; a < N; ++a) {
            auto* out = static_cast<bfloat16*>(s.packed[static_cast<std::size_t>(states[a - 1])].values.data()) + off;
            for (std::int64_t e = 0; e < m; ++e) out[e] = from_bits<bfloat16>(lean::stochastic_round_bf16_bits(buf[a][e], r[e]));
          }
        } else {
          for (std::size_t a = 1; a < N; ++a) encode(i, static_cast<std::size_t>(states[a - 1]), off, m, buf[a]);
        }
      }
      switch (layout.master) {
        case Master::fp32:
          s.param.weight.visit([&](auto w) { convert_n(chunk[0], static_cast<std::size_t>(m), w.data() + off); });
          break;
        case Master::remainder: {
          auto* w = static_cast<std::uint16_t*>(s.param.weight.data()) + off;
          auto* r = static_cast<std::uint16_t*>(s.remainder.data()) + off;
          auto* tie = static_cast<std::uint32_t*>(s.tie_bits.data()) + off / 32;
          for (std::int64_t e = 0; e < m; e += 32) {
            std::uint32_t word = 0;
            for (std::int64_t b = 0; b < 32 && e + b < m; ++b) {
              const lean::SplitMaster sm = lean::split_master(buf[0][e + b]);
              w[e + b] = sm.weight;
              r[e + b] = sm.remainder;
              word |= static_cast<std::uint32_t>(sm.tie_up) << b;
            }
            tie[e / 32] = word;
          }
          break;
        }
        case Master::none:
          s.param.weight.visit([&](auto w) {
            using T = typename decltype(w)::value_type;
            T* out = w.data() + off;
            for (std::int64_t e = 0; e < m; ++e) {
              out[e] = lean::stochastic_round<T>(buf[0][e],
                                                 lean::rounding_bits(key, static_cast<std::uint64_t>(off + e)));
            }
          });
          break;
      }
    }
  }

  std::vector<Slot> slots_;

 private:
  // A zeroed state tensor in the group's lean moments layout (host).
  Packed make_packed(std::size_t i) const {
    const auto n = static_cast<std::size_t>(numel_of(i));
    Packed p;
    if (lean::bf16_moments(layout_of(i).moments)) {
      p.values = Buffer(n * sizeof(std::uint16_t), device_);
    } else {
      p.values = Buffer(n, device_);
      p.scales = Buffer((n + lean::kBlock - 1) / lean::kBlock * sizeof(float), device_);
    }
    zero_buffer(p.values);  // +0 in either code
    zero_buffer(p.scales);
    return p;
  }
  // Zeros a buffer on the host or the device (the device: synchronously).
  static void zero_buffer(Buffer& b, stream_t stream = nullptr) {
    if (b.bytes() == 0) return;
    if (b.device().is_cpu()) {
      std::memset(b.data(), 0, b.bytes());
      return;
    }
    const std::vector<char> zeros(b.bytes(), 0);
    detail::copy_raw(b.data(), b.device(), zeros.data(), Device::cpu(), b.bytes(), stream);
  }
  // A host copy of a buffer (of the host or the device), and the way back.
  template <class T>
  std::vector<T> download(const Buffer& b) const {
    std::vector<T> out(b.bytes() / sizeof(T));
    if (b.bytes() == 0) return out;
    order_accesses();
    detail::copy_raw(out.data(), Device::cpu(), b.data(), b.device(), b.bytes(), stream_);
    return out;
  }
  template <class T>
  void upload(Buffer& b, const std::vector<T>& v) {
    if (b.bytes() == 0) return;
    detail::copy_raw(b.data(), b.device(), v.data(), Device::cpu(), b.bytes(), stream_);
  }
  // Values [off, off + m) of packed state k of host parameter i as fp32
  // (off a multiple of lean::kBlock), and back: the step's chunks.
  void decode(std::size_t i, std::size_t k, std::int64_t off, std::int64_t m, float* out) const {
    const Packed& p = slots_[i].packed[k];
    decode_raw(layout_of(i).moments, nonnegative_state(k), p.values.data(), static_cast<const float*>(p.scales.data()),
               off, m, out);
  }
  void encode(std::size_t i, std::size_t k, std::int64_t off, std::int64_t m, const float* in) {
    Packed& p = slots_[i].packed[k];
    encode_raw(layout_of(i).moments, nonnegative_state(k), p.values.data(), static_cast<float*>(p.scales.data()), off,
               m, in);
  }
  // bf16 rounds to nearest even; 8-bit encodes each block with its new scale.
  // bf16_sr also rounds to nearest here (a load: a checkpoint's decoded
  // values are bf16 values, kept exactly); the step rounds it stochastically.
  static void decode_raw(Moments moments, bool nonnegative, const void* values, const float* scales, std::int64_t off,
                         std::int64_t m, float* out) {
    if (lean::bf16_moments(moments)) {
      convert_n(static_cast<const bfloat16*>(values) + off, static_cast<std::size_t>(m), out);
      return;
    }
    const auto* codes = static_cast<const std::uint8_t*>(values);
    for (std::int64_t j = 0; j < m; ++j) {
      out[j] = lean::decode_value(codes[off + j], nonnegative, scales[(off + j) / lean::kBlock]);
    }
  }
  static void encode_raw(Moments moments, bool nonnegative, void* values, float* scales, std::int64_t off,
                         std::int64_t m, const float* in) {
    if (lean::bf16_moments(moments)) {
      convert_n(in, static_cast<std::size_t>(m), static_cast<bfloat16*>(values) + off);
      return;
    }
    auto* codes = static_cast<std::uint8_t*>(values);
    for (std::int64_t b = 0; b < m; b += lean::kBlock) {
      const std::int64_t len = std::min<std::int64_t>(lean::kBlock, m - b);
      const float scale = lean::block_scale(in + b, len);
      scales[(off + b) / lean::kBlock] = scale;
      lean::encode_block(in + b, len, nonnegative, scale, codes + off + b);
    }
  }
  // Parameter i's model weight as host values of T (T: its element type,
  // or uint16_t for its raw 16 bits), and the way back.
  template <class T>
  std::vector<T> weight_values(std::size_t i) const {
    const TensorRef& w = slots_[i].param.weight;
    std::vector<T> out(static_cast<std::size_t>(w.numel()));
    MIXPREC_CHECK(out.size() * sizeof(T) == w.bytes(), name(), ": weight_values: element size");
    if (out.empty()) return out;
    order_accesses();
    detail::copy_raw(out.data(), Device::cpu(), w.data(), device_, w.bytes(), stream_);
    return out;
  }
  template <class T>
  void write_weight(std::size_t i, const std::vector<T>& v) {
    TensorRef& w = slots_[i].param.weight;
    MIXPREC_CHECK(v.size() * sizeof(T) == w.bytes(), name(), ": write_weight: element size");
    if (v.empty()) return;
    detail::copy_raw(w.data(), device_, v.data(), Device::cpu(), w.bytes(), stream_);
  }
  // Throws, naming the option and the parameter, unless `layout` suits the
  // new group's parameters.
  void check_layout(const StateLayout& layout, const std::vector<Param>& params) const {
    MIXPREC_CHECK(static_cast<int>(layout.moments) <= static_cast<int>(Moments::bf16_sr), name(),
                  ": StateLayout::moments = ", static_cast<int>(layout.moments), ", not a Moments value");
    MIXPREC_CHECK(static_cast<int>(layout.master) <= static_cast<int>(Master::none), name(),
                  ": StateLayout::master = ", static_cast<int>(layout.master), ", not a Master value");
    if (layout.master != Master::remainder) return;
    for (std::size_t k = 0; k < params.size(); ++k) {
      MIXPREC_CHECK(params[k].weight.dtype() == DType::bfloat16, name(), ": parameter \"", params[k].name,
                    "\": StateLayout::master = remainder needs bfloat16 weights (the weight is the master's upper "
                    "half), this one is ", dtype_name(params[k].weight.dtype()));
    }
  }

  // Every state buffer the next step needs, made now; returns which
  // (parameter, state) pairs this call made. If one allocation fails, the
  // ones this call made are dropped again and the error goes on: the
  // optimizer is as it was.
  std::vector<std::pair<std::size_t, std::size_t>> allocate_all() {
    std::vector<std::vector<bool>> had(slots_.size());
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      for (std::size_t k = 0; k < 3; ++k) had[i].push_back(has_state(i, k));
    }
    std::vector<std::pair<std::size_t, std::size_t>> made;
    const auto collect = [&] {
      made.clear();
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        for (std::size_t k = 0; k < 3; ++k) {
          if (!had[i][k] && has_state(i, k)) made.emplace_back(i, k);
        }
      }
    };
    try {
      for (std::size_t i = 0; i < slots_.size(); ++i) allocate_state(i);
    } catch (...) {
      collect();
      drop_state(made);
      throw;
    }
    collect();
    return made;
  }
  void drop_state(const std::vector<std::pair<std::size_t, std::size_t>>& made) noexcept {
    for (const auto& m : made) {
      Slot& s = slots_[m.first];
      s.state[m.second] = Tensor<float>();
      if (m.second < s.packed.size()) s.packed[m.second] = Packed();
      s.made &= ~(1u << m.second);
      s.fresh_state &= ~(1u << m.second);
      params_changed_ = true;
    }
  }
  // Whether this launch goes into a graph being captured (captured()).
  // One cudaStreamIsCapturing query a launch: a host call of well under a
  // microsecond, and none at all when a graph replays the step.
  void note_capture(stream_t stream) {
    captured_now_ = device_backend()->capturing(stream);
    captured_ = captured_ || captured_now_;
  }
  // Orders this launch after the optimizer's last one on another stream.
  void order_after_last(stream_t stream) {
    if (has_launched_ && last_stream_ != stream) device_backend()->order_after(last_stream_, stream, &order_event_);
    last_stream_ = stream;
    has_launched_ = true;
  }

  void require_device(const char* what) const {
    MIXPREC_CHECK(on_device(), name(), "::", what, ": the parameters are on ", device_,
                  "; this is the device path");
  }
  const DevicePlan& require_plan(const char* what) const {
    require_device(what);
    MIXPREC_CHECK(plan_ != nullptr, name(), "::", what, ": no launch_check() since the parameters changed");
    return *plan_;
  }
  // The device lists of every parameter, made again after a change (this
  // uploads them, which synchronises).
  void ensure_plan() {
    if (plan_ && !params_changed_) return;
    check_buffers();  // the lists are about to point at these buffers
    std::vector<DeviceParam> params(slots_.size());
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      params[i].weight = s.param.weight;
      params[i].grad = s.param.grad;
      params[i].master = s.master.data();
      for (std::size_t k = 0; k < 3; ++k) {
        params[i].state[k] = has_state(i, k) && layout_of(i).moments == Moments::fp32 ? s.state[k].data() : nullptr;
      }
      params[i].step = s.device_step;
      params[i].group = static_cast<int>(s.group);
      const SecondMoment sm = second_moment(i);
      params[i].v_state = sm.state;
      params[i].eps2 = sm.eps * sm.eps;
      params[i].beta2 = sm.beta2;
      const StateLayout& layout = layout_of(i);
      if (layout.lean()) {
        DeviceLeanState& l = params[i].lean;
        l.active = true;
        l.moments = layout.moments;
        l.master = layout.master;
        for (std::size_t k = 0; k < 3; ++k) {
          if (nonnegative_state(k)) l.nonnegative |= 1u << k;
          if (has_state(i, k) && layout.moments != Moments::fp32) {
            l.packed[k] = s.packed[k].values.data();
            l.scales[k] = static_cast<float*>(s.packed[k].scales.data());
          }
        }
        l.remainder = static_cast<std::uint16_t*>(s.remainder.data());
        l.tie_bits = static_cast<std::uint32_t*>(s.tie_bits.data());
        l.seed = layout.seed;
        l.index = i;
      }
    }
    if (plan_) {
      plan_->set_params(params);  // pass 1's results stay where they are
    } else {
      plan_ = device_backend()->make_plan(params);
    }
    params_changed_ = false;
    // The uploads, the zeroed state and the check's buffers are ready
    // before any stream (a non-blocking one included) runs a step on them.
    device_backend()->synchronize(nullptr);
  }
  // Reads and writes on stream() (the synchronising accessors, save_state,
  // load_state) first wait, on the device, for the launches queued on
  // another stream: they see every step the host has queued.
  void order_accesses() const {
    if (has_launched_ && last_stream_ != stream_) device_backend()->order_after(last_stream_, stream_, &order_event_);
  }
  std::vector<float> to_host(const Tensor<float>& t) const {
    order_accesses();
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    detail::copy_raw(out.data(), Device::cpu(), t.data(), device_, out.size() * sizeof(float), stream_);
    return out;
  }
  void from_host(const std::vector<float>& v, Tensor<float>& t) {
    detail::copy_raw(t.data(), device_, v.data(), Device::cpu(), v.size() * sizeof(float), stream_);
  }
  static Buffer make_device_counts(std::size_t count, Device device) {
    Buffer b(count * sizeof(std::int64_t), device);
    const std::vector<std::int64_t> zeros(count, 0);
    detail::copy_raw(b.data(), device, zeros.data(), Device::cpu(), b.bytes());
    return b;
  }
  std::int64_t* applied_device() const { return static_cast<std::int64_t*>(applied_device_.data()); }
  std::int64_t read_count(const std::int64_t* p) const {
    order_accesses();
    std::int64_t v = 0;
    detail::copy_raw(&v, Device::cpu(), p, device_, sizeof v, stream_);
    return v;
  }

  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }

  std::uint64_t id_;
  std::vector<double> group_lrs_;
  std::vector<StateLayout> group_layouts_;
  LRSchedule schedule_;
  std::int64_t applied_steps_ = 0;
  // The device path.
  Device device_ = Device::cpu();
  stream_t stream_ = nullptr;
  std::vector<Buffer> group_steps_;  // per group: its parameters' step counts (device)
  Buffer applied_device_;            // int64 {applied steps, steps skipped for a non-finite lr}
  stream_t last_stream_ = nullptr;   // of the last device launch (order_after_last)
  bool has_launched_ = false;
  bool buffer_checks_ = false;       // set_buffer_checks
  bool captured_ = false;            // a launch went into a CUDA graph (captured())
  bool captured_now_ = false;        // the current launch does
  mutable void* order_event_ = nullptr;  // DeviceBackend::order_after's event
  Buffer constants_;                 // {int 0, float 1}: found_inf and scale of a plain step()
  std::unique_ptr<DevicePlan> plan_;  // null after a group is added
  std::uint64_t* grad_histogram_ = nullptr;  // set_grad_histogram
 protected:
  double* precursors_ = nullptr;  // set_precursors
 private:
  bool params_changed_ = false;       // state was made since the plan's upload
};

}  // namespace optim
MIXPREC_NAMESPACE_END

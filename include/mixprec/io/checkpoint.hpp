// SPDX-License-Identifier: Apache-2.0
// Training checkpoints in the safetensors format (docs/checkpoints.md): the
// model weights, the fp32 masters, the optimizer's moments, step counts and
// learning rates, the scaler's state and counters, the position in the LR
// schedule, an RNG and the trainer's own strings; saved atomically, loaded
// after every check has passed (nothing half-applied), resumed bit-exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <locale>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/amp/device_grad_scaler.hpp"
#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace io {

/// What a trainer keeps beside the optimizer and the scaler.
struct CheckpointExtras {
  /// The trainer's own strings (epoch, data position, a run id...), saved in
  /// the header's __metadata__ as "user.<key>" and given back on load.
  std::map<std::string, std::string> metadata;
  /// An RNG saved and restored with the rest (its textual state, which the
  /// C++ standard specifies); null: none.
  std::mt19937_64* rng = nullptr;
};

namespace detail {

inline constexpr const char* kFormat = "mixprec-checkpoint";
inline constexpr const char* kFormatVersion = "1";
inline constexpr const char* kPrefix = "mixprec/";  // every tensor but the model weights

inline std::string master_name(const std::string& p) { return std::string(kPrefix) + "master/" + p; }
inline std::string state_name(const std::string& s, const std::string& p) { return std::string(kPrefix) + s + "/" + p; }

// Metadata values as JSON text (nlohmann writes numbers the same way in every
// locale, doubles so that they read back exactly).
inline std::string param_names(const optim::Optimizer& opt) {  // step counts and lrs are stored by position
  nlohmann::json names = nlohmann::json::array();
  for (std::size_t i = 0; i < opt.num_params(); ++i) names.push_back(opt.param(i).name);
  return names.dump();
}
inline std::string param_groups(const optim::Optimizer& opt) {
  nlohmann::json groups = nlohmann::json::array();
  for (std::size_t i = 0; i < opt.num_params(); ++i) groups.push_back(opt.group_of(i));
  return groups.dump();
}
inline std::string schedule_string(const optim::LRSchedule& s) {
  const char* kinds[] = {"constant", "linear_warmup", "cosine", "step_decay"};
  return nlohmann::json{{"kind", kinds[static_cast<int>(s.kind)]}, {"steps", s.steps},
                        {"start_factor", s.start_factor}, {"min_factor", s.min_factor}, {"gamma", s.gamma}}
      .dump();
}

inline const char* mode_name(amp::ScalingMode m) {
  return m == amp::ScalingMode::dynamic ? "dynamic" : m == amp::ScalingMode::static_scale ? "static" : "disabled";
}

// A scaler's state with its counters, host side.
struct ScalerSnapshot {
  amp::ScalerState state;
  std::int64_t applied = 0, skipped = 0;
  std::optional<amp::SpikeGuardSnapshot> guard;  // when the scaler's spike guard is enabled
};

// What load reads from a checkpoint, checked, on the host.
struct Contents {
  optim::OptimizerState opt;
  std::vector<std::vector<std::uint8_t>> weights;  // per parameter, its dtype's bytes
  ScalerSnapshot scaler;
};

template <class Scaler>
ScalerSnapshot snapshot_of(const Scaler& scaler) {
  ScalerSnapshot s{scaler.state(), scaler.applied_steps(), scaler.skipped_steps(), std::nullopt};
  if (scaler.options().spike_guard.enabled) s.guard = scaler.spike_guard_snapshot();
  return s;
}

inline std::vector<std::uint8_t> weight_bytes(const TensorRef& w) {
  std::vector<std::uint8_t> out(w.bytes());
  mixprec::detail::copy_raw(out.data(), Device::cpu(), w.data(), w.device(), out.size());
  return out;
}


inline void save(const std::string& path, const optim::Optimizer& opt, const ScalerSnapshot& scaler,
                 const amp::GradScalerOptions& scaler_options, const CheckpointExtras& extras) {
  MIXPREC_CHECK(!path.empty(), "save_checkpoint: path is empty");
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const std::string& n = opt.param(i).name;
    MIXPREC_CHECK(n.rfind(kPrefix, 0) != 0 && n != "__metadata__", "save_checkpoint: parameter \"", n,
                  "\": names starting with \"", kPrefix, "\" (and \"__metadata__\") are reserved for the checkpoint's own "
                  "tensors");
  }
  for (const auto& kv : extras.metadata) {
    MIXPREC_CHECK(!kv.first.empty(), "save_checkpoint: extras.metadata has an empty key");
  }
  // The writer refers to these until write() below.
  const optim::OptimizerState st = opt.save_state();
  const std::vector<std::string> states = opt.state_names();
  std::vector<std::vector<std::uint8_t>> weights;
  std::vector<std::int64_t> steps;
  SafetensorsWriter w;
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    weights.push_back(weight_bytes(opt.param(i).weight));
    steps.push_back(st.params[i].step);
  }
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const optim::Param& p = opt.param(i);
    const std::vector<std::int64_t>& shape = p.weight.shape().dims();
    const optim::ParamState& ps = st.params[i];
    w.add(p.name, st_dtype(p.weight.dtype()), shape, weights[i].data(), weights[i].size());
    w.add(master_name(p.name), shape, ps.master.data(), ps.master.size());
    for (std::size_t k = 0; k < ps.state.size(); ++k) {
      if (ps.state[k]) w.add(state_name(states[k], p.name), shape, ps.state[k]->data(), ps.state[k]->size());
    }
  }
  const std::int32_t trackers[3] = {scaler.state.growth_tracker, scaler.state.hysteresis_tracker,
                                    scaler.state.min_scale_hits};
  const std::int64_t counts[2] = {scaler.applied, scaler.skipped};
  w.add(std::string(kPrefix) + "step", {static_cast<std::int64_t>(steps.size())}, steps.data(), steps.size());
  w.add(std::string(kPrefix) + "lr", {static_cast<std::int64_t>(st.lrs.size())}, st.lrs.data(), st.lrs.size());
  w.add(std::string(kPrefix) + "applied_steps", {}, &st.applied_steps, 1);
  w.add(std::string(kPrefix) + "scaler/scale", {}, &scaler.state.scale, 1);
  w.add(std::string(kPrefix) + "scaler/trackers", {3}, trackers, 3);
  w.add(std::string(kPrefix) + "scaler/counts", {2}, counts, 2);
  w.add(std::string(kPrefix) + "scaler/skip_streak", {}, &scaler.state.skip_streak, 1);
  // The spike guard's window (slot order) and counters: a resumed run
  // judges its next steps as the uninterrupted run would.
  std::vector<double> guard_window;
  std::vector<std::int64_t> guard_counts;
  if (scaler.guard) {
    const amp::SpikeGuardSnapshot& g = *scaler.guard;
    guard_window = g.loss;
    guard_window.insert(guard_window.end(), g.grad_norm.begin(), g.grad_norm.end());
    guard_counts = {g.state.count, g.state.next, g.state.streak, g.state.skipped};
    w.add(std::string(kPrefix) + "scaler/guard_window", {2, static_cast<std::int64_t>(g.loss.size())},
          guard_window.data(), guard_window.size());
    w.add(std::string(kPrefix) + "scaler/guard_counts", {4}, guard_counts.data(), guard_counts.size());
  }

  w.set_metadata("format", kFormat);
  w.set_metadata("format_version", kFormatVersion);
  w.set_metadata("optimizer", opt.name());
  w.set_metadata("optimizer_state", nlohmann::json(states).dump());
  w.set_metadata("param_groups", param_groups(opt));
  w.set_metadata("params", param_names(opt));
  w.set_metadata("schedule", schedule_string(opt.schedule()));
  w.set_metadata("scaling", mode_name(scaler_options.mode));
  if (extras.rng != nullptr) {
    std::ostringstream rng;
    rng.imbue(std::locale::classic());
    rng << *extras.rng;
    w.set_metadata("rng.mt19937_64", rng.str());
  }
  for (const auto& kv : extras.metadata) w.set_metadata("user." + kv.first, kv.second);
  w.write(path);
}

// A tensor that must exist with this dtype and shape.
inline const TensorInfo& expect(const SafetensorsFile& f, const std::string& name, StDType dtype,
                                const std::vector<std::int64_t>& shape) {
  const TensorInfo* t = f.find(name);
  MIXPREC_CHECK(t != nullptr, "load_checkpoint: ", f.source(), " has no tensor \"", name, "\"");
  MIXPREC_CHECK(t->dtype == dtype, "load_checkpoint: ", f.source(), ": tensor \"", name, "\" is ", to_string(t->dtype),
                ", expected ", to_string(dtype));
  MIXPREC_CHECK(t->shape == shape, "load_checkpoint: ", f.source(), ": tensor \"", name, "\" has shape ",
                Shape(t->shape), ", expected ", Shape(shape));
  return *t;
}

inline std::string meta(const SafetensorsFile& f, const std::string& key) {
  const auto it = f.metadata().find(key);
  MIXPREC_CHECK(it != f.metadata().end(), "load_checkpoint: ", f.source(), ": the header's __metadata__ has no \"", key,
                "\"; not a mixprec checkpoint");
  return it->second;
}

// Reads and checks everything against `opt` and the scaler's options; changes nothing.
inline Contents read(const SafetensorsFile& f, const optim::Optimizer& opt, const amp::GradScalerOptions& scaler_options,
                     CheckpointExtras* extras, std::mt19937_64* rng_out) {
  const std::string& src = f.source();
  MIXPREC_CHECK(meta(f, "format") == kFormat, "load_checkpoint: ", src, ": format = \"", meta(f, "format"),
                "\", expected \"", kFormat, "\"");
  MIXPREC_CHECK(meta(f, "format_version") == kFormatVersion, "load_checkpoint: ", src, ": format_version = \"",
                meta(f, "format_version"), "\", this mixprec reads \"", kFormatVersion, "\"");
  MIXPREC_CHECK(meta(f, "optimizer") == opt.name(), "load_checkpoint: ", src, " holds the state of a ",
                meta(f, "optimizer"), ", the optimizer being loaded is a ", opt.name());
  MIXPREC_CHECK(meta(f, "scaling") == mode_name(scaler_options.mode), "load_checkpoint: ", src, " was saved with ",
                meta(f, "scaling"), " loss scaling, the scaler being loaded uses ", mode_name(scaler_options.mode));
  const std::string schedule = schedule_string(opt.schedule());
  MIXPREC_CHECK(meta(f, "schedule") == schedule, "load_checkpoint: ", src, " was saved with the LR schedule ",
                meta(f, "schedule"), ", the optimizer has ", schedule, "; set the same schedule before loading");
  const std::string groups = param_groups(opt);
  MIXPREC_CHECK(meta(f, "params") == param_names(opt), "load_checkpoint: ", src, " holds the parameters ",
                meta(f, "params"), " in this order, the optimizer has ", param_names(opt));
  MIXPREC_CHECK(meta(f, "param_groups") == groups, "load_checkpoint: ", src, ": the parameters' groups are ",
                meta(f, "param_groups"), ", the optimizer's are ", groups);

  const std::vector<std::string> states = opt.state_names();
  std::set<std::string> known;  // every tensor name this optimizer can own
  auto take = [&](const std::string& name, StDType dtype, const std::vector<std::int64_t>& shape) -> const TensorInfo& {
    known.insert(name);
    return expect(f, name, dtype, shape);
  };
  Contents c;
  const std::vector<std::int64_t> steps =
      f.values<std::int64_t>(take(std::string(kPrefix) + "step", StDType::I64, {static_cast<std::int64_t>(opt.num_params())}));
  c.opt.params.resize(opt.num_params());
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const optim::Param& p = opt.param(i);
    const std::vector<std::int64_t>& shape = p.weight.shape().dims();
    const TensorInfo& wt = take(p.name, st_dtype(p.weight.dtype()), shape);
    c.weights.emplace_back(f.data(wt), f.data(wt) + wt.nbytes());
    optim::ParamState& ps = c.opt.params[i];
    ps.master = f.values<float>(take(master_name(p.name), StDType::F32, shape));
    ps.state.resize(states.size());
    for (std::size_t k = 0; k < states.size(); ++k) {
      const std::string name = state_name(states[k], p.name);
      known.insert(name);
      if (f.find(name) != nullptr) ps.state[k] = f.values<float>(expect(f, name, StDType::F32, shape));
      // (absent: not made yet when saved)
    }
    ps.step = steps[i];
  }
  c.opt.lrs = f.values<double>(take(std::string(kPrefix) + "lr", StDType::F64, {static_cast<std::int64_t>(opt.num_groups())}));
  c.opt.applied_steps = f.values<std::int64_t>(take(std::string(kPrefix) + "applied_steps", StDType::I64, {}))[0];
  c.scaler.state.scale = f.values<float>(take(std::string(kPrefix) + "scaler/scale", StDType::F32, {}))[0];
  const std::vector<std::int32_t> trackers =
      f.values<std::int32_t>(take(std::string(kPrefix) + "scaler/trackers", StDType::I32, {3}));
  const std::vector<std::int64_t> counts =
      f.values<std::int64_t>(take(std::string(kPrefix) + "scaler/counts", StDType::I64, {2}));
  c.scaler.state.growth_tracker = trackers[0];
  c.scaler.state.hysteresis_tracker = trackers[1];
  c.scaler.state.min_scale_hits = trackers[2];
  c.scaler.applied = counts[0];
  c.scaler.skipped = counts[1];
  // Consecutive skipped iterations (max_consecutive_skips); files written
  // before it existed have none: 0, a fresh streak.
  const std::string streak = std::string(kPrefix) + "scaler/skip_streak";
  known.insert(streak);
  if (f.find(streak) != nullptr) c.scaler.state.skip_streak = f.values<std::int64_t>(expect(f, streak, StDType::I64, {}))[0];
  // The spike guard's window: read when the scaler has the guard on (a file
  // without one starts the window afresh: the guard warms up again; one
  // saved with another window length is refused); ignored when it is off.
  const std::string guard_window = std::string(kPrefix) + "scaler/guard_window";
  const std::string guard_counts = std::string(kPrefix) + "scaler/guard_counts";
  known.insert(guard_window);
  known.insert(guard_counts);
  const amp::SpikeGuardOptions& go = scaler_options.spike_guard;
  if (go.enabled && f.find(guard_window) != nullptr) {
    const std::vector<double> v = f.values<double>(expect(f, guard_window, StDType::F64, {2, go.window}));
    const std::vector<std::int64_t> n = f.values<std::int64_t>(expect(f, guard_counts, StDType::I64, {4}));
    amp::SpikeGuardSnapshot g;
    const auto half = static_cast<std::ptrdiff_t>(go.window);
    g.loss.assign(v.begin(), v.begin() + half);
    g.grad_norm.assign(v.begin() + half, v.end());
    MIXPREC_CHECK(n[0] >= 0 && n[0] <= go.window && n[1] >= 0 && n[1] <= go.window, "load_checkpoint: ", src,
                  ": scaler/guard_counts = [", n[0], ", ", n[1], ", ...], count and next must be in [0, window = ",
                  go.window, "]");
    g.state.count = static_cast<std::int32_t>(n[0]);
    g.state.next = static_cast<std::int32_t>(n[1]);
    g.state.streak = n[2];
    g.state.skipped = n[3];
    amp::check_snapshot(go, g, "load_checkpoint");
    c.scaler.guard = std::move(g);
  }
  for (const TensorInfo& t : f.tensors()) {
    MIXPREC_CHECK(known.count(t.name) != 0, "load_checkpoint: ", src, " holds a tensor \"", t.name,
                  "\" that is not part of this ", opt.name(), "'s state (a parameter missing from the optimizer?)");
  }
  // The values the optimizer and scaler will check again, checked here too so
  // that nothing is applied before all of them have passed.
  opt.check_state(c.opt);
  amp::GradScaler::check_state(scaler_options, c.scaler.state, c.scaler.applied, c.scaler.skipped);
  const auto rng = f.metadata().find("rng.mt19937_64");
  if (rng_out != nullptr) {
    MIXPREC_CHECK(rng != f.metadata().end(), "load_checkpoint: extras->rng is set but ", src, " holds no RNG state");
    std::istringstream in(rng->second);
    in.imbue(std::locale::classic());
    std::mt19937_64 r;
    in >> r;
    bool ok = !in.fail();
    if (ok && !in.eof()) ok = (in >> std::ws).eof();  // nothing after the state but white space
    MIXPREC_CHECK(ok, "load_checkpoint: ", src, ": the RNG state in __metadata__ \"rng.mt19937_64\" does not parse");
    *rng_out = r;
  }
  if (extras != nullptr) {
    extras->metadata.clear();
    for (const auto& kv : f.metadata()) {
      if (kv.first.rfind("user.", 0) == 0) extras->metadata[kv.first.substr(5)] = kv.second;
    }
  }
  return c;
}

// The file's model weights. Where a group keeps no fp32 master
// (StateLayout::master remainder or none) the weight is part of the master
// and load_state has just written it from the state's: the file's copy is
// the same bits when the file came from that layout, and must not replace a
// master it would no longer match when it did not.
inline void write_weights(const optim::Optimizer& opt, const std::vector<std::vector<std::uint8_t>>& weights) {
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    if (opt.layout(opt.group_of(i)).master != optim::Master::fp32) continue;
    const TensorRef& w = opt.param(i).weight;
    mixprec::detail::copy_raw(w.data(), w.device(), weights[i].data(), Device::cpu(), weights[i].size());
  }
}

template <class Scaler>
void load(const std::string& path, optim::Optimizer& opt, Scaler& scaler, CheckpointExtras* extras) {
  const SafetensorsFile f = SafetensorsFile::read(path);
  std::mt19937_64 rng;
  CheckpointExtras got;
  Contents c = read(f, opt, scaler.options(), extras != nullptr ? &got : nullptr,
                    extras != nullptr && extras->rng != nullptr ? &rng : nullptr);
  MIXPREC_CHECK(!scaler.in_iteration(), "load_checkpoint: the scaler is in the middle of an iteration (update() not "
                "called yet)");
  // Every check has passed: apply. The optimizer first (it allocates before
  // it copies); the scaler's load cannot fail once checked.
  opt.load_state(c.opt);
  scaler.load_state(c.scaler.state, c.scaler.applied, c.scaler.skipped);
  if (scaler.options().spike_guard.enabled) scaler.load_spike_guard(c.scaler.guard.value_or(amp::SpikeGuardSnapshot{
      {}, std::vector<double>(static_cast<std::size_t>(scaler.options().spike_guard.window), 0.0),
      std::vector<double>(static_cast<std::size_t>(scaler.options().spike_guard.window), 0.0)}));
  write_weights(opt, c.weights);
  if (extras != nullptr) {
    extras->metadata = std::move(got.metadata);
    if (extras->rng != nullptr) *extras->rng = rng;
  }
}

}  // namespace detail

/// Saves the whole training state of `opt` and `scaler` (and `extras`) into
/// `path`, atomically: a temporary file in the same directory, fsync,
/// rename. A crash during the save leaves the previous file intact. Device
/// parameters: copies them to the host, which synchronises.
inline void save_checkpoint(const std::string& path, const optim::Optimizer& opt, const amp::GradScaler& scaler,
                            const CheckpointExtras& extras = {}) {
  MIXPREC_CHECK(!scaler.in_iteration(), "save_checkpoint: the scaler is in the middle of an iteration (step() "
                "done, update() not yet): the optimizer has stepped, the scale not; save after update()");
  detail::save(path, opt, detail::snapshot_of(scaler), scaler.options(), extras);
}
inline void save_checkpoint(const std::string& path, const optim::Optimizer& opt, const amp::DeviceGradScaler& scaler,
                            const CheckpointExtras& extras = {}) {
  MIXPREC_CHECK(!scaler.in_iteration(), "save_checkpoint: the scaler is in the middle of an iteration (step() "
                "done, update() not yet): the optimizer has stepped, the scale not; save after update()");
  detail::save(path, opt, detail::snapshot_of(scaler), scaler.options(), extras);
}

/// Restores what save_checkpoint saved into an optimizer and scaler built
/// the same way (same kind, parameters in the same order with the same names,
/// shapes, dtypes and groups, the same LR schedule and scaling mode). Every
/// check runs before anything changes: on an error, opt, scaler and extras
/// are as they were. `extras` (optional) receives the trainer's strings and,
/// where extras->rng is set, the RNG's state.
inline void load_checkpoint(const std::string& path, optim::Optimizer& opt, amp::GradScaler& scaler,
                            CheckpointExtras* extras = nullptr) {
  detail::load(path, opt, scaler, extras);
}
inline void load_checkpoint(const std::string& path, optim::Optimizer& opt, amp::DeviceGradScaler& scaler,
                            CheckpointExtras* extras = nullptr) {
  detail::load(path, opt, scaler, extras);
}

/// Loads model weights only (a PyTorch state dict saved with
/// safetensors.torch.save_file, say): for every parameter of `opt`, the
/// tensor of the same name (after `prefix`) of the same shape, in F16, BF16,
/// F32 or F64. The fp32 master takes the value (F64 rounded to nearest) and
/// the model weight its rounding to the weight's type. Tensors the optimizer
/// has no parameter for are an error unless `allow_unused`. Step counts,
/// moments and the scaler are untouched. Nothing changes unless every
/// parameter's tensor passed its checks.
inline void load_weights(const std::string& path, optim::Optimizer& opt, const std::string& prefix = "",
                         bool allow_unused = false) {
  const SafetensorsFile f = SafetensorsFile::read(path);
  std::vector<std::vector<float>> masters(opt.num_params());
  std::set<std::string> used;
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const optim::Param& p = opt.param(i);
    const std::string name = prefix + p.name;
    const TensorInfo* t = f.find(name);
    MIXPREC_CHECK(t != nullptr, "load_weights: ", f.source(), " has no tensor \"", name, "\" for parameter \"", p.name,
                  "\"");
    MIXPREC_CHECK(t->shape == p.weight.shape().dims(), "load_weights: ", f.source(), ": tensor \"", name,
                  "\" has shape ", Shape(t->shape), ", parameter \"", p.name, "\" has ", p.weight.shape());
    std::vector<float>& m = masters[i];
    switch (t->dtype) {
      case StDType::F32: m = f.values<float>(*t); break;
      case StDType::F64: {
        const std::vector<double> d = f.values<double>(*t);
        for (std::size_t k = 0; k < d.size(); ++k) {
          // A double beyond float's range has no float to round to (the
          // conversion would be undefined): refused, with the value.
          MIXPREC_CHECK(std::isfinite(d[k]) && std::fabs(d[k]) <= static_cast<double>(std::numeric_limits<float>::max()),
                        "load_weights: ", f.source(), ": tensor \"", name, "\"[", k, "] = ", d[k],
                        ", must be finite as a float");
        }
        m.assign(d.begin(), d.end());  // rounded to nearest
        break;
      }
      case StDType::F16: {
        const std::vector<half> h = f.values<half>(*t);
        m.resize(h.size());
        convert_n(h.data(), h.size(), m.data());
        break;
      }
      case StDType::BF16: {
        const std::vector<bfloat16> b = f.values<bfloat16>(*t);
        m.resize(b.size());
        convert_n(b.data(), b.size(), m.data());
        break;
      }
      default:
        mixprec::detail::throw_error("load_weights: ", f.source(), ": tensor \"", name, "\" is ", to_string(t->dtype),
                                     "; weights load from F16, BF16, F32 or F64");
    }
    used.insert(name);
  }
  if (!allow_unused) {
    for (const TensorInfo& t : f.tensors()) {
      MIXPREC_CHECK(used.count(t.name) != 0, "load_weights: ", f.source(), " holds a tensor \"", t.name,
                    "\" that matches no parameter of the ", opt.name(), " (allow_unused = true to ignore it)");
    }
  }
  opt.load_weights(masters);
}

/// The trainer's strings of a checkpoint (CheckpointExtras::metadata: its
/// "user.<key>" entries, without the prefix), read without loading or
/// checking anything else: for what must be known before load_checkpoint,
/// such as monitor::PrecisionFallback's layer precisions (the checkpoint's
/// weights are in the dtypes those layers had).
inline std::map<std::string, std::string> read_checkpoint_metadata(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::read(path);
  std::map<std::string, std::string> out;
  for (const auto& kv : f.metadata()) {
    if (kv.first.rfind("user.", 0) == 0) out[kv.first.substr(5)] = kv.second;
  }
  return out;
}

}  // namespace io
MIXPREC_NAMESPACE_END

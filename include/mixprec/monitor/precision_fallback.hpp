// SPDX-License-Identifier: Apache-2.0
// PrecisionFallback: when the monitor finds one layer of an nn::Sequential
// that keeps overflowing fp16 (or whose gradient underflows it), moves that
// layer's compute to bf16 or fp32, or says that it should (docs/monitor.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/core/config.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/monitor/monitor.hpp"
#include "mixprec/monitor/record.hpp"
#include "mixprec/nn/precision.hpp"
#include "mixprec/nn/sequential.hpp"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/tensor/ops.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {

/// What the fallback does when a layer is found: nothing; a
/// precision_fallback event that names the layer and the fix; or the move
/// itself, with that event.
enum class FallbackPolicy { off, suggest, act };

inline const char* to_string(FallbackPolicy p) {
  switch (p) {
    case FallbackPolicy::off: return "off";
    case FallbackPolicy::suggest: return "suggest";
    case FallbackPolicy::act: return "act";
  }
  return "unknown";
}

/// "off", "suggest" or "act" (a command-line flag's value); throws,
/// naming `option` and the value, on anything else.
inline FallbackPolicy parse_fallback_policy(const std::string& value,
                                            const std::string& option = "PrecisionFallbackOptions::policy") {
  if (value == "off") return FallbackPolicy::off;
  if (value == "suggest") return FallbackPolicy::suggest;
  if (value == "act") return FallbackPolicy::act;
  mixprec::detail::throw_error(option, " = \"", value, "\", must be \"off\", \"suggest\" or \"act\"");
}

/// "bfloat16" or "float32" (also "bf16", "fp32"): the type a layer falls
/// back to; throws, naming `option` and the value, on anything else.
inline DType parse_fallback_dtype(const std::string& value,
                                  const std::string& option = "PrecisionFallbackOptions::to") {
  if (value == "float32" || value == "fp32") return DType::float32;
  if (value == "bfloat16" || value == "bf16") return DType::bfloat16;
  mixprec::detail::throw_error(option, " = \"", value, "\", must be \"float32\" (\"fp32\") or \"bfloat16\" (\"bf16\")");
}

/// One layer the fallback moved.
struct PrecisionMove {
  std::size_t layer = 0;
  std::string name;   // the layer's name before the move, "Linear(784, 1024, relu)"
  DType from = DType::float16, to = DType::float32;
  /// The monitored step after which it moved: on the host the logged step
  /// whose record found it; on a device the step monitor.step() (or
  /// replayed()) had just queued when that record's read-back arrived,
  /// a few steps later.
  std::int64_t step = 0;
  std::string param;      // the parameter whose event found it
  EventKind trigger = EventKind::repeated_overflow;
};

struct PrecisionFallbackOptions {
  FallbackPolicy policy = FallbackPolicy::suggest;
  /// The type a layer moves to: float32 (the default: fp32's range and
  /// precision) or bfloat16 (fp32's range, half the memory, 8 significant
  /// bits); it must be wider than the model's type.
  DType to = DType::float32;
  /// Which of the monitor's events find a layer: repeated_overflow (one
  /// parameter's gradient not finite on DetectorOptions::overflow_repeats
  /// of the last overflow_window steps), and underflow events that name a
  /// parameter (DetectorOptions::underflow_share, underflow_rise and
  /// underflow_subnormal). The
  /// thresholds are the detectors'; tune them there.
  bool on_overflow = true;
  bool on_underflow = true;
  /// Called after each move of policy act, with the move, on the thread
  /// that called monitor.step() (or replayed(), flush()), once the
  /// record's moves are all made; an exception thrown here propagates out
  /// of that call after the monitor has logged the record (without the
  /// fallback's events for it; moves() and save_state() keep the moves).
  /// For a device model whose steps replay CUDA graphs this is where the
  /// graphs go: drop every graph that captured the model's or the
  /// optimizer's work (a replay would use the freed buffers), run the next
  /// step eagerly (the moved layer makes its buffers and GEMM plans there)
  /// and capture again. Once the optimizer's work has been captured in a
  /// graph (Optimizer::captured()), act moves a layer only when on_move is
  /// set; without it the layer is reported as one that could not move,
  /// and training goes on unchanged.
  std::function<void(const PrecisionMove&)> on_move;

  /// Throws mixprec::Error naming the first bad field and its value, for a
  /// model whose element type is `model_dtype`.
  void validate(DType model_dtype) const {
    MIXPREC_CHECK(policy == FallbackPolicy::off || policy == FallbackPolicy::suggest || policy == FallbackPolicy::act,
                  "PrecisionFallbackOptions: policy = ", static_cast<int>(policy),
                  ", must be FallbackPolicy::off, suggest or act");
    MIXPREC_CHECK(to == DType::bfloat16 || to == DType::float32, "PrecisionFallbackOptions: to = ",
                  to == DType::float16 ? "float16" : std::to_string(static_cast<int>(to)),
                  ", must be bfloat16 or float32 (a layer moves to a wider type than the model's)");
    MIXPREC_CHECK(policy == FallbackPolicy::off || rank(to) > rank(model_dtype), "PrecisionFallbackOptions: to = ",
                  dtype_name(to), " with policy = ", to_string(policy), ", but the model computes in ",
                  dtype_name(model_dtype), " already; a layer can only move to a wider type (",
                  model_dtype == DType::float16 ? "bfloat16 or float32" : "none", ")");
  }

 private:
  static int rank(DType d) { return d == DType::float16 ? 0 : d == DType::bfloat16 ? 1 : 2; }
};

namespace detail {

// What a fallback state holds, parsed and checked against a model of
// `layers` layers.
struct FallbackState {
  std::vector<DType> precision;
  std::vector<PrecisionMove> moves;
  std::set<std::size_t> suggested;
};

inline DType fallback_dtype(const std::string& s, const char* what) {
  if (s == "float16") return DType::float16;
  if (s == "bfloat16") return DType::bfloat16;
  MIXPREC_CHECK(s == "float32", "PrecisionFallback::load_state: ", what, " \"", s,
                "\", must be float16, bfloat16 or float32");
  return DType::float32;
}

inline FallbackState parse_fallback_state(const std::string& state, std::size_t layers) {
  const nlohmann::json j = nlohmann::json::parse(state, nullptr, false);
  MIXPREC_CHECK(!j.is_discarded() && j.is_object() && j.value("format", "") == "mixprec-precision-fallback-1",
                "PrecisionFallback::load_state: not a fallback state (save_state's JSON)");
  FallbackState st;
  try {
    for (const auto& d : j.at("precision")) {
      const std::string s = d.get<std::string>();
      const std::string what = "precision of layer " + std::to_string(st.precision.size()) + " =";
      st.precision.push_back(fallback_dtype(s, what.c_str()));
    }
    for (const auto& m : j.at("moves")) {
      PrecisionMove pm;
      pm.layer = m.at(0).get<std::size_t>();
      pm.name = m.at(1).get<std::string>();
      pm.from = fallback_dtype(m.at(2).get<std::string>(), "a move's from =");
      pm.to = fallback_dtype(m.at(3).get<std::string>(), "a move's to =");
      pm.step = m.at(4).get<std::int64_t>();
      pm.param = m.at(5).get<std::string>();
      const int kind = m.at(6).get<int>();
      MIXPREC_CHECK(kind == static_cast<int>(EventKind::repeated_overflow) ||
                        kind == static_cast<int>(EventKind::underflow),
                    "PrecisionFallback::load_state: a move's trigger = ", kind,
                    ", must be repeated_overflow or underflow's kind");
      pm.trigger = static_cast<EventKind>(kind);
      st.moves.push_back(std::move(pm));
    }
    for (const auto& s : j.at("suggested")) st.suggested.insert(s.get<std::size_t>());
  } catch (const nlohmann::json::exception& e) {
    mixprec::detail::throw_error("PrecisionFallback::load_state: a malformed state: ", e.what());
  }
  MIXPREC_CHECK(st.precision.size() == layers, "PrecisionFallback::load_state: the state has ", st.precision.size(),
                " layers, the model ", layers);
  for (const PrecisionMove& m : st.moves) {
    MIXPREC_CHECK(m.layer < layers, "PrecisionFallback::load_state: a move of layer ", m.layer, ", the model has ",
                  layers);
  }
  for (std::size_t i : st.suggested) {
    MIXPREC_CHECK(i < layers, "PrecisionFallback::load_state: a suggestion for layer ", i, ", the model has ",
                  layers);
  }
  return st;
}

// A layer made in its new type, its parameters found in the optimizer.
template <class T>
struct PreparedMove {
  std::size_t layer = 0;
  std::unique_ptr<nn::Layer<T>> fresh;
  std::vector<optim::Param> params;
  std::vector<std::size_t> slots;  // the optimizer's index of each
};

// Makes layer i in `dtype` and finds its parameters in the optimizer (which
// must keep fp32 masters for them); changes nothing. On a device the copy
// reads the old weights (Layer::copy_as): call it after the optimizer's
// queued steps finished (Optimizer::synchronize), so that it does not
// race with them. The values it copies are overwritten from the masters.
template <class T>
PreparedMove<T> prepare_move(const nn::Sequential<T>& model, const optim::Optimizer& opt, std::size_t i,
                             DType dtype) {
  PreparedMove<T> p;
  p.layer = i;
  p.fresh = model.copy_in_precision(i, dtype);
  p.params = p.fresh->parameters(model.parameter_prefix(i));
  for (const optim::Param& q : p.params) {
    const std::size_t k = opt.find(q.name);
    MIXPREC_CHECK(opt.master(k).shape() == q.weight.shape(), "PrecisionFallback: parameter \"", q.name,
                  "\" has shape ", q.weight.shape(), " in the moved layer, ", opt.master(k).shape(), " in the ",
                  opt.name());
    p.slots.push_back(k);
  }
  return p;
}

// Writes the new weights from the fp32 masters (rounded to nearest even;
// exact for fp32), points the optimizer at them and swaps the layer in;
// whole or not at all (a failure points the optimizer back at the old
// layer, which stays). On a device: the weights are written by one
// conversion kernel each (nn::DeviceOps::convert, the host's bits) after
// every step queued so far (synchronised), the optimizer's device lists are
// made again here rather than at the next launch (which may be a graph
// capture), and the old layer is freed last, when nothing queued reads it.
template <class T>
void commit_move(nn::Sequential<T>& model, optim::Optimizer& opt, PreparedMove<T>& p) {
  opt.synchronize();  // device: the masters are final and the old buffers idle
  // Complete on return (nn::detail::convert_tensor waits for its kernel),
  // before the trainer's streams, non-blocking ones included, read them.
  for (std::size_t k = 0; k < p.params.size(); ++k) {
    const Tensor<float>& master = opt.master(p.slots[k]);
    p.params[k].weight.visit([&](auto w) { nn::detail::convert_tensor(TensorView<const float>(master.view()), w); });
  }
  std::vector<std::pair<TensorRef, TensorRef>> old;
  for (std::size_t k : p.slots) old.emplace_back(opt.param(k).weight, opt.param(k).grad);
  std::size_t rebound = 0;
  bool replaced = false;
  try {
    for (; rebound < p.params.size(); ++rebound) {
      opt.rebind(p.slots[rebound], p.params[rebound].weight, p.params[rebound].grad);
    }
    p.fresh = model.replace(p.layer, std::move(p.fresh));  // p.fresh: the old layer now
    replaced = true;
    // Last: once it has made the new lists, the old ones (which captured
    // graphs hold) are gone, so nothing after it may fail.
    opt.update_device_lists();
  } catch (...) {
    // The old layer and buffers were in place a moment ago: putting them
    // back cannot fail. (Only an upload failing inside update_device_lists,
    // out of device memory, can leave captured graphs stale here; an eager
    // step makes the lists again.)
    if (replaced) p.fresh = model.replace(p.layer, std::move(p.fresh));
    for (std::size_t k = rebound; k-- > 0;) opt.rebind(p.slots[k], old[k].first, old[k].second);
    throw;
  }
  p.fresh.reset();  // the old layer's buffers: nothing queued reads them (synchronised above)
}

}  // namespace detail

/// Puts every layer of `model` in the precision that a fallback's state
/// (PrecisionFallback::save_state) records, as an act move does (weights
/// from the masters, the optimizer rebound), without a monitor: for a
/// resumed run, before io::load_checkpoint, which wants the weights in the
/// dtypes they were saved in (PrecisionFallback::load_state does the same
/// and also remembers the moves). Every check runs and every new layer is
/// made before anything changes; each layer then moves whole or not at
/// all. Returns the number of layers moved. Host or device models; on a
/// device it synchronises (call it before capturing CUDA graphs, or drop
/// them afterwards).
template <class T>
std::size_t restore_precisions(nn::Sequential<T>& model, optim::Optimizer& opt, const std::string& state) {
  const detail::FallbackState st = detail::parse_fallback_state(state, model.size());
  opt.synchronize();  // device: the layers' copies below read weights the queued steps write
  std::vector<detail::PreparedMove<T>> prepared;
  for (std::size_t i = 0; i < model.size(); ++i) {
    if (st.precision[i] != model.precision(i)) prepared.push_back(detail::prepare_move(model, opt, i, st.precision[i]));
  }
  for (detail::PreparedMove<T>& p : prepared) detail::commit_move(model, opt, p);
  return prepared.size();
}

/// Watches a Monitor's events for one nn::Sequential<T> and its optimizer
/// and, per its policy, moves a layer that keeps overflowing fp16 (or
/// whose gradient underflows it) to bf16 or fp32, or suggests it:
///
///     nn::Sequential<half> model(...);
///     optim::AdamW opt(model.parameters(), ...);
///     amp::GradScaler scaler;
///     monitor::Monitor monitor(opt, scaler, mo);
///     monitor::PrecisionFallbackOptions fo;
///     fo.policy = monitor::FallbackPolicy::act;
///     monitor::PrecisionFallback<half> fallback(model, opt, monitor, fo);
///     // the training loop is unchanged: monitor.step(loss) acts at a logged step
///
/// How a layer is found: a repeated_overflow event, or an underflow event
/// that names a parameter, names one of the layer's parameters (the
/// Sequential's "<index>.weight" / "<index>.bias"). The monitor raises them
/// at logged steps, so the fallback acts at most `every` steps after the
/// detector's condition held.
///
/// The move (policy act), between two steps, inside monitor.step() after
/// the scaler's update: Sequential::copy_in_precision makes the layer
/// again in the new type; its new weights are written from the optimizer's
/// fp32 masters (the truth: for fp32 the weights are the masters exactly);
/// the optimizer is pointed at the new weight and gradient tensors
/// (Optimizer::rebind: masters, moments and step counts stay); the layer
/// is swapped in; the monitor follows the new gradient dtype. Training goes
/// on with one loss scale for the whole model: the moved layer's gradients
/// are bf16/fp32 and no longer overflow at it. The other layers stay in T.
/// A move happens whole or not at all.
///
/// On a CUDA device the same move, with the same bits (the weights are
/// converted from the masters on the device, rounding as the host does).
/// The events come with the monitor's read-back, a few steps after the
/// logged step that found them, so the layer moves after the step that
/// monitor.step() (or replayed(), flush()) had just queued when the
/// read-back arrived (PrecisionMove::step). The move synchronises once:
/// it waits for the optimizer's queued work (the scaler's stream, which
/// the forward and backward passes precede), converts, makes the
/// optimizer's device lists of the new buffers (gradients included) and
/// only then frees the old layer. Work of yours on another stream that
/// reads the layer's buffers must be ordered before the scaler's step.
/// CUDA graphs hold the old addresses: set PrecisionFallbackOptions::
/// on_move to drop them (the examples do), then run one step eagerly and
/// capture again; generation() and check_graph() tell a stale graph from
/// a current one. Once the optimizer's work has been captured, act
/// refuses to move without on_move (the layer is reported instead), so a
/// graph cannot silently replay freed buffers.
///
/// Checkpoints: save_state() records every layer's precision, the moves and
/// the suggestions; keep it in the checkpoint's metadata. A resumed run
/// reads it first (io::read_checkpoint_metadata) and calls load_state() on
/// a fallback of the freshly built model, or restore_precisions() where the
/// monitor is made later, BEFORE io::load_checkpoint (which wants the
/// weights in the dtypes they were saved in): the layers are in the
/// precision they had and the run goes on to the bits of an uninterrupted
/// one (on a device, before capturing graphs).
///
/// Limits: Linear and Conv2d can move. An activation that overflows fp16
/// at the layer's output still overflows (the move protects parameters
/// and their gradients, not activations handed to fp16 neighbours). One
/// loss scale: per-layer scales are the next step (docs/monitor.md). Not
/// with a dist::GradientReducer or ZeRO-1 (their buckets hold the old
/// gradients).
template <class T>
class PrecisionFallback {
 public:
  /// Registers itself as the monitor's responder (one per monitor; its
  /// destructor removes it). The model, the optimizer and the monitor must
  /// outlive it. The optimizer must hold every parameter of the model (by
  /// name, the same buffers), on the host or on the model's CUDA device.
  /// Every check runs before the monitor is touched.
  PrecisionFallback(nn::Sequential<T>& model, optim::Optimizer& opt, Monitor& monitor,
                    const PrecisionFallbackOptions& options = {})
      : model_(model), opt_(opt), monitor_(monitor), options_(options) {
    options_.validate(dtype_of<T>);
    MIXPREC_CHECK(opt.num_params() == 0 || opt.device() == model.device(), "PrecisionFallback: the model is on ",
                  model.device(), ", the ", opt.name(), "'s parameters on ", opt.device());
    for (std::size_t i = 0; i < model.size(); ++i) {
      for (const optim::Param& p : model.layer(i).parameters(model.parameter_prefix(i))) {
        const std::size_t k = opt.find(p.name);  // throws, naming it, when absent
        MIXPREC_CHECK(opt.param(k).weight.data() == p.weight.data() && opt.param(k).grad.data() == p.grad.data(),
                      "PrecisionFallback: the ", opt.name(), "'s parameter \"", p.name,
                      "\" holds other buffers than the model's; build the optimizer from model.parameters()");
        layer_of_[p.name] = i;
      }
    }
    monitor_.set_responder([this](const LogRecord& r, const std::vector<Event>& found) { return respond(r, found); });
  }
  ~PrecisionFallback() { monitor_.set_responder(nullptr); }
  PrecisionFallback(const PrecisionFallback&) = delete;
  PrecisionFallback& operator=(const PrecisionFallback&) = delete;

  const PrecisionFallbackOptions& options() const { return options_; }
  /// The layers moved so far, in order (a resumed run: those of load_state).
  const std::vector<PrecisionMove>& moves() const { return moves_; }
  /// Layers the fallback suggested moving, each once: policy suggest, or
  /// act where the layer could not move (its event says why).
  const std::set<std::size_t>& suggested() const { return suggested_; }

  /// How many times this fallback changed the model's layers (each act
  /// move, and each layer load_state moved), from 0. A CUDA graph captured
  /// while generation() was g replays freed buffers once it is not g.
  std::uint64_t generation() const { return generation_; }

  /// Throws, saying what moved, unless a graph captured while generation()
  /// was `captured_at` is still current: call it before replaying a graph
  /// you keep outside on_move's reach. Host models have no graphs, but the
  /// check is the same.
  void check_graph(std::uint64_t captured_at) const {
    MIXPREC_CHECK(captured_at <= generation_, "PrecisionFallback::check_graph: captured_at = ", captured_at,
                  ", but generation() is ", generation_, " (captured_at must be a generation() read before)");
    if (captured_at == generation_) return;
    std::string what = std::to_string(generation_ - captured_at) + " layer change(s) since";
    if (!last_change_.empty()) what += "; the last: " + last_change_;
    mixprec::detail::throw_error("PrecisionFallback::check_graph: the CUDA graph captured at generation ",
                                 captured_at, " would replay freed buffers (generation() is ", generation_, ": ",
                                 what, "); drop it, run one step eagerly and capture again");
  }

  /// Every layer's precision and the moves and suggestions so far, as one
  /// JSON line for a checkpoint (io::CheckpointExtras::metadata).
  std::string save_state() const {
    nlohmann::json j;
    j["format"] = "mixprec-precision-fallback-1";
    nlohmann::json precision = nlohmann::json::array();
    for (std::size_t i = 0; i < model_.size(); ++i) precision.push_back(dtype_name(model_.precision(i)));
    j["precision"] = precision;
    nlohmann::json moves = nlohmann::json::array();
    for (const PrecisionMove& m : moves_) {
      moves.push_back({m.layer, m.name, dtype_name(m.from), dtype_name(m.to), m.step, m.param,
                       static_cast<int>(m.trigger)});
    }
    j["moves"] = moves;
    j["suggested"] = std::vector<std::size_t>(suggested_.begin(), suggested_.end());
    return j.dump();
  }

  /// Takes save_state()'s line back: every layer whose recorded precision
  /// differs from its current one moves to it (whatever the policy: the
  /// checkpoint's weights are in those types), as an act move does
  /// (weights from the masters, optimizer rebound); the moves and
  /// suggestions are remembered. Call it before io::load_checkpoint.
  /// Every check (format, layer count, dtypes, that each layer can move)
  /// runs and every new layer is made before anything changes. On a
  /// device it synchronises; generation() counts the layers it moved (it
  /// does not call on_move: load before capturing graphs).
  void load_state(const std::string& state) {
    detail::FallbackState st = detail::parse_fallback_state(state, model_.size());
    const std::size_t moved = restore_precisions(model_, opt_, state);
    if (moved > 0) {
      generation_ += moved;
      last_change_ = std::to_string(moved) + " layer(s) put back in their saved precisions by load_state";
    }
    moves_ = std::move(st.moves);
    suggested_ = std::move(st.suggested);
  }

 private:
  std::vector<Event> respond(const LogRecord& r, const std::vector<Event>& found) {
    std::vector<Event> out;
    std::size_t first_new_move = moves_.size();  // on_move runs for these once every event is made
    if (options_.policy == FallbackPolicy::off) return out;
    const std::int64_t step = r.last().step;
    std::set<std::size_t> seen;  // one response per layer per record
    for (const Event& e : found) {
      const bool trigger = (e.kind == EventKind::repeated_overflow && options_.on_overflow) ||
                           (e.kind == EventKind::underflow && options_.on_underflow && !e.param.empty());
      if (!trigger) continue;
      const auto it = layer_of_.find(e.param);
      if (it == layer_of_.end()) continue;  // a parameter of the optimizer outside the model
      const std::size_t i = it->second;
      if (model_.precision(i) != dtype_of<T> || !seen.insert(i).second) continue;
      const std::string layer = "layer " + std::to_string(i) + " (" + model_.layer(i).name() + ")";
      const std::string why = e.kind == EventKind::repeated_overflow
                                  ? e.param + "'s gradient keeps overflowing " + dtype_name(dtype_of<T>) + " (" +
                                        e.message + ")"
                                  : e.param + "'s gradient underflows " + dtype_name(dtype_of<T>) + " (" +
                                        e.message + ")";
      // A layer that cannot move (a layer type without a copy in another
      // type, a device run whose graphs nobody drops, a failed allocation)
      // is reported, once, and training goes on as it was.
      std::optional<PrecisionMove> moved;
      std::string refused;
      bool graphs = false;  // refused for the CUDA graphs
      if (options_.policy == FallbackPolicy::act && suggested_.count(i) == 0) {
        if (opt_.captured() && !options_.on_move) {
          graphs = true;
          refused = "the " + std::string(opt_.name()) + "'s steps were captured in a CUDA graph, whose replays "
                    "would use the freed buffers, and PrecisionFallbackOptions::on_move (where the graphs are "
                    "dropped) is not set";
        } else {
          try {
            opt_.synchronize();  // device: the copy reads weights the queued steps write
            detail::PreparedMove<T> prepared = detail::prepare_move(model_, opt_, i, options_.to);
            PrecisionMove m;
            m.layer = i;
            m.name = model_.layer(i).name();
            m.from = dtype_of<T>;
            m.to = options_.to;
            m.step = monitor_.steps();  // after the step just queued; on the host, the logged one
            m.param = e.param;
            m.trigger = e.kind;
            detail::commit_move(model_, opt_, prepared);  // whole or not at all
            moved = std::move(m);
          } catch (const Error& err) {
            refused = err.what();
          }
        }
      }
      Event ev;
      ev.kind = EventKind::precision_fallback;
      ev.step = step;
      ev.param = e.param;
      ev.value = static_cast<double>(i);
      ev.threshold = std::numeric_limits<double>::quiet_NaN();
      if (moved) {
        // On a device the record arrives steps after its logged step: say
        // when the layer moved.
        const std::string when = moved->step == step ? "" : " after step " + std::to_string(moved->step);
        ev.message = layer + " moved from " + dtype_name(dtype_of<T>) + " to " + dtype_name(options_.to) + when +
                     ": " + why;
        ev.suggestion = "nothing to do: training goes on with this layer in " + std::string(dtype_name(options_.to)) +
                        " and the others in " + dtype_name(dtype_of<T>) +
                        "; keep PrecisionFallback::save_state() in your checkpoint so a resume keeps it";
        generation_ += 1;
        last_change_ = layer + " moved to " + dtype_name(options_.to) + " after step " + std::to_string(moved->step);
        moves_.push_back(*moved);
      } else {
        if (!suggested_.insert(i).second) continue;
        ev.message = layer + " should compute in " + std::string(dtype_name(options_.to)) + ": " + why;
        if (refused.empty()) {
          ev.suggestion = "model.set_precision(" + std::to_string(i) + ", DType::" + dtype_name(options_.to) +
                          ") before the optimizer is made, or PrecisionFallbackOptions::policy = act";
        } else if (graphs) {
          ev.message += "; it could not move: " + refused;
          ev.suggestion = "set PrecisionFallbackOptions::on_move to drop your CUDA graphs (then run one step eagerly "
                          "and capture again), or model.set_precision(" + std::to_string(i) + ", DType::" +
                          dtype_name(options_.to) + ") at the next start";
        } else {
          ev.message += "; it could not move: " + refused;
          ev.suggestion = "normalise the layer's input or lower its gradient's scale; or give the layer a copy in " +
                          std::string(dtype_name(options_.to)) + " (Layer::copy_as) so that it can move";
        }
      }
      out.push_back(std::move(ev));
    }
    // Last, so that an on_move that throws leaves every move made and
    // counted (the monitor still logs the record, then rethrows; the moves'
    // own events are lost with the return value, not the moves).
    if (options_.on_move) {
      for (; first_new_move < moves_.size(); ++first_new_move) options_.on_move(moves_[first_new_move]);
    }
    return out;
  }

  nn::Sequential<T>& model_;
  optim::Optimizer& opt_;
  Monitor& monitor_;
  PrecisionFallbackOptions options_;
  std::map<std::string, std::size_t> layer_of_;  // parameter name -> layer index
  std::vector<PrecisionMove> moves_;
  std::set<std::size_t> suggested_;
  std::uint64_t generation_ = 0;
  std::string last_change_;  // for check_graph's message
};

}  // namespace monitor
MIXPREC_NAMESPACE_END

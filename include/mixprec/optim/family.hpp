// SPDX-License-Identifier: Apache-2.0
// The optimizer family: an optimizer is a Rule (one header: its options,
// their validation, its per-group hyperparameters, one coefficient
// function, the element update and its state tensors), and Family<Rule> is
// the optimizer class: parameter groups, checkpoints, the generic CPU step
// and the device launch. The CUDA backend runs any rule whose kernel part is
// registered (MIXPREC_REGISTER_OPTIMIZER in one .cu file).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/optim/cpu_step.hpp"
#include "mixprec/optim/optimizer_base.hpp"
#include "mixprec/optim/param.hpp"
#include "mixprec/tensor/tensor_ref.hpp"

// The formula is instantiated with 8-float vectors for the AVX2 loop (see
// core/simd.hpp on -Wpsabi).
MIXPREC_PSABI_PUSH
MIXPREC_NAMESPACE_BEGIN namespace optim {

/// Two state tensors that must be ordered elementwise in a loaded state
/// (Adam's max_exp_avg_sq >= exp_avg_sq).
struct StateOrder {
  int high, low;
  const char* why;
};

/// The pre-pass (optional; LAMB, Adam's update clipping): a kernel part may
/// ask for per-tensor sums over the elements, made before any element of the
/// step is written, from which its coefficients are finished:
///
///     static constexpr int kSums = N;                 // sums per tensor, 1..3
///     MIXPREC_HOST_DEVICE static unsigned prepass(const Hyper&);  // kPrepass* bits; 0: none this step
///     MIXPREC_HOST_DEVICE static void grad_norm(Coeffs&, const Hyper&, double sum_squares);
///     template <class V> MIXPREC_HOST_DEVICE static void terms(const V& param, const V& s0, const V& s1,
///                                                              const V& s2, V grad, const Coeffs&, V* out);
///     MIXPREC_HOST_DEVICE static void finish(Coeffs&, const Hyper&, double lr, double step,
///                                            const double* sums, std::int64_t numel);
///
/// With kPrepassGradNorm, a first round sums the squares of every
/// parameter's gradient (after the unscale and the scaler's clip: the g
/// the update sees) over the whole optimizer, and grad_norm() gets the
/// total; with kPrepassSums, a round sums terms() (out[0..N)) over each
/// tensor, from the step's coefficients and the state before the step
/// (terms reads, never writes), and finish() gets them. A kernel part
/// without kSums has no pre-pass, and its step is what it was.
///
/// The sums have the same bits on the CPU and the GPU: one order, that of
/// the device kernel. A tensor is cut at multiples of kPrepassChunk
/// elements (the device's chunks); in a chunk, element e's term goes to
/// partial sum e % 256 (a thread's), added in float in increasing e; the
/// 256 partials reduce per 32 as x[l] += x[l + h] for h = 16, 8, 4, 2, 1 (a
/// warp's shuffle tree), and the 8 results are added in order to 0.0f; the
/// chunks' floats are added in double in chunk order, and (the gradient
/// round) the tensors' doubles in parameter order.
inline constexpr unsigned kPrepassSums = 1;
inline constexpr unsigned kPrepassGradNorm = 2;
inline constexpr std::int64_t kPrepassChunk = std::int64_t{1} << 16;
inline constexpr int kPrepassLanes = 256;

namespace detail {
template <class K, class = void>
struct PrepassSumsOf : std::integral_constant<int, 0> {};
template <class K>
struct PrepassSumsOf<K, std::void_t<decltype(K::kSums)>> : std::integral_constant<int, K::kSums> {};
}  // namespace detail
/// The number of pre-pass sums of kernel part K (0: it has no pre-pass).
template <class K>
inline constexpr int prepass_sums_v = detail::PrepassSumsOf<K>::value;

namespace detail {
template <class K, class = void>
struct KernelStatesOf : std::integral_constant<int, 3> {};
template <class K>
struct KernelStatesOf<K, std::void_t<decltype(K::kStates)>> : std::integral_constant<int, K::kStates> {};
}  // namespace detail
/// The most state tensors kernel part K's update uses (its optional
/// kStates; 3 where it has none). The device step holds no registers for
/// state it can never use.
template <class K>
inline constexpr int kernel_states_v = detail::KernelStatesOf<K>::value;

namespace detail {
// The pre-pass's reduction of 256 partials (see kPrepassSums); destroys them.
inline float reduce_lanes(float* p) {
  float total = 0.0f;
  for (int w = 0; w < kPrepassLanes / 32; ++w) {
    float* x = p + 32 * w;
    for (int h = 16; h > 0; h /= 2) {
      for (int l = 0; l < h; ++l) x[l] = x[l] + x[l + h];
    }
    total = total + x[0];
  }
  return total;
}
template <class V>
inline V load_lane(const float* p) {
  if constexpr (std::is_same<V, float>::value) {
    return *p;
  } else {
#if MIXPREC_HAS_VECTOR_EXT
    return simd::load<V>(p);
#else
    static_assert(std::is_same<V, float>::value, "vector lanes need the host's vector extension");
#endif
  }
}
template <class V>
inline void store_lane(float* p, const V& v) {
  if constexpr (std::is_same<V, float>::value) {
    *p = v;
  } else {
#if MIXPREC_HAS_VECTOR_EXT
    simd::store(p, v);
#endif
  }
}

// out[0..K) = the pre-pass sums over the n elements of one tensor, in the
// order above: term(e, g, out) writes element e's K terms given its
// transformed gradient g (for 4 elements at a time, g a simd::f32x4, where
// the host has vectors: then term j of element e + l goes to out[4 j + l]).
template <int K, class Term>
void prepass_tensor_sums(const TensorRef& grad, std::int64_t n, const GradTransform& t, Term&& term, double* out) {
  static_assert(K >= 1 && K <= 3, "a pre-pass makes 1 to 3 sums per tensor");
  for (int j = 0; j < K; ++j) out[j] = 0.0;
  float g[cpu::kChunk];
  static_assert(cpu::kChunk % kPrepassLanes == 0 && kPrepassChunk % cpu::kChunk == 0, "lane e % 256 of a chunk");
  for (std::int64_t begin = 0; begin < n; begin += kPrepassChunk) {
    const std::int64_t end = std::min(begin + kPrepassChunk, n);
    float lanes[K][kPrepassLanes] = {};
    for (std::int64_t off = begin; off < end; off += cpu::kChunk) {
      const std::int64_t m = std::min(cpu::kChunk, end - off);
      cpu::load_float(grad, off, m, g);
      // The update's transform, the same roundings (update_elements).
      if (t.inv_scale != 1.0f) {
        for (std::int64_t k = 0; k < m; ++k) g[k] *= t.inv_scale;
      }
      if (t.clip_coef != 1.0f) {
        for (std::int64_t k = 0; k < m; ++k) g[k] *= t.clip_coef;
      }
      std::int64_t k = 0;
#if MIXPREC_HAS_VECTOR_EXT
      for (; k + simd::lanes <= m; k += simd::lanes) {
        float v[K * simd::lanes];
        term(off + k, simd::load<simd::f32x4>(g + k), v);
        for (int j = 0; j < K; ++j) {
          float* a = lanes[j] + k % kPrepassLanes;
          simd::store(a, simd::load<simd::f32x4>(a) + simd::load<simd::f32x4>(v + j * simd::lanes));
        }
      }
#endif
      for (; k < m; ++k) {
        float v[K];
        term(off + k, g[k], v);
        for (int j = 0; j < K; ++j) lanes[j][k % kPrepassLanes] += v[j];
      }
    }
    for (int j = 0; j < K; ++j) out[j] += static_cast<double>(reduce_lanes(lanes[j]));
  }
}
}  // namespace detail

/// Defaults a Rule inherits and may hide.
struct RuleDefaults {
  /// The state tensor the monitor reads as the second moment (-1: none),
  /// the eps it meets and the beta2 that bias-corrects it (0: none).
  struct SecondMomentOf {
    int state = -1;
    double eps = 0, beta2 = 0;
  };
  template <class Options>
  static SecondMomentOf second_moment(const Options&) {
    return {};
  }
  /// State tensors a loaded state must hold >= 0 (a sqrt divides by them).
  static std::vector<int> nonnegative_states() { return {}; }
  static std::vector<StateOrder> ordered_states() { return {}; }
};

/// The optimizer of `Rule`. Rule provides (see optimizers/sgd.hpp for the
/// smallest one):
///
///     using Options = ...;           // torch's names and defaults; trivially copyable
///     using Kernel = ...;            // the device part: Hyper, Coeffs, coeffs, uses, update
///     static const char* name();
///     static std::vector<std::string> state_names();   // at most 3
///     static void validate(const Options&);            // throws, naming option and value
///     static bool allocates(const Options&, int k);    // state tensor k exists with these options
///     static Kernel::Hyper hyper(const Options&, double lr, unsigned fresh);
///
/// where `fresh` has bit k set when state tensor k was created for this
/// step (SGD starts a new momentum buffer from the gradient). The kernel
/// part, usable on the host and the device:
///
///     struct Hyper { double lr; ... };   // trivially copyable: a kernel argument
///     struct Coeffs { ... };             // floats, once per tensor and step
///     static constexpr const char* kKey;              // its name in the CUDA registry
///     static constexpr int kStates;                   // optional: state tensors it may use (default 3)
///     MIXPREC_HOST_DEVICE static Coeffs coeffs(const Hyper&, double lr, double step);
///     MIXPREC_HOST_DEVICE static bool uses(const Coeffs&, int k);  // state k is read and written
///     template <class V> MIXPREC_HOST_DEVICE static void update(V& param, V& s0, V& s1, V& s2, V grad,
///                                                               const Coeffs&);
///
/// coeffs is the one place where the update's coefficients are made (in
/// double, rounded to float, as torch.optim does with Python floats): the
/// CPU step and the kernel both call it. update is the element formula, the
/// same IEEE operations in the same order on every path, so the CPU and the
/// GPU give the same bits.
template <class Rule>
class Family : public OptimizerBase<Family<Rule>, typename Rule::Options> {
  using Kernel = typename Rule::Kernel;
  using Hyper = typename Kernel::Hyper;
  using Coeffs = typename Kernel::Coeffs;
  static constexpr int kSums = prepass_sums_v<Kernel>;
  static_assert(kernel_states_v<Kernel> >= 0 && kernel_states_v<Kernel> <= 3, "kStates: at most 3 state tensors");

 public:
  using Options = typename Rule::Options;

  explicit Family(std::vector<Param> params, const Options& options = {}) {
    this->add_param_group(std::move(params), options);
  }
  const char* name() const override { return Rule::name(); }
  std::vector<std::string> state_names() const override { return Rule::state_names(); }
  static void validate(const Options& o) {
    Rule::validate(o);
    if constexpr (kSums > 0) {
      const StateLayout l = layout_option(o);
      MIXPREC_CHECK(!l.lean() || Kernel::prepass(Rule::hyper(o, o.lr, 0)) == 0u, Rule::name(),
                    ": these options need a pre-pass over the state (per-tensor sums), which lean layouts do not "
                    "have in this version: StateLayout moments = ", to_string(l.moments), ", master = ",
                    to_string(l.master), "; keep both fp32");
    }
  }

  bool nonnegative_state(std::size_t k) const override {
    for (int n : Rule::nonnegative_states()) {
      if (static_cast<std::size_t>(n) == k) return true;
    }
    return false;
  }

  SecondMoment second_moment(std::size_t i) const override {
    const auto s = Rule::second_moment(this->options(this->group_of(i)));
    if (s.state < 0) return {};
    return {this->existing_state(i, static_cast<std::size_t>(s.state)), static_cast<float>(s.eps),
            static_cast<float>(s.beta2), s.state};
  }

  void check_state_values(std::size_t i, const ParamState& p) const override {
    const std::string& n = this->param(i).name;
    const std::vector<std::string> names = Rule::state_names();
    auto has = [&](int k) { return p.state.size() > static_cast<std::size_t>(k) && p.state[k]; };
    for (int k : Rule::nonnegative_states()) {
      if (has(k)) this->check_values(*p.state[k], names[k].c_str(), n, [](float v) { return v >= 0.0f; }, ">= 0");
    }
    // 8-bit moments round each tensor with its own blocks' scales: a
    // running maximum may then be a step below the moment it bounds.
    const bool ordered = this->layout_of(i).moments != Moments::int8;
    for (const StateOrder& o : Rule::ordered_states()) {
      if (!ordered || !has(o.high) || !has(o.low)) continue;
      const std::vector<float>& hi = *p.state[o.high];
      const std::vector<float>& lo = *p.state[o.low];
      for (std::size_t k = 0; k < hi.size(); ++k) {
        MIXPREC_CHECK(hi[k] >= lo[k], this->name(), "::load_state: parameter \"", n, "\": ", names[o.high], "[", k,
                      "] = ", hi[k], " < ", names[o.low], "[", k, "] = ", lo[k], "; ", o.why);
      }
    }
  }

 protected:
  void allocate_state(std::size_t i) override {
    const Options& o = this->options_[this->group_of(i)];
    for (int k = 0; k < 3; ++k) {
      if (Rule::allocates(o, k)) this->state(i, static_cast<std::size_t>(k));
    }
  }

  void launch_groups(DevicePlan& plan, const DeviceStepInputs& in, stream_t stream) override {
    std::vector<Hyper> groups;
    for (std::size_t g = 0; g < this->num_groups(); ++g) {
      // The base lr: the kernel applies the schedule on the device.
      groups.push_back(Rule::hyper(this->options_[g], this->base_lr(g), fresh_of(this->first_of_group(g))));
    }
    plan.step(Kernel::kKey, groups.data(), groups.size(), sizeof(Hyper), this->schedule(), in, stream);
  }

  void update_param(std::size_t i, const GradTransform& t) override {
    const std::size_t g = this->group_of(i);
    const double lr = this->lr(g);
    const Hyper h = Rule::hyper(this->options_[g], lr, fresh_of(i));
    const double step = static_cast<double>(this->step_count(i));
    Coeffs c = Kernel::coeffs(h, lr, step);
    if constexpr (kSums > 0) finish_coeffs(i, t, h, lr, step, c);
    const unsigned mask = (Kernel::uses(c, 0) ? 1u : 0u) | (Kernel::uses(c, 1) ? 2u : 0u) |
                          (Kernel::uses(c, 2) ? 4u : 0u);
    if (this->precursors_ != nullptr) set_precursor_spec(g, step, c);
    switch (mask) {
      case 0: return update_masked<0>(i, t, c);
      case 1: return update_masked<1>(i, t, c);
      case 2: return update_masked<2>(i, t, c);
      case 3: return update_masked<3>(i, t, c);
      case 4: return update_masked<4>(i, t, c);
      case 5: return update_masked<5>(i, t, c);
      case 6: return update_masked<6>(i, t, c);
      default: return update_masked<7>(i, t, c);
    }
  }

  // The pre-pass's gradient round, before any parameter is updated: the
  // sum of squares of every transformed gradient, when a group asks.
  void before_update(const GradTransform& t) override {
    if constexpr (kSums > 0) {
      unsigned want = 0;
      for (std::size_t g = 0; g < this->num_groups(); ++g) {
        want |= Kernel::prepass(Rule::hyper(this->options_[g], this->lr(g), 0));
      }
      if ((want & kPrepassGradNorm) == 0u) return;
      double total = 0;
      for (std::size_t i = 0; i < this->num_params(); ++i) {
        double s = 0;
        detail::prepass_tensor_sums<1>(this->param(i).grad, this->param(i).grad.numel(), t,
                                       [](std::int64_t, auto g, float* out) { detail::store_lane(out, math::mul(g, g)); },
                                       &s);
        total += s;
      }
      grad_sum_squares_ = total;
    } else {
      (void)t;
    }
  }

 private:
  // The pre-pass's per-tensor round for parameter i, and the coefficients
  // finished from its sums (before update_elements writes anything).
  void finish_coeffs(std::size_t i, const GradTransform& t, const Hyper& h, double lr, double step, Coeffs& c) {
    const unsigned pre = Kernel::prepass(h);
    if (pre & kPrepassGradNorm) Kernel::grad_norm(c, h, grad_sum_squares_);
    if ((pre & kPrepassSums) == 0u) return;
    const float* m = this->slots_[i].master.data();
    const float* s[3];
    for (int k = 0; k < 3; ++k) s[k] = Kernel::uses(c, k) ? this->existing_state(i, static_cast<std::size_t>(k)) : m;
    const Coeffs cc = c;
    double sums[kSums > 0 ? kSums : 1];
    const std::int64_t n = this->param(i).grad.numel();
    detail::prepass_tensor_sums<kSums>(this->param(i).grad, n, t,
                                       [&](std::int64_t e, auto g, float* out) {
                                         using V = decltype(g);
                                         V terms[kSums > 0 ? kSums : 1];
                                         Kernel::terms(detail::load_lane<V>(m + e), detail::load_lane<V>(s[0] + e),
                                                       detail::load_lane<V>(s[1] + e),
                                                       detail::load_lane<V>(s[2] + e), g, cc, terms);
                                         constexpr int lanes = static_cast<int>(sizeof(V) / sizeof(float));
                                         for (int j = 0; j < kSums; ++j) detail::store_lane(out + j * lanes, terms[j]);
                                       },
                                       sums);
    Kernel::finish(c, h, lr, step, sums, n);
  }

  double grad_sum_squares_ = 0;  // the pre-pass's gradient round (before_update)

  // The second moment the precursors read (Optimizer::set_precursors):
  // the one the monitor reads, bias-corrected as the update's v-hat.
  void set_precursor_spec(std::size_t g, double step, const Coeffs& c) {
    const auto sm = Rule::second_moment(this->options_[g]);
    typename Optimizer::PrecursorSpec& spec = this->precursor_spec_;
    spec = {};
    if (sm.state < 0 || !Kernel::uses(c, sm.state)) return;
    // In SecondMoment's floats, as the monitor has always read them (its
    // device pass too): the same eps share on either side.
    const float eps = static_cast<float>(sm.eps), beta2 = static_cast<float>(sm.beta2);
    spec.state = sm.state;
    spec.eps2 = eps * eps;
    spec.v_scale = v_hat_scale(beta2, step);
  }

  unsigned fresh_of(std::size_t i) const {
    unsigned f = 0;
    for (std::size_t k = 0; k < 3; ++k) f |= this->fresh_state(i, k) ? 1u << k : 0u;
    return f;
  }

  // The CPU step over the master and the state tensors in `Mask`: the
  // formula sees every state argument; those not in the mask are copies of
  // the master that it does not read (uses() says so).
  template <unsigned Mask>
  void update_masked(std::size_t i, const GradTransform& t, const Coeffs& c) {
    constexpr bool a = (Mask & 1u) != 0, b = (Mask & 2u) != 0, d = (Mask & 4u) != 0;
    if constexpr (a && b && d) {
      this->template update_states<4>(i, t, {0, 1, 2},
                                        [c](auto& p, auto& s0, auto& s1, auto& s2, const auto& grad) {
                                          Kernel::update(p, s0, s1, s2, grad, c);
                                        });
    } else if constexpr (a && b) {
      this->template update_states<3>(i, t, {0, 1},
                                        [c](auto& p, auto& s0, auto& s1, const auto& grad) {
                                          auto u = p;
                                          Kernel::update(p, s0, s1, u, grad, c);
                                        });
    } else if constexpr (a && d) {
      this->template update_states<3>(i, t, {0, 2},
                                        [c](auto& p, auto& s0, auto& s2, const auto& grad) {
                                          auto u = p;
                                          Kernel::update(p, s0, u, s2, grad, c);
                                        });
    } else if constexpr (b && d) {
      this->template update_states<3>(i, t, {1, 2},
                                        [c](auto& p, auto& s1, auto& s2, const auto& grad) {
                                          auto u = p;
                                          Kernel::update(p, u, s1, s2, grad, c);
                                        });
    } else if constexpr (a) {
      this->template update_states<2>(i, t, {0}, [c](auto& p, auto& s0, const auto& grad) {
        auto u = p, v = p;
        Kernel::update(p, s0, u, v, grad, c);
      });
    } else if constexpr (b) {
      this->template update_states<2>(i, t, {1}, [c](auto& p, auto& s1, const auto& grad) {
        auto u = p, v = p;
        Kernel::update(p, u, s1, v, grad, c);
      });
    } else if constexpr (d) {
      this->template update_states<2>(i, t, {2}, [c](auto& p, auto& s2, const auto& grad) {
        auto u = p, v = p;
        Kernel::update(p, u, v, s2, grad, c);
      });
    } else {
      this->template update_states<1>(i, t, {}, [c](auto& p, const auto& grad) {
        auto u = p, v = p, w = p;
        Kernel::update(p, u, v, w, grad, c);
      });
    }
  }
};

}  // namespace optim
MIXPREC_NAMESPACE_END
MIXPREC_PSABI_POP

// SPDX-License-Identifier: Apache-2.0
// The optimizer family: an optimizer is a Rule (one header: its options,
// their validation, its per-group hyperparameters, one coefficient
// function, the element update and its state tensors), and Family<Rule> is
// the optimizer class: parameter groups, checkpoints, the generic CPU step
// and the device launch. The CUDA backend runs any rule whose kernel part is
// registered (MIXPREC_REGISTER_OPTIMIZER in one .cu file).
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/optim/optimizer_base.hpp"

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

 public:
  using Options = typename Rule::Options;

  explicit Family(std::vector<Param> params, const Options& options = {}) {
    this->add_param_group(std::move(params), options);
  }
  const char* name() const override { return Rule::name(); }
  std::vector<std::string> state_names() const override { return Rule::state_names(); }
  static void validate(const Options& o) { Rule::validate(o); }

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
            static_cast<float>(s.beta2)};
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
    const Coeffs c = Kernel::coeffs(Rule::hyper(this->options_[g], lr, fresh_of(i)), lr,
                                    static_cast<double>(this->step_count(i)));
    const unsigned mask = (Kernel::uses(c, 0) ? 1u : 0u) | (Kernel::uses(c, 1) ? 2u : 0u) |
                          (Kernel::uses(c, 2) ? 4u : 0u);
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

 private:
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

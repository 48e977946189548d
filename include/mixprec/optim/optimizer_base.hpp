// SPDX-License-Identifier: Apache-2.0
// OptimizerBase: parameter groups with per-group options of one optimizer's
// option type, validated on every way in (construction, new groups, setters).
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

namespace detail {
template <class O, class = void>
struct HasLayout : std::false_type {};
template <class O>
struct HasLayout<O, std::void_t<decltype(std::declval<const O&>().layout)>> : std::true_type {};
}  // namespace detail

/// The state layout an optimizer's options ask for: their `layout` member
/// (the built-in optimizers have one), else fp32 state and masters.
template <class Options>
StateLayout layout_option(const Options& o) {
  if constexpr (detail::HasLayout<Options>::value) {
    return o.layout;
  } else {
    (void)o;
    return {};
  }
}

/// Derived provides `static void validate(const Options&)` (throwing with the
/// option's name and value) and `update_param`.
template <class Derived, class Options>
class OptimizerBase : public Optimizer {
 public:
  using options_type = Options;

  /// Adds a group of parameters with their own options (torch's
  /// add_param_group). Everything is validated before anything is added.
  void add_param_group(std::vector<Param> params, const Options& options) {
    Derived::validate(options);
    options_.reserve(options_.size() + 1);  // so the push_back below cannot throw
    add_group(std::move(params), options.lr, layout_option(options));
    options_.push_back(options);
    try {
      prepare_device();  // device state and lists; may fail to allocate
    } catch (...) {
      options_.pop_back();
      drop_last_group();
      throw;
    }
  }

  const Options& options(std::size_t group) const { return options_.at(check_group(group)); }
  /// Replaces a group's options; validated first, so a bad value changes nothing.
  void set_options(std::size_t group, const Options& options) {
    check_group(group);
    Derived::validate(options);
    const StateLayout was = layout_option(options_[group]), asked = layout_option(options);
    MIXPREC_CHECK(asked == was, this->name(), "::set_options: group ", group, "'s StateLayout (moments ",
                  to_string(was.moments), ", master ", to_string(was.master), ", seed ", was.seed,
                  ") cannot change (asked: moments ", to_string(asked.moments), ", master ", to_string(asked.master),
                  ", seed ", asked.seed, "); it is fixed when the group is added");
    options_[group] = options;
    Optimizer::set_lr(group, options.lr);
  }

 protected:
  void on_lr_changed(std::size_t group, double lr) override { options_[group].lr = lr; }
  void check_group_lr(std::size_t group, double lr) const override {
    Options o = options_.at(group);
    o.lr = lr;
    Derived::validate(o);
  }

  std::vector<Options> options_;
};

namespace detail {

inline void check_nonnegative(const char* opt, const char* what, double v) {
  MIXPREC_CHECK(std::isfinite(v) && v >= 0.0, opt, ": ", what, " = ", v,
                ", must be finite and >= 0");
}

inline void check_unit_interval(const char* opt, const char* what, double v) {
  MIXPREC_CHECK(v >= 0.0 && v < 1.0, opt, ": ", what, " = ", v, ", must be in [0, 1)");
}

/// The update computes in float: a value (or a coefficient made of values)
/// beyond FLT_MAX would become inf there.
inline void check_float(const char* opt, const char* what, double v) {
  MIXPREC_CHECK(std::isfinite(v) && std::fabs(v) <= static_cast<double>(std::numeric_limits<float>::max()), opt,
                ": ", what, " = ", v, ", must be finite as a float (|x| <= 3.40282e+38)");
}

/// eps divides: it must stay > 0 once rounded to float. (eps = 0 divides 0
/// by 0 for a parameter whose gradients are all zero, and writes NaN;
/// PyTorch accepts it, mixprec refuses it.)
inline void check_eps(const char* opt, double eps) {
  MIXPREC_CHECK(eps > 0.0 && eps <= static_cast<double>(std::numeric_limits<float>::max()) &&
                    static_cast<float>(eps) > 0.0f,
                opt, ": eps = ", eps, ", must be > 0 and a finite float >= 1.4e-45 (eps = 0 turns a zero gradient "
                "into 0 / 0 = NaN)");
}

}  // namespace detail
}  // namespace optim
MIXPREC_NAMESPACE_END

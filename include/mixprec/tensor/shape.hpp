// SPDX-License-Identifier: Apache-2.0
// Shape: the extents of a contiguous row-major tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

/// Extents of a row-major tensor; rank 0 is a scalar with one element.
/// Extents are >= 0 and their product must fit in int64 (checked).
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) : dims_(dims) { validate(); }
  explicit Shape(std::vector<std::int64_t> dims) : dims_(std::move(dims)) { validate(); }

  std::size_t rank() const { return dims_.size(); }
  std::int64_t operator[](std::size_t i) const {
    MIXPREC_CHECK(i < dims_.size(), "Shape: index = ", i, ", rank is ", dims_.size());
    return dims_[i];
  }
  const std::vector<std::int64_t>& dims() const { return dims_; }
  std::int64_t numel() const { return numel_; }

  std::string str() const {
    std::string out = "[";
    for (std::size_t i = 0; i < dims_.size(); ++i) {
      if (i) out += ", ";
      out += std::to_string(dims_[i]);
    }
    return out + "]";
  }

  friend bool operator==(const Shape& a, const Shape& b) { return a.dims_ == b.dims_; }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }
  friend std::ostream& operator<<(std::ostream& out, const Shape& s) { return out << s.str(); }

 private:
  void validate() {
    std::int64_t n = 1;
    for (std::size_t i = 0; i < dims_.size(); ++i) {
      const std::int64_t d = dims_[i];
      MIXPREC_CHECK(d >= 0, "Shape: dims[", i, "] = ", d, ", must be >= 0");
      MIXPREC_CHECK(d == 0 || n <= std::numeric_limits<std::int64_t>::max() / d,
                    "Shape: ", str(), " has more than 2^63 - 1 elements");
      n *= d;
    }
    numel_ = n;
  }

  std::vector<std::int64_t> dims_;
  std::int64_t numel_ = 1;
};

MIXPREC_NAMESPACE_END  // namespace mixprec

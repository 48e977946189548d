// SPDX-License-Identifier: Apache-2.0
// Convolution and pooling cases that run the same on the CPU (nn_test) and
// a GPU (nn_gpu_test), comparing bits.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec::test {

/// A tensor's elements on the host (a copy; synchronises the default stream).
template <class T>
std::vector<T> host_copy(TensorView<const T> v) {
  Tensor<T> h(v.shape());
  copy(v, h);
  return std::vector<T>(h.data(), h.data() + h.numel());
}

/// Same bits, element by element (memcmp, so NaNs with the same bits compare equal).
template <class T>
void expect_same_bits(TensorView<const T> a, TensorView<const T> b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const std::vector<T> x = host_copy(a), y = host_copy(b);
  std::int64_t differ = 0, first = -1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (std::memcmp(&x[i], &y[i], sizeof(T)) != 0) {
      if (first < 0) first = static_cast<std::int64_t>(i);
      ++differ;
    }
  }
  EXPECT_EQ(differ, 0) << what << ": " << differ << " of " << x.size() << " elements differ, the first at " << first
                       << " (" << to_float(x[static_cast<std::size_t>(first < 0 ? 0 : first)]) << " vs "
                       << to_float(y[static_cast<std::size_t>(first < 0 ? 0 : first)]) << ")";
}

/// Conv2d with its ReLU fused against the same Conv2d followed by an
/// ActivationLayer(relu), on `dev`: the same bits for y, dx (unless
/// `first_layer`, where no dx is asked for, as Sequential does for its
/// first layer) and the weight and bias gradients.
template <class T>
void expect_fused_relu_is_the_pair(Device dev, std::int64_t c, std::int64_t stride, std::int64_t pad,
                                   bool first_layer) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " c " + std::to_string(c) + " stride " + std::to_string(stride) +
               " pad " + std::to_string(pad) + (first_layer ? " first layer" : ""));
  const std::int64_t n = 5, h = 13, w = 11, k = 6;
  nn::Conv2d<T> fused(c, k, 3, stride, pad, true, dev, 4, nn::Activation::relu);
  nn::Conv2d<T> plain(c, k, 3, stride, pad, true, dev, 4);
  nn::ActivationLayer<T> relu(nn::Activation::relu, dev);
  Tensor<T> hx({n, c, h, w});
  fill_normal(hx, 0, 1, 5);
  const Shape out = plain.output_shape(hx.shape());
  Tensor<T> hdy(out);
  fill_normal(hdy, 0, 1, 6);
  Tensor<T> x = hx.to(dev), dy = hdy.to(dev);
  Tensor<T> y_fused(out, dev), z(out, dev), y_pair(out, dev), dz(out, dev);
  Tensor<T> dx_fused(first_layer ? Shape{0} : hx.shape(), dev), dx_pair(first_layer ? Shape{0} : hx.shape(), dev);
  const TensorView<T> no_dx;
  fused.forward(x.view(), y_fused.view(), {});
  plain.forward(x.view(), z.view(), {});
  relu.forward(z.view(), y_pair.view(), {});
  expect_same_bits<T>(y_fused.view(), y_pair.view(), "y");
  fused.backward(x.view(), y_fused.view(), dy.view(), first_layer ? no_dx : dx_fused.view(), {});
  relu.backward(z.view(), y_pair.view(), dy.view(), dz.view(), {});
  plain.backward(x.view(), z.view(), dz.view(), first_layer ? no_dx : dx_pair.view(), {});
  if (!first_layer) expect_same_bits<T>(dx_fused.view(), dx_pair.view(), "dx");
  expect_same_bits<T>(fused.grad_weight().view(), plain.grad_weight().view(), "grad_weight");
  expect_same_bits<T>(fused.grad_bias().view(), plain.grad_bias().view(), "grad_bias");
}

/// MaxPool2d on `dev` against the CPU layer, bit for bit, on values with
/// ties (a window's first maximum takes the gradient) and NaNs (a window's
/// first NaN wins): y and dx.
template <class T>
void expect_pool_gives_the_cpu_bits(Device dev, std::int64_t window, std::int64_t stride, std::int64_t h,
                                    std::int64_t w) {
  SCOPED_TRACE(std::string(dtype_traits<T>::name) + " window " + std::to_string(window) + " stride " +
               std::to_string(stride) + " " + std::to_string(h) + "x" + std::to_string(w));
  const std::int64_t n = 3, c = 4;
  nn::MaxPool2d<T> cpu(window, stride), other(window, stride, dev);
  Tensor<T> hx({n, c, h, w});
  const float levels[5] = {-1.0f, 0.0f, 0.5f, 0.5f, 1.0f};  // few values: many windows with tied maxima
  for (std::int64_t i = 0; i < hx.numel(); ++i) {
    hx.at(i) = from_float<T>(i % 37 == 5 ? NAN : levels[(i * 7 + i / 5) % 5]);
  }
  const Shape out = cpu.output_shape(hx.shape());
  Tensor<T> hdy(out);
  fill_normal(hdy, 0, 1, 8);
  Tensor<T> y(out), dx(hx.shape());
  cpu.forward(hx.view(), y.view(), {});
  cpu.backward(hx.view(), y.view(), hdy.view(), dx.view(), {});
  Tensor<T> x = hx.to(dev), dy = hdy.to(dev), y_dev(out, dev), dx_dev(hx.shape(), dev);
  other.forward(x.view(), y_dev.view(), {});
  other.backward(x.view(), y_dev.view(), dy.view(), dx_dev.view(), {});
  expect_same_bits<T>(y_dev.view(), y.view(), "y");
  expect_same_bits<T>(dx_dev.view(), dx.view(), "dx");
}

}  // namespace mixprec::test

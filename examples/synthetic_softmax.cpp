// SPDX-License-Identifier: Apache-2.0
// The default example until the Fashion-MNIST trainers land: softmax
// regression on synthetic Gaussian clusters, trained the way a user with
// their own forward and backward code trains with mixprec: fp16 weights and
// gradients in the user's buffers, an AdamW with fp32 masters, and a dynamic
// GradScaler.
//
//   synthetic_softmax [--epochs N] [--seed S]
#include <mixprec/mixprec.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using mixprec::half;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr int kClasses = 10, kFeatures = 64, kTrain = 20000, kTest = 4000, kBatch = 250;

// Points around one random centre per class; labels are i % kClasses.
void make_data(int n, std::uint64_t seed, const Matrix& centres, Matrix& x, Eigen::VectorXi& y) {
  mixprec::Tensor<float> noise({n, kFeatures});
  mixprec::fill_normal(noise, 0.0f, 1.0f, seed);
  x = noise.matrix();
  y.resize(n);
  for (int i = 0; i < n; ++i) {
    y[i] = i % kClasses;
    x.row(i) += centres.row(y[i]);
  }
}

// Mean cross-entropy and accuracy of logits against labels.
std::pair<double, double> evaluate(const Matrix& logits, const Eigen::VectorXi& y) {
  double loss = 0;
  int correct = 0;
  for (Eigen::Index i = 0; i < logits.rows(); ++i) {
    Eigen::Index best;
    const float top = logits.row(i).maxCoeff(&best);
    const double log_sum = top + std::log((logits.row(i).array() - top).exp().sum());
    loss += log_sum - logits(i, y[i]);
    correct += best == y[i];
  }
  return {loss / static_cast<double>(logits.rows()), correct / static_cast<double>(logits.rows())};
}

}  // namespace

int main(int argc, char** argv) {
  int epochs = 10;
  std::uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--epochs" || arg == "--seed") && i + 1 < argc) {
      const long value = std::strtol(argv[++i], nullptr, 10);
      if (value <= 0) {
        std::fprintf(stderr, "%s = %s, must be a positive integer\n", arg.c_str(), argv[i]);
        return 2;
      }
      (arg == "--epochs" ? epochs = static_cast<int>(value) : seed = static_cast<std::uint64_t>(value));
    } else {
      std::fprintf(stderr, "usage: %s [--epochs N] [--seed S]\n", argv[0]);
      return 2;
    }
  }

  mixprec::Tensor<float> centres_t({kClasses, kFeatures});
  mixprec::fill_normal(centres_t, 0.0f, 0.5f, seed);
  const Matrix centres = centres_t.matrix();
  Matrix x_train, x_test;
  Eigen::VectorXi y_train, y_test;
  make_data(kTrain, seed + 1, centres, x_train, y_train);
  make_data(kTest, seed + 2, centres, x_test, y_test);

  // The user's buffers: fp16 weights the forward pass reads and the fp16
  // gradient the backward pass writes. mixprec views them, never copies.
  mixprec::Tensor<half> weights({kClasses, kFeatures});
  mixprec::fill_normal(weights, 0.0f, 0.01f, seed + 3);
  mixprec::Tensor<half> grad({kClasses, kFeatures});
  mixprec::Tensor<float> model32({kClasses, kFeatures});  // fp16 weights widened for the matmul

  mixprec::optim::AdamWOptions options;
  options.lr = 0.02;
  mixprec::optim::AdamW optimizer({{"weight", weights, grad}}, options);  // fp32 master + moments
  mixprec::amp::GradScaler scaler;  // dynamic: starts at 2^16, halves on overflow, grows

  std::printf("softmax regression, %d classes x %d features, fp16 weights, AdamW with fp32 "
              "masters, dynamic loss scale\n", kClasses, kFeatures);
  double first_loss = 0, last_loss = 0, accuracy = 0;
  Matrix w32;
  for (int epoch = 0; epoch <= epochs; ++epoch) {
    mixprec::convert(weights, model32);  // the fp16 model is what we evaluate
    w32 = model32.matrix();
    const auto [train_loss, train_acc] = evaluate(x_train * w32.transpose(), y_train);
    const auto [test_loss, test_acc] = evaluate(x_test * w32.transpose(), y_test);
    std::printf("epoch %2d  train loss %.4f  train acc %.3f  test acc %.3f  scale %g  skipped %lld\n",
                epoch, train_loss, train_acc, test_acc, static_cast<double>(scaler.scale()),
                static_cast<long long>(scaler.skipped_steps()));
    if (epoch == 0) first_loss = train_loss;
    last_loss = train_loss;
    accuracy = test_acc;
    (void)test_loss;
    if (epoch == epochs) break;

    for (int begin = 0; begin < kTrain; begin += kBatch) {
      const auto xb = x_train.middleRows(begin, kBatch);
      // Forward with the fp16 weights, softmax in fp32.
      mixprec::convert(weights, model32);
      Matrix probs = xb * model32.matrix().transpose();
      for (Eigen::Index i = 0; i < probs.rows(); ++i) {
        probs.row(i).array() -= probs.row(i).maxCoeff();
        probs.row(i) = probs.row(i).array().exp();
        probs.row(i) /= probs.row(i).sum();
        probs(i, y_train[begin + i]) -= 1.0f;  // d(loss)/d(logits) for cross-entropy
      }
      // Backward from the scaled loss: the gradient is stored in fp16, as a
      // GPU kernel would store it. Small entries that fp16 would flush to
      // zero survive because of the scale; if entries overflow, the scaler
      // skips the step and backs off.
      const Matrix g = (scaler.scale() / kBatch) * probs.transpose() * xb;
      mixprec::convert(mixprec::TensorView<const float>(g.data(), {kClasses, kFeatures}), grad);
      // Check for inf/NaN, unscale inside the update, update the fp32 master
      // and moments, round the master into the fp16 weights; or skip it all.
      scaler.step(optimizer);
      scaler.update();
    }
  }
  std::printf("train loss %.4f -> %.4f, test accuracy %.3f\n", first_loss, last_loss, accuracy);
  // The clusters overlap a little: a trained model gets well above 90%.
  if (!(last_loss < 0.5 * first_loss) || accuracy < 0.9) {
    std::fprintf(stderr, "training failed: the loss did not halve or accuracy < 0.9\n");
    return 1;
  }
  return 0;
}

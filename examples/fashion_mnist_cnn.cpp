// SPDX-License-Identifier: Apache-2.0
// Fashion-MNIST with a small CNN on the GPU (the second convolution through
// cuDNN, the first by mixprec's direct kernels; direct loops on the CPU):
// two blocks of 3x3 convolution (padding 1) with its ReLU fused + 2x2 max
// pooling, then two fully connected layers:
//   [1, 28, 28] -> Conv 32 + ReLU -> Pool -> [32, 14, 14] -> Conv 64 + ReLU -> Pool
//   -> [64, 7, 7] -> Flatten -> Linear 3136-128 + ReLU -> Linear 128-10.
// fp16, bf16 or fp32 with fp32 master weights and dynamic loss scaling; the
// training loop is common/classifier.hpp (shared with fashion_mnist_mlp).
//
//   fashion_mnist_cnn [--precision fp16|bf16|fp32] [--device cpu|cuda] [--epochs N]
//                     [--batch N] [--optimizer sgd|adam|adamw|rmsprop|lion|lamb] [--lr X]
//                     [--schedule constant|cosine] [--seed N] [--data DIR]
//                     [--graph on|off] [--min-accuracy X]
//                     [--monitor on|off] [--monitor-every K] [--monitor-log FILE.jsonl]
//                     [--zero1 on|off] [--report FILE.html]
//                     [--precision-fallback off|suggest|act] [--spike-guard on|off]
//                     [--checkpoint PATH] [--checkpoint-every N] [--resume PATH] [--stop-at-step N]
//
// --help lists every flag with its default. Defaults: fp16, cuda when a
// device is usable (else cpu), 10 epochs, batch 256, AdamW lr 2e-3 with a
// cosine decay over the run, seed 0, data as fashion_mnist_mlp, graph on,
// the monitor on (a logged step every 10 steps). The flags mean what they
// mean for fashion_mnist_mlp (checkpoints, resume and the report included),
// which has no --hidden here (--precision-fallback act moves a Conv2d or
// the Linear, on either device).
// With --device cpu the convolutions are direct loops: correct, and slow
// (a reference, not a CPU backend).
#include "classifier.hpp"

namespace {

using namespace mixprec;

template <class T>
struct Cnn {
  static void add(nn::Sequential<T>& net, const examples::Args& a, Device dev) {
    const std::uint64_t s = a.seed * 4;
    net.template emplace<nn::Conv2d<T>>(1, 32, 3, 1, 1, true, dev, s + 1, nn::Activation::relu);
    net.template emplace<nn::MaxPool2d<T>>(2, 0, dev);
    net.template emplace<nn::Conv2d<T>>(32, 64, 3, 1, 1, true, dev, s + 2, nn::Activation::relu);
    net.template emplace<nn::MaxPool2d<T>>(2, 0, dev);
    net.template emplace<nn::Flatten<T>>(dev);
    net.template emplace<nn::Linear<T>>(3136, 128, nn::Activation::relu, true, dev, s + 3);
    net.template emplace<nn::Linear<T>>(128, 10, nn::Activation::none, true, dev, s + 4);
  }
};

}  // namespace

int main(int argc, char** argv) {
  examples::Args a;
  a.program = "fashion_mnist_cnn";
  a.description = "a CNN (conv32-pool-conv64-pool-128-10) on Fashion-MNIST";
  a.lr = 2e-3;
  if (const int rc = examples::parse(argc, argv, a, /*takes_hidden=*/false); rc >= 0) return rc;
  a.description = "conv32-pool-conv64-pool-128-10";
  return examples::train_classifier<Cnn>(a, {1, 28, 28});
}

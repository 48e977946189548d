#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The Fashion-MNIST MLP trained by PyTorch and by mixprec's example, same run.

Model 784-H-H-10 (ReLU), AdamW lr 1e-3, batch B, the same number of epochs,
the same normalisation; each side shuffles with its own generator.

PyTorch, eager AMP as people write it, at its fastest: the data sets on the
device, a shuffled permutation per epoch, fp32 parameters, AdamW(fused=True),
and either fp16 autocast + torch.amp.GradScaler or bf16 autocast; the loss
is summed on the device (no .item() inside an epoch). mixprec:
examples/fashion_mnist_mlp (data on the device, the step in a CUDA graph).
Throughput: images/s of the training steps only (evaluation excluded), the
median over epochs 2..N (epoch 1 holds warm-up and graph capture); accuracy:
the test set after the last epoch.

    python3 benchmarks/compare_pytorch_mlp.py --example build/examples/fashion_mnist_mlp \
        [--data DIR] [--epochs 10] [--configs 1024:256,4096:1024] [--precisions fp16,bf16]
    python3 benchmarks/compare_pytorch_mlp.py --device cpu ...   # one core each, see --cpu-*
"""
import argparse
import gzip
import os
import re
import statistics
import subprocess
import time

import numpy as np
import torch


def load(data, split):
    with gzip.open(os.path.join(data, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(os.path.join(data, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (images.astype(np.float32) / 255.0 - 0.2860) / 0.3530
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def torch_run(data, device, precision, hidden, batch, epochs, seed):
    torch.manual_seed(seed)
    xtr, ytr = (t.to(device) for t in load(data, "train"))
    xte, yte = (t.to(device) for t in load(data, "t10k"))
    model = torch.nn.Sequential(
        torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10)).to(device)
    cuda = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=cuda)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = xtr.shape[0] // batch
    rates = []
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], device=device)
        loss_sum = torch.zeros((), device=device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach()
        if cuda:
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        correct = sum(int((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum()) for i in range(0, 10000, 1000))
    return rates, correct / 10000


def mixprec_run(example, data, device, precision, hidden, batch, epochs, seed, prefix):
    cmd = prefix + [example, "--device", device, "--precision", precision, "--hidden", str(hidden), "--batch",
                    str(batch), "--epochs", str(epochs), "--seed", str(seed), "--data", data]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rates, accuracy = [], None
    for m in re.finditer(r"epoch\s+\d+ .*?([\d.]+) images/s\s+test accuracy ([\d.]+)", out):
        rates.append(float(m.group(1)))
        accuracy = float(m.group(2))
    if len(rates) != epochs:
        raise SystemExit(f"could not read {epochs} epoch lines from: {' '.join(cmd)}\n{out}")
    return rates, accuracy


def typical(rates):
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--example", default="build/examples/fashion_mnist_mlp")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--configs", default="1024:256,4096:1024", help="hidden:batch,...")
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-core", type=int, default=0, help="--device cpu: the core both sides run on")
    a = p.parse_args()
    prefix = []
    if a.device == "cpu":
        torch.set_num_threads(1)
        os.sched_setaffinity(0, {a.cpu_core})
        prefix = ["taskset", "-c", str(a.cpu_core)]
    print(f"torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU, one core'}; {a.epochs} epochs, AdamW lr 1e-3")
    rows = []
    for config in a.configs.split(","):
        hidden, batch = (int(v) for v in config.split(":"))
        for precision in a.precisions.split(","):
            t_rates, t_acc = torch_run(a.data, a.device, precision, hidden, batch, a.epochs, a.seed)
            m_rates, m_acc = mixprec_run(a.example, a.data, a.device, precision, hidden, batch, a.epochs, a.seed,
                                         prefix)
            t, m = typical(t_rates), typical(m_rates)
            rows.append((hidden, batch, precision, t, t_acc, m, m_acc, m / t))
            print(f"  done: hidden {hidden} batch {batch} {precision}", flush=True)
    label = "torch AMP" if a.device == "cuda" else "torch"
    print(f"\n| hidden | batch | precision | {label} images/s | acc | mixprec images/s | acc | ratio |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for h, b, pr, t, ta, m, ma, r in rows:
        print(f"| {h} | {b} | {pr} | {t:,.0f} | {ta:.4f} | {m:,.0f} | {ma:.4f} | {r:.2f}x |")


if __name__ == "__main__":
    main()

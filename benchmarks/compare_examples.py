#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Two builds of the Fashion-MNIST examples against each other, same machine, same run.

Runs each configuration (the MLP at hidden 1024 / batch 256 and 4096 / 1024,
the CNN at batch 256; fp16 and bf16) with the OLD build's example, the NEW
build's, then each again (alternated, so drift in the machine's state falls
on both), and prints for each side the better of its two runs: the median
images/s of epochs 2..N (epoch 1 holds warm-up and graph capture), and the
test accuracy after the last epoch (the same seed on both sides: equal
accuracies say the two builds trained alike).

    python3 benchmarks/compare_examples.py OLD_BUILD/examples NEW_BUILD/examples --data DIR [--epochs 6] \
        [--models mlp,cnn] [--old-args FLAGS] [--new-args FLAGS]

One build against itself with other flags: the same folder twice, and the
flags of a side in --old-args / --new-args (e.g. --old-args
'--narrow-linear off').
"""
import argparse
import shlex
import statistics
import subprocess

from epoch_lines import parse_epoch_lines

CONFIGS = [("mlp", ["--hidden", "1024", "--batch", "256"]), ("mlp", ["--hidden", "4096", "--batch", "1024"]),
           ("cnn", ["--batch", "256"])]


def run(example, data, epochs, precision, args):
    out = subprocess.run([example, "--data", data, "--epochs", str(epochs), "--precision", precision] + args,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    lines = parse_epoch_lines(out)
    if len(lines) < 2:
        raise SystemExit(f"{example}: no epoch lines in its output:\n{out}")
    return statistics.median(e.images_per_s for e in lines[1:]), lines[-1].accuracy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", help="folder with the old build's fashion_mnist_mlp and fashion_mnist_cnn")
    p.add_argument("new", help="the same for the new build")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--models", default="mlp,cnn", help="which examples: mlp, cnn or both (default)")
    p.add_argument("--old-args", default="", help="more flags for the old side's runs")
    p.add_argument("--new-args", default="", help="more flags for the new side's runs")
    a = p.parse_args()
    models = a.models.split(",")
    if not models or any(m not in ("mlp", "cnn") for m in models):
        p.error(f"--models {a.models}: a list of mlp, cnn")
    if a.epochs < 2:
        p.error(f"--epochs {a.epochs}: at least 2 (epoch 1 is not timed)")
    print(f"{'config':30s} {'old img/s':>11s} {'new img/s':>11s} {'new/old':>8s}  accuracy old / new")
    for model, args in CONFIGS:
        if model not in models:
            continue
        for precision in ("fp16", "bf16"):
            runs = {"old": [], "new": []}
            for side in ("old", "new", "old", "new"):
                folder = a.old if side == "old" else a.new
                extra = shlex.split(a.old_args if side == "old" else a.new_args)
                runs[side].append(run(f"{folder}/fashion_mnist_{model}", a.data, a.epochs, precision, args + extra))
            old = max(runs["old"]); new = max(runs["new"])
            name = f"{model} {' '.join(args[1::2])} {precision}"
            # Accuracy to 4 places, as the examples print it.
            print(f"{name:30s} {old[0]:11,.0f} {new[0]:11,.0f} {new[0] / old[0]:8.3f}  {old[1]:.4f} / {new[1]:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()

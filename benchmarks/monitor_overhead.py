#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""What the instability monitor costs in the Fashion-MNIST examples.

Runs the example with --monitor off and --monitor on (a logged step every
--every steps, a JSONL log written) alternately, --repeats times each, and
compares the images/s of epochs 2.. (epoch 1 includes plans and graph
capture). Step time is 1 / (images/s), so the overhead is
median(off) / median(on) - 1. Prints a table; exits 1 when the overhead is
at or above --limit percent (issues 17 and 19: under 2% at every = 10).

With --step-times the example also writes each step's time (CUDA events
between steps, --step-times FILE.tsv), and a second table places the cost:
the steps of the monitored runs by their distance from the last logged step
(0: the logged step itself), each position's median and mean against the
unmonitored runs' steps, and what an interval of --every steps adds.

    python3 monitor_overhead.py --example ../build/examples/fashion_mnist_mlp --data DIR [--step-times]
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile

from epoch_lines import parse_epoch_lines


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    epochs = [(e.epoch, e.images_per_s, e.accuracy) for e in parse_epoch_lines(out)]
    if not epochs:
        sys.exit("no epoch lines in the output of " + " ".join(cmd) + ":\n" + out)
    return epochs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--example", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--limit", type=float, default=2.0, help="percent")
    p.add_argument("--graph", default="on", choices=["on", "off"])
    p.add_argument("--step-times", action="store_true", help="also time every step (see above)")
    p.add_argument("extra", nargs="*", help="more flags for the example (after --)")
    a = p.parse_args()
    base = [a.example, "--device", "cuda", "--epochs", str(a.epochs), "--graph", a.graph] + a.extra
    if a.data:
        base += ["--data", a.data]
    speeds = {"off": [], "on": []}
    accuracy = {"off": [], "on": []}
    steps = {"off": [], "on": []}  # (position after the last logged step or None, ms)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "monitor.jsonl")
        for r in range(a.repeats):
            for mode in ("off", "on"):
                cmd = base + ["--monitor", mode]
                if mode == "on":
                    cmd += ["--monitor-every", str(a.every), "--monitor-log", log]
                times = os.path.join(tmp, f"steps-{mode}-{r}.tsv")
                if a.step_times:
                    cmd += ["--step-times", times]
                epochs = run(cmd)
                speeds[mode] += [ips for (e, ips, _) in epochs if e >= 2]
                accuracy[mode].append(epochs[-1][2])
                if a.step_times:
                    steps[mode] += read_step_times(times)
        records = sum(1 for _ in open(log)) - 1
    off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
    overhead = 100.0 * (off / on - 1.0)
    print(f"example: {os.path.basename(a.example)} {' '.join(a.extra)}, {a.epochs} epochs x {a.repeats} runs, "
          f"graph {a.graph}, logged step every {a.every} steps ({records} records in the last log)")
    print(f"{'monitor':8} {'median images/s':>16} {'min':>12} {'max':>12} {'accuracy':>9}")
    for mode in ("off", "on"):
        s = speeds[mode]
        print(f"{mode:8} {statistics.median(s):16,.0f} {min(s):12,.0f} {max(s):12,.0f} "
              f"{statistics.median(accuracy[mode]):9.4f}")
    print(f"overhead: {overhead:+.2f}% of step time (limit {a.limit}%)")
    if a.step_times:
        print_step_times(steps, a.every)
    return 0 if overhead < a.limit else 1


def read_step_times(path):
    """The steps of epochs 2.. as (position, ms): position = steps since the
    last logged step (0 for a logged one; carried across epochs, as the
    monitor counts steps), None before the run's first logged step and in
    unmonitored runs."""
    out, since = [], None
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            since = 0 if row["logged"] == "1" else (None if since is None else since + 1)
            if int(row["epoch"]) >= 2:
                out.append((since, float(row["ms"])))
    return out


def print_step_times(steps, every):
    off = [ms for (_, ms) in steps["off"]]
    if not off or not steps["on"]:
        print("step times: none read")
        return
    off_mean, off_median = statistics.fmean(off), statistics.median(off)
    print(f"step times (CUDA events between steps, epochs 2..): unmonitored median {1e3 * off_median:.1f} us, "
          f"mean {1e3 * off_mean:.1f} us ({len(off)} steps)")
    print(f"{'after logged':>12} {'steps':>7} {'median us':>10} {'mean us':>9} {'mean - unmonitored us':>22}")
    added = 0.0
    for pos in range(every):
        ms = [t for (p, t) in steps["on"] if p == pos]
        if not ms:
            print(f"{pos:12d} {0:7d}  (no steps: the interval's figure below leaves this position out)")
            continue
        mean = statistics.fmean(ms)
        added += mean - off_mean
        print(f"{pos:12d} {len(ms):7d} {1e3 * statistics.median(ms):10.1f} {1e3 * mean:9.1f} "
              f"{1e3 * (mean - off_mean):+22.1f}")
    on_all = [t for (_, t) in steps["on"]]
    print(f"an interval of {every} steps adds {1e3 * added:.1f} us ({100 * added / (every * off_mean):+.2f}% of "
          f"{every} unmonitored steps); all monitored steps' mean vs unmonitored: "
          f"{100 * (statistics.fmean(on_all) / off_mean - 1):+.2f}%")


if __name__ == "__main__":
    sys.exit(main())

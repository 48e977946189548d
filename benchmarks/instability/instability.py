#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Scores the instability monitor's warnings (issue 19, part 4).

Runs the Fashion-MNIST examples with induced failures, each until it fails
(or a step cap), with the monitor's JSONL log on, and reads the logs:

* lead: steps from the first warning that points at the failure to the
  failure (the median over the runs is the headline; target >= 5);
* whether --spike-guard on or --precision-fallback act prevented it (the
  same run with that flag did not fail within the same steps);
* on healthy runs (fp16 dynamic, bf16, fp32; both examples; several seeds):
  false alarms (every detector event) per 10,000 steps (target <= 1).

Standard library only. Nothing here is tied to the CPU: --device cuda,
--hidden/--batch/--epochs and the step caps make the GPU run at full size
(the fallback variants run there too: the examples' --precision-fallback act
moves a layer of a device model, its CUDA graphs captured again).

Failure, precisely: the first step at which one of the scenario's criteria
holds (healthy runs: any of them):
  nonfinite_loss   the loss is inf or NaN;
  scale_floor      dynamic scaling and the scale the step used is under 1
                   (the gradients overflow fp16 even unscaled);
  loss_blowup      the mean loss of the last 10 steps is above 2 ln 10
                   (twice a uniform guess's loss over Fashion-MNIST's 10
                   classes), or, after step 50, above 3x the lowest such
                   mean so far;
  underflow        at a logged step, at least 50% of all fp16 gradient
                   elements are lost in fp16 (zero or under 2^-24) and that
                   share rose 0.25 above the run's first logged share (a
                   layer the precision fallback moved leaves the share).
                   Exact zeros of dead ReLU units count too: an fp16
                   histogram cannot tell them from underflow.
Warning: the first event of the scenario's kinds, or the first forecast
that points at it (steps_to_min_scale or steps_to_underflow finite and
under --horizon, or diverging), at or after the step the failure is
induced (an lr jump's step; step 1 otherwise) and not after the failure.

  # the CPU table of docs/monitor.md (small models):
  python3 benchmarks/instability/instability.py --bin-dir BUILD/examples --out OUT --suite all \
      --examples mlp,cnn --cnn-seeds 0,1,2 --cnn-batch 32 --cnn-steps 100 --failure-seeds 0,1,2 \
      --variant-seeds 0 --jobs 2
  # on a GPU at full size:
  python3 benchmarks/instability/instability.py --bin-dir BUILD/examples --out OUT --device cuda \
      --hidden 1024 --batch 256 --epochs 10 --cnn-epochs 5
  python3 benchmarks/instability/instability.py --score-only --out /tmp/instab  # re-read the logs
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BLOWUP_FACTOR = 3.0
BLOWUP_WINDOW = 10
BLOWUP_AFTER = 50
CHANCE_LOSS = math.log(10.0)
UNDERFLOW_SHARE = 0.5
UNDERFLOW_RISE = 0.25

ALL_KINDS = ["nonfinite_loss", "loss_spike", "grad_norm_explosion", "scale_collapse", "underflow",
             "stalled_updates", "repeated_overflow", "moment_lag", "update_jump", "precision_fallback"]

# Each induced failure: the example, its flags, the step it is induced at
# (warnings before it do not count), the event kinds and forecasts that point
# at it, and the step cap.
# window: a warning counts only within this many steps before the failure
# (0: any time after the induction). Scenario (d) trains for thousands of
# steps with loss spikes it recovers from before the one that fails it; a
# warning of an earlier spike is not a forecast of that one.
def scenarios(args):
    lr_jump = args.lr_jump_step
    return [
        dict(name="a_scale_collapse_lr_jump", example="mlp",
             flags=["--precision", "fp16", "--optimizer", "sgd", "--lr", "0.05", "--lr-jump-step", str(lr_jump),
                    "--lr-jump-factor", "30"],
             induced=lr_jump + 1, cap=lr_jump + args.after_cap, fails=["scale_floor"],
             kinds=["scale_collapse", "repeated_overflow", "nonfinite_loss", "loss_spike", "grad_norm_explosion"],
             forecasts=["steps_to_min_scale", "diverging"]),
        dict(name="b_adam_eps_8bit_moments", example="mlp",
             flags=["--precision", "fp16", "--optimizer", "adam", "--lr", "1e-3", "--moments", "8bit",
                    "--eps", "1e-20"],
             induced=1, cap=args.failure_cap, fails=["nonfinite_loss", "loss_blowup"],
             kinds=["moment_lag", "loss_spike", "grad_norm_explosion", "nonfinite_loss", "scale_collapse",
                    "repeated_overflow"],
             forecasts=["diverging", "steps_to_min_scale"]),
        dict(name="c_underflow_static_scale", example="mlp",
             flags=["--precision", "fp16", "--optimizer", "sgd", "--lr", "0.05", "--static-scale", str(args.static_scale)],
             induced=1, cap=args.underflow_cap, fails=["underflow"],
             kinds=["underflow", "stalled_updates"],
             forecasts=["steps_to_underflow"]),
        dict(name="d_adam_lr_too_large", example="mlp",
             flags=["--precision", "fp16", "--optimizer", "adam", "--lr", str(args.adam_lr)],
             induced=1, cap=args.adam_cap, fails=["nonfinite_loss", "loss_blowup", "scale_floor"],
             kinds=["update_jump", "loss_spike", "grad_norm_explosion", "moment_lag", "nonfinite_loss",
                    "scale_collapse", "repeated_overflow"],
             forecasts=["diverging", "steps_to_min_scale"], window=args.adam_window),
    ]


# ---------------------------------------------------------------- reading logs

def read_log(path):
    """The header and the per-step / per-record series of a monitor log."""
    header, steps, logged = None, [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("type") == "header":
                header = r
                continue
            if r.get("type") != "log":
                continue
            s = r["steps"]
            for k in range(len(s["loss"])):
                steps.append(dict(step=s["first"] + k, loss=num(s["loss"][k]), scale=num(s["scale"][k]),
                                  skipped=bool(s["skipped"][k])))
            logged.append(dict(step=r["step"], overall=r.get("overall") or {}, forecast=r.get("forecast") or {},
                               events=r.get("events") or [],
                               shares=[p.get("underflow") for p in r.get("params") or []]))
    if header is None:
        raise ValueError(path + ": no header line")
    return header, steps, logged


def num(x):
    if x is None:
        return math.nan
    if isinstance(x, str):
        return float(x)  # "inf", "nan"
    return float(x)


def failure(header, steps, logged, criteria=None):
    """(step, criterion) of the first failure among `criteria` (all when
    None), or (None, None)."""
    use = lambda c: criteria is None or c in criteria  # noqa: E731
    scaled = header.get("scaling") == "dynamic"
    first = None
    lowest = math.inf
    window = []
    for s in steps:
        if use("nonfinite_loss") and not math.isfinite(s["loss"]):
            first = (s["step"], "nonfinite_loss")
            break
        if use("scale_floor") and scaled and s["scale"] < 1.0:
            first = (s["step"], "scale_floor")
            break
        if not math.isfinite(s["loss"]):
            continue
        window.append(s["loss"])
        if len(window) > BLOWUP_WINDOW:
            window.pop(0)
        if len(window) == BLOWUP_WINDOW:
            m = sum(window) / BLOWUP_WINDOW
            if use("loss_blowup") and (m > 2 * CHANCE_LOSS or (s["step"] > BLOWUP_AFTER and m > BLOWUP_FACTOR * lowest)):
                first = (s["step"], "loss_blowup")
                break
            lowest = min(lowest, m)
    base = None
    params = header.get("params", [])
    fp16 = {i for i, p in enumerate(params) if p.get("dtype") == "float16"}
    for r in logged:
        # A layer the precision fallback moved computes in fp32 from then on:
        # its values under 2^-24 are no longer lost, so it leaves the share.
        for e in r["events"]:
            if e["kind"] == "precision_fallback" and " moved " in e.get("message", ""):
                layer = (e.get("param") or "").rsplit(".", 1)[0] + "."  # "1.weight": layer 1's parameters
                fp16 -= {i for i, p in enumerate(params) if p.get("name", "").startswith(layer)}
        if not fp16 or not use("underflow"):
            continue
        if r["shares"] and len(r["shares"]) == len(params):
            n = sum(params[i]["numel"] for i in fp16)
            u = sum(num(r["shares"][i]) * params[i]["numel"] for i in fp16) / n if n else math.nan
        elif r["overall"].get("underflow") is not None:
            u = num(r["overall"]["underflow"])
        else:
            continue
        if base is None:
            base = u
            continue
        if u >= UNDERFLOW_SHARE and u - base >= UNDERFLOW_RISE:
            if first is None or r["step"] < first[0]:
                first = (r["step"], "underflow")
            break
    return first if first else (None, None)


def warnings(logged, kinds, forecasts, horizon, induced, until):
    """(step, what) of the first warning in [induced, until], or (None, None)."""
    for r in logged:
        for e in r["events"]:
            if e["kind"] in kinds and induced <= e["step"] <= until:
                return e["step"], e["kind"] + (" " + e["param"] if e.get("param") else "")
        step = r["step"]
        if not induced <= step <= until:
            continue
        f = r["forecast"]
        for k in forecasts:
            if k == "diverging" and f.get("diverging"):
                return step, "forecast diverging"
            if k != "diverging":
                v = f.get(k)
                if v is not None and math.isfinite(num(v)) and num(v) < horizon:
                    return step, "forecast %s=%.0f" % (k, num(v))
    return None, None


def events_of(logged):
    return [e for r in logged for e in r["events"]]


# ---------------------------------------------------------------- running

def run_example(args, name, example, flags, cap_steps=None):
    log = os.path.join(args.out, name + ".jsonl")
    out = os.path.join(args.out, name + ".out")
    binary = os.path.join(args.bin_dir, "fashion_mnist_" + example)
    cmd = [binary, "--device", args.device, "--monitor-log", log, "--monitor-every", str(args.every)] + flags
    if cap_steps:
        cmd += ["--stop-at-step", str(cap_steps)]
    if args.nice and args.device == "cpu":
        cmd = ["nice", "-n", "10"] + cmd
    t0 = time.time()
    with open(out, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return dict(name=name, cmd=cmd, rc=rc, seconds=time.time() - t0, log=log)


def size_flags(args, example, seed, epochs):
    batch = args.cnn_batch if example == "cnn" and args.cnn_batch else args.batch
    f = ["--seed", str(seed), "--batch", str(batch), "--epochs", str(epochs)]
    if example == "mlp":
        f += ["--hidden", str(args.hidden)]
    return f


def plan(args):
    jobs = []  # (name, example, flags, cap, meta)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.suite in ("all", "healthy"):
        for example in args.examples.split(","):
            epochs = args.epochs if example == "mlp" else args.cnn_epochs
            for prec in ("fp16", "bf16", "fp32"):
                for seed in (seeds if example == "mlp" else [int(x) for x in args.cnn_seeds.split(",")]):
                    name = "healthy_%s_%s_s%d" % (example, prec, seed)
                    flags = ["--precision", prec] + size_flags(args, example, seed, epochs)
                    jobs.append((name, example, flags, args.cnn_steps if example == "cnn" else None,
                                 dict(kind="healthy", example=example, precision=prec, seed=seed)))
        if args.probe_lr > 0:
            # A healthy fp16 run whose dynamic scale backs off at the start
            # (the scaler's probing): AdamW at a larger lr, wider and larger
            # batches. At the defaults its loss falls and it ends near the
            # other runs' accuracy.
            for seed in seeds:
                name = "healthy_mlp-probe_fp16_s%d" % seed
                flags = ["--precision", "fp16", "--lr", str(args.probe_lr), "--seed", str(seed), "--hidden",
                         str(args.probe_hidden), "--batch", str(args.probe_batch), "--epochs", str(args.probe_epochs)]
                jobs.append((name, "mlp", flags, None,
                             dict(kind="healthy", example="mlp-probe", precision="fp16", seed=seed)))
    if args.suite in ("all", "failures"):
        fseeds = [int(s) for s in args.failure_seeds.split(",")]
        vseeds = [int(s) for s in args.variant_seeds.split(",")] if args.variant_seeds else fseeds
        variants = [("plain", []), ("guard", ["--spike-guard", "on"]), ("fallback", ["--precision-fallback", "act"])]
        for sc in scenarios(args):
            for seed in fseeds:
                for variant, extra in variants:
                    if variant != "plain" and (not args.variants or seed not in vseeds):
                        continue
                    name = "%s_s%d_%s" % (sc["name"], seed, variant)
                    flags = sc["flags"] + ["--schedule", "constant"] + size_flags(args, sc["example"], seed, 100)
                    jobs.append((name, sc["example"], flags + extra, sc["cap"],
                                 dict(kind="failure", scenario=sc["name"], seed=seed, variant=variant)))
    return jobs


# ---------------------------------------------------------------- scoring

def score(args, jobs):
    by_name = {sc["name"]: sc for sc in scenarios(args)}
    healthy, failures = [], []
    for name, example, flags, cap, meta in jobs:
        log = os.path.join(args.out, name + ".jsonl")
        if not os.path.exists(log):
            print("missing log: " + log)
            continue
        header, steps, logged = read_log(log)
        crit = by_name[meta["scenario"]]["fails"] if meta["kind"] == "failure" else None
        fstep, fwhy = failure(header, steps, logged, crit)
        n = steps[-1]["step"] if steps else 0
        if meta["kind"] == "healthy":
            ev = events_of(logged)
            healthy.append(dict(meta, steps=n, events=ev, failed=fstep, failed_why=fwhy))
        else:
            sc = by_name[meta["scenario"]]
            until = fstep if fstep is not None else n
            window = sc.get("window", 0)
            start = max(sc["induced"], until - window) if window and fstep is not None else sc["induced"]
            wstep, wwhat = warnings(logged, sc["kinds"], sc["forecasts"], args.horizon, start, until)
            # With a window: the scenario's events that no failure followed
            # within it (before the window, or in a run that did not fail).
            unconfirmed = [e for e in events_of(logged) if window and e["kind"] in sc["kinds"] and
                           sc["induced"] <= e["step"] and (fstep is None or e["step"] < start)]
            failures.append(dict(meta, steps=n, failed=fstep, failed_why=fwhy, warned=wstep, warned_what=wwhat,
                                 lead=(fstep - wstep) if (fstep is not None and wstep is not None) else None,
                                 events=events_of(logged), window=window, unconfirmed=unconfirmed))
    return healthy, failures


def report(healthy, failures, out):
    lines = []
    if failures:
        lines.append("| scenario | seed | failure (step, criterion) | first warning (step, what) | lead |")
        lines.append("|---|---|---|---|---|")
        for f in failures:
            if f["variant"] != "plain":
                continue
            lines.append("| %s | %d | %s | %s | %s |" % (
                f["scenario"], f["seed"],
                "%s, %s" % (f["failed"], f["failed_why"]) if f["failed"] is not None else "none in %d steps" % f["steps"],
                "%s, %s" % (f["warned"], f["warned_what"]) if f["warned"] is not None else "none",
                f["lead"] if f["lead"] is not None else "-"))
        leads = [f["lead"] for f in failures if f["variant"] == "plain" and f["lead"] is not None]
        failed = [f for f in failures if f["variant"] == "plain" and f["failed"] is not None]
        lines.append("")
        lines.append("median lead: %s steps over %d failed runs (%d warned before failing; target >= 5)" % (
            statistics.median(leads) if leads else "-", len(failed), len(leads)))
        windowed = [f for f in failures if f["variant"] == "plain" and f.get("window")]
        if windowed:
            lines.append("")
            lines.append("| scenario | seed | steps | events of its kinds no failure followed within the window |")
            lines.append("|---|---|---|---|")
            for f in windowed:
                kinds = {}
                for e in f["unconfirmed"]:
                    kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
                lines.append("| %s | %d | %d | %d %s (window %d steps) |" % (
                    f["scenario"], f["seed"], f["steps"], len(f["unconfirmed"]),
                    "(" + ", ".join("%s %d" % kv for kv in sorted(kinds.items())) + ")" if kinds else "",
                    f["window"]))
        variants = [f for f in failures if f["variant"] != "plain"]
        if variants:
            lines.append("")
            lines.append("| scenario | seed | variant | failed? (step, criterion) within the plain run's steps |")
            lines.append("|---|---|---|---|")
            plain = {(f["scenario"], f["seed"]): f for f in failures if f["variant"] == "plain"}
            for f in variants:
                p = plain.get((f["scenario"], f["seed"]))
                cap = p["failed"] if p and p["failed"] is not None else f["steps"]
                prevented = f["failed"] is None and p is not None and p["failed"] is not None
                lines.append("| %s | %d | %s | %s |" % (
                    f["scenario"], f["seed"], f["variant"],
                    ("failed at %s, %s" % (f["failed"], f["failed_why"]) if f["failed"] is not None
                     else "no failure in %d steps%s" % (f["steps"], " (prevented)" if prevented else ""))))
    if healthy:
        lines.append("")
        lines.append("| example | precision | seeds | steps | events (kinds) | per 10,000 steps | failed? |")
        lines.append("|---|---|---|---|---|---|---|")
        groups = {}
        for h in healthy:
            groups.setdefault((h["example"], h["precision"]), []).append(h)
        total_steps = total_events = 0
        for (ex, prec), hs in sorted(groups.items()):
            steps = sum(h["steps"] for h in hs)
            ev = [e for h in hs for e in h["events"]]
            kinds = {}
            for e in ev:
                kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
            total_steps += steps
            total_events += len(ev)
            lines.append("| %s | %s | %s | %d | %d %s | %.2f | %s |" % (
                ex, prec, ",".join(str(h["seed"]) for h in hs), steps, len(ev),
                "(" + ", ".join("%s %d" % kv for kv in sorted(kinds.items())) + ")" if kinds else "",
                1e4 * len(ev) / steps if steps else math.nan,
                ", ".join("s%d: %s at %s" % (h["seed"], h["failed_why"], h["failed"]) for h in hs if h["failed"])
                or "no"))
        lines.append("")
        lines.append("false alarms: %d events in %d healthy steps = %.2f per 10,000 (target <= 1)" % (
            total_events, total_steps, 1e4 * total_events / total_steps if total_steps else math.nan))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(healthy=healthy, failures=failures), f, indent=1, default=str)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default="build/examples", help="folder with fashion_mnist_mlp and fashion_mnist_cnn")
    p.add_argument("--out", required=True, help="folder for the logs, report.md and results.json")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--suite", default="all", choices=["all", "healthy", "failures"])
    p.add_argument("--seeds", default="0,1,2", help="healthy runs' seeds")
    p.add_argument("--failure-seeds", default="0,1,2")
    p.add_argument("--hidden", type=int, default=128, help="the MLP's width (1024 at full size)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="healthy MLP runs' epochs")
    p.add_argument("--cnn-epochs", type=int, default=1, help="healthy CNN runs' epochs")
    p.add_argument("--cnn-seeds", default="0,1,2")
    p.add_argument("--cnn-batch", type=int, default=0, help="the CNN's batch (0: --batch)")
    p.add_argument("--cnn-steps", type=int, default=0, help="stop healthy CNN runs after this step (0: --cnn-epochs)")
    p.add_argument("--examples", default="mlp,cnn", help="healthy runs of these examples")
    p.add_argument("--probe-lr", type=float, default=1e-2, help="the probing healthy run's AdamW lr (0: none)")
    p.add_argument("--probe-hidden", type=int, default=256)
    p.add_argument("--probe-batch", type=int, default=256)
    p.add_argument("--probe-epochs", type=int, default=2)
    p.add_argument("--static-scale", type=float, default=1e-4, help="scenario (c)'s static loss scale")
    p.add_argument("--adam-lr", type=float, default=0.02,
                   help="scenario (d)'s Adam lr: at 0.02 the small MLP trains (loss ~0.43) with loss spikes it "
                        "mostly recovers from; 0.022 and up blow up in the first 10 steps (Adam's first step moves "
                        "every weight by lr) and recover, 0.01 and under have no spikes in 3000 steps")
    p.add_argument("--adam-cap", type=int, default=4000, help="scenario (d) stops here")
    p.add_argument("--adam-window", type=int, default=100,
                   help="scenario (d): a warning counts only within this many steps before the failure")
    p.add_argument("--every", type=int, default=10, help="--monitor-every")
    p.add_argument("--lr-jump-step", type=int, default=200, help="scenario (a): the lr jumps after this step")
    p.add_argument("--failure-cap", type=int, default=400, help="scenario (b) stops here")
    p.add_argument("--after-cap", type=int, default=100, help="scenario (a) stops this many steps after the jump")
    p.add_argument("--underflow-cap", type=int, default=1200, help="scenario (c) stops here")
    p.add_argument("--variant-seeds", default="", help="seeds of the guard / fallback variants (default: all)")
    p.add_argument("--horizon", type=float, default=1000, help="a forecast under this many steps is a warning")
    p.add_argument("--variants", type=int, default=1, help="1: also run each failure with the guard / fallback")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--nice", type=int, default=1)
    p.add_argument("--score-only", action="store_true", help="read the logs in --out, run nothing")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    jobs = plan(args)
    if not args.score_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_example, args, name, ex, flags, cap) for name, ex, flags, cap, _ in jobs]
            for fu in futures:
                r = fu.result()
                print("%-48s rc=%d %6.1fs" % (r["name"], r["rc"], r["seconds"]), flush=True)
    healthy, failures = score(args, jobs)
    print(report(healthy, failures, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

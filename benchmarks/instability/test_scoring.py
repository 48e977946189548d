#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Tests instability.py's log scoring on small synthetic monitor logs:
each failure criterion at its step, the first warning that points at the
failure (kinds, forecasts, the induction step), the lead, and the healthy
runs' false-alarm count. Quick (no example is run); ctest label cpu."""

import json
import math
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import instability as ins  # noqa: E402


def write_log(path, losses, scales, every=10, scaling="dynamic", events=(), forecasts=None, underflow=None):
    """A log in the monitor's JSONL format: losses/scales per step (1-based),
    events as (step, kind), forecasts {record step: dict}, underflow
    {record step: overall share}."""
    n = len(losses)
    with open(path, "w") as f:
        f.write(json.dumps({"type": "header", "schema": "mixprec.monitor/1", "scaling": scaling, "every": every,
                            "params": [{"name": "fc1.weight", "numel": 100, "dtype": "float16"}]}) + "\n")
        for end in range(every, n + every, every):
            end = min(end, n)
            first = end - (end - 1) % every
            rng = range(first, end + 1)
            rec = {"type": "log", "step": end,
                   "steps": {"first": first, "loss": [losses[s - 1] if math.isfinite(losses[s - 1]) else "inf"
                                                      for s in rng],
                             "scale": [scales[s - 1] for s in rng], "skipped": [0 for _ in rng],
                             "grad_norm": [1.0 for _ in rng], "nonfinite_params": [[] for _ in rng]},
                   "overall": {"underflow": (underflow or {}).get(end, 0.1)},
                   "forecast": (forecasts or {}).get(end, {"steps_to_min_scale": None, "steps_to_underflow": None,
                                                           "loss_slope": None, "diverging": False}),
                   "events": [{"kind": k, "step": s, "param": None} for s, k in events if first <= s <= end]}
            f.write(json.dumps(rec) + "\n")


class Scoring(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "run.jsonl")

    def tearDown(self):
        self.dir.cleanup()

    def read(self):
        return ins.read_log(self.path)

    def test_nonfinite_loss_is_a_failure_at_its_step(self):
        losses = [1.0] * 100
        losses[72] = math.inf  # step 73
        write_log(self.path, losses, [1024.0] * 100)
        self.assertEqual(ins.failure(*self.read()), (73, "nonfinite_loss"))

    def test_a_scale_under_one_is_a_failure(self):
        scales = [1024.0] * 40 + [2.0 ** -k for k in range(0, 60)]
        write_log(self.path, [1.0] * 100, scales)
        self.assertEqual(ins.failure(*self.read()), (42, "scale_floor"))  # 2^-1 at step 42

    def test_the_scale_floor_ignores_unscaled_runs(self):
        write_log(self.path, [1.0] * 100, [0.5] * 100, scaling="disabled")
        self.assertEqual(ins.failure(*self.read()), (None, None))

    def test_a_loss_three_times_its_lowest_mean_is_a_failure(self):
        # 1.0 until step 80, then 5.0: the 10-step mean passes 3.0 when 6 of
        # the 10 are 5.0 (mean 3.4; 5 of them give 3.0, not above): step 86.
        losses = [1.0] * 80 + [5.0] * 20
        write_log(self.path, losses, [1024.0] * 100)
        self.assertEqual(ins.failure(*self.read()), (86, "loss_blowup"))

    def test_a_falling_or_noisy_loss_is_no_failure(self):
        losses = [2.3 * math.exp(-s / 50) + 0.3 + (0.2 if s % 7 == 0 else 0) for s in range(1, 301)]
        write_log(self.path, losses, [1024.0] * 300)
        self.assertEqual(ins.failure(*self.read()), (None, None))

    def test_underflow_needs_the_share_and_its_rise(self):
        write_log(self.path, [1.0] * 100, [1.0] * 100, scaling="static",
                  underflow={10: 0.3, 20: 0.45, 30: 0.52, 40: 0.54, 50: 0.7})
        self.assertEqual(ins.failure(*self.read()), (50, "underflow"))  # at 30 and 40 the rise is under 0.25

    def test_a_layer_moved_to_fp32_leaves_the_underflow_share(self):
        # Two layers of 100 elements each; layer 0's share is 0.9 throughout,
        # layer 1's 0.1. Their mean, 0.5, would fail at step 20 (rise from
        # 0.2 at step 10); once layer 0 moved (step 10) only layer 1 counts.
        params = [{"name": "0.weight", "numel": 100, "dtype": "float16"},
                  {"name": "1.weight", "numel": 100, "dtype": "float16"}]
        recs = [{"type": "header", "scaling": "static", "every": 10, "params": params}]
        for end, shares, events in ((10, [0.3, 0.1], [{"kind": "precision_fallback", "step": 10, "param": "0.weight",
                                                       "message": "layer 0 (Linear) moved from float16 to float32"}]),
                                    (20, [0.9, 0.1], []), (30, [0.9, 0.1], [])):
            recs.append({"type": "log", "step": end,
                         "steps": {"first": end - 9, "loss": [1.0] * 10, "scale": [1.0] * 10, "skipped": [0] * 10,
                                   "grad_norm": [1.0] * 10, "nonfinite_params": [[]] * 10},
                         "params": [{"underflow": u} for u in shares], "overall": {"underflow": sum(shares) / 2},
                         "forecast": {}, "events": events})
        with open(self.path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in recs) + "\n")
        self.assertEqual(ins.failure(*self.read()), (None, None))
        recs[1]["events"] = []  # not moved: the mean of 0.9 and 0.1 rose from 0.2 to 0.5
        with open(self.path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in recs) + "\n")
        self.assertEqual(ins.failure(*self.read()), (20, "underflow"))

    def test_the_first_warning_of_the_right_kind_after_the_induction(self):
        scales = [1024.0] * 100
        write_log(self.path, [1.0] * 100, scales,
                  events=[(15, "stalled_updates"), (30, "loss_spike"), (55, "scale_collapse"), (60, "loss_spike")],
                  forecasts={50: {"steps_to_min_scale": 40, "diverging": False}})
        _, _, logged = self.read()
        kinds = ["scale_collapse", "loss_spike"]
        # loss_spike at 30 is before the induction at 40; the forecast at 50
        # (40 steps, under the horizon) comes first after it.
        self.assertEqual(ins.warnings(logged, kinds, ["steps_to_min_scale"], 1000, 40, 90),
                         (50, "forecast steps_to_min_scale=40"))
        self.assertEqual(ins.warnings(logged, kinds, [], 1000, 40, 90), (55, "scale_collapse"))
        self.assertEqual(ins.warnings(logged, kinds, ["steps_to_min_scale"], 30, 40, 90), (55, "scale_collapse"))
        self.assertEqual(ins.warnings(logged, kinds, [], 1000, 40, 54), (None, None))  # failed at 54
        self.assertEqual(ins.warnings(logged, ["stalled_updates"], [], 1000, 1, 90), (15, "stalled_updates"))

    def test_leads_and_false_alarms_in_the_report(self):
        out = self.dir.name
        opts = ["--out", out, "--seeds", "0", "--failure-seeds", "0", "--variants", "0", "--score-only",
                "--lr-jump-step", "40"]
        # Healthy: 2 events in 200 steps of mlp fp16 (others missing logs are reported, not counted).
        write_log(os.path.join(out, "healthy_mlp_fp16_s0.jsonl"), [1.0] * 200, [1024.0] * 200,
                  events=[(20, "loss_spike"), (150, "scale_collapse")])
        # (a): induced at 41 (the event at 30 does not count), warned at 45
        # (scale_collapse), failed at 56 (2^-1): lead 11.
        scales = [1024.0] * 44 + [2.0 ** (10 - k) for k in range(0, 56)]
        write_log(os.path.join(out, "a_scale_collapse_lr_jump_s0_plain.jsonl"), [1.0] * 100, scales,
                  events=[(30, "scale_collapse"), (45, "scale_collapse")])
        ins.main(opts)
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
        (h,) = res["healthy"]
        self.assertEqual((h["steps"], len(h["events"])), (200, 2))
        (a,) = res["failures"]
        self.assertEqual((a["failed"], a["failed_why"], a["warned"], a["lead"]), (56, "scale_floor", 45, 11))
        with open(os.path.join(out, "report.md")) as f:
            text = f.read()
        self.assertIn("median lead: 11 steps over 1 failed runs", text)
        self.assertIn("false alarms: 2 events in 200 healthy steps = 100.00 per 10,000", text)

    def test_a_windowed_scenario_counts_only_warnings_just_before_its_failure(self):
        out = self.dir.name
        opts = ["--out", out, "--seeds", "0", "--failure-seeds", "0", "--variants", "0", "--score-only",
                "--suite", "failures", "--adam-window", "100"]
        # (d): spikes it recovers from (events at 120 and 700), then the
        # update_jump at 970 and the failure at 1006 (1.0 until step 1000,
        # then 5.0: the 10-step mean passes 3x its lowest at step 1006).
        losses = [1.0] * 1000 + [5.0] * 20
        write_log(os.path.join(out, "d_adam_lr_too_large_s0_plain.jsonl"), losses, [1024.0] * 1020,
                  events=[(120, "loss_spike"), (700, "update_jump"), (970, "update_jump"), (1003, "loss_spike")])
        ins.main(opts)
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
        (d,) = res["failures"]
        self.assertEqual((d["failed"], d["warned"], d["warned_what"], d["lead"]), (1006, 970, "update_jump", 36))
        self.assertEqual([e["step"] for e in d["unconfirmed"]], [120, 700])
        with open(os.path.join(out, "report.md")) as f:
            text = f.read()
        self.assertIn("| d_adam_lr_too_large | 0 | 1020 | 2 (loss_spike 1, update_jump 1) (window 100 steps) |", text)


if __name__ == "__main__":
    unittest.main()

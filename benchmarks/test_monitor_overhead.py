#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Tests monitor_overhead.py's step-time figures (step_time_summary) on
made-up step times, each figure worked out by hand below. Quick; ctest
label cpu."""

import contextlib
import io
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import monitor_overhead as mo  # noqa: E402


def interval(logged_ms, other_ms, every=4):
    """One interval of a monitored run: the logged step, then every - 1 others."""
    return [(0, logged_ms)] + [(p, other_ms) for p in range(1, every)]


class StepTimeSummary(unittest.TestCase):
    def test_figures(self):
        # Unmonitored: 0.100 and 0.102 ms -> mean 101 us, median 101 us.
        # Monitored (every = 4): two intervals whose unlogged steps sit 2 us
        # below the unmonitored process's (0.099 ms), logged steps 0.129 and
        # 0.131 ms, and one step before the first logged one (position None).
        steps = {"off": [(None, 0.100), (None, 0.102)],
                 "on": [(None, 0.5)] + interval(0.129, 0.099) + interval(0.131, 0.099)}
        t = mo.step_time_summary(steps, 4)
        self.assertAlmostEqual(t["off_mean"], 101.0)
        self.assertAlmostEqual(t["off_median"], 101.0)
        self.assertEqual(t["off_count"], 2)
        # Position 0: two steps, mean 130; positions 1-3: two steps each, 99.
        self.assertEqual([(p, n) for (p, n, _, _) in t["positions"]], [(0, 2), (1, 2), (2, 2), (3, 2)])
        self.assertAlmostEqual(t["positions"][0][3], 130.0)
        self.assertAlmostEqual(t["positions"][2][2], 99.0)
        # Against the other process: 29 + 3 x (-2) = 23 us an interval.
        self.assertAlmostEqual(t["added"], 23.0)
        # Within the monitored runs: 130 - 99 = 31 us over 4 x 99 us.
        self.assertAlmostEqual(t["within"], 31.0)
        self.assertAlmostEqual(t["within_pct"], 100 * 31.0 / 396.0)
        # All monitored steps (the unpositioned one too): mean of 0.5 ms and
        # the eight above, (500 + 260 + 6 x 99) / 9 = 150.444.. us.
        self.assertAlmostEqual(t["on_vs_off_pct"], 100 * ((500 + 260 + 6 * 99) / 9 / 101.0 - 1))

    def test_every_step_logged_has_no_within_figure(self):
        steps = {"off": [(None, 0.1)], "on": [(0, 0.12), (0, 0.13)]}
        t = mo.step_time_summary(steps, 1)
        self.assertIsNone(t["within"])
        self.assertIsNone(t["within_pct"])
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertIsNone(mo.print_step_times(steps, 1))

    def test_a_missing_side_gives_none(self):
        self.assertIsNone(mo.step_time_summary({"off": [], "on": [(0, 0.1)]}, 10))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertIsNone(mo.print_step_times({"off": [(None, 0.1)], "on": []}, 10))
        self.assertIn("none read", out.getvalue())

    def test_printed_table_keeps_position_order(self):
        # Position 2 has no steps: its line comes between 1 and 3.
        steps = {"off": [(None, 0.1)], "on": [(0, 0.13), (1, 0.1), (3, 0.1)]}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            within = mo.print_step_times(steps, 4)
        lines = [l.split()[0] for l in out.getvalue().splitlines() if l.strip()[:1].isdigit()]
        self.assertEqual(lines, ["0", "1", "2", "3"])
        self.assertAlmostEqual(within, 100 * 30.0 / 400.0)


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Tests multi_gpu_summary.py on made-up logs of benchmarks/multi_gpu_run.sh:
the medians, scaling efficiency, memory rise, NCCL rows and the ratio to
DDP, each worked out by hand from the logs below. Quick; ctest label cpu."""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multi_gpu_summary as summary  # noqa: E402

EPOCH = "epoch {:2d}  loss 0.5000  scale 65536     skipped {:3d}  {:8.0f} images/s  test accuracy {:.4f}\n"
# Google Benchmark's CSV of a run with --benchmark_repetitions=5 and
# aggregates only (bench_reduce's defaults): mean, median, stddev and cv rows.
NCCL_ROWS = {1 << 20: (104.0, 104.5), 1 << 28: (350.0, 357.9)}
NCCL_CSV = ('name,iterations,real_time,cpu_time,time_unit,bytes_per_second,items_per_second,label,error_occurred,'
            'error_message,"algbw_GBps","busbw_GBps","params","ranks"\n' + "".join(
                f'"BM_nccl_allreduce/{n}/iterations:10/manual_time_mean",5,0.02,0.03,ms,,,,,,{mean},{mean},{n:g},2\n'
                f'"BM_nccl_allreduce/{n}/iterations:10/manual_time_median",5,0.02,0.03,ms,,,,,,{med},{med},{n:g},2\n'
                f'"BM_nccl_allreduce/{n}/iterations:10/manual_time_stddev",5,0.001,0.001,ms,,,,,,0.5,0.5,0,0\n'
                f'"BM_nccl_allreduce/{n}/iterations:10/manual_time_cv",5,0.01,0.01,ms,,,,,,0.01,-nan,0,0\n'
                for n, (mean, med) in NCCL_ROWS.items()))


class Summary(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        d = self.out = self.tmp.name

        def write(name, text):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)

        write("stages.txt", "build\tok\nmlp_fp16_zero1-off_1\tok\nmlp_fp16_zero1-off_2\tok\n"
                            "consistency_2\tFAIL (exit 1, consistency_2.log)\n")
        write("gpus.txt", "GPU 0: made up\nGPU 1: made up\n")
        # 1 GPU: epochs 2..4 at 900k, 1.0M, 1.1M (median 1.0M); epoch 1 (slow) left out.
        write("mlp_fp16_zero1-off_1.log", "banner\n" + EPOCH.format(1, 0, 10, 0.8) + EPOCH.format(2, 1, 900000, 0.85)
              + EPOCH.format(3, 0, 1100000, 0.86) + EPOCH.format(4, 0, 1000000, 0.87))
        # 2 GPUs: median of 1.8M and 1.9M = 1.85M: efficiency 1.85 / (2 x 1.0) = 92.5%.
        write("mlp_fp16_zero1-off_2.log", EPOCH.format(1, 0, 5, 0.8) + EPOCH.format(2, 0, 1800000, 0.85)
              + EPOCH.format(3, 2, 1900000, 0.8712))
        # Idle 500 and 480 MiB before the run; samples up to 3,000 and 3,620:
        # the rise is 3,140 (GPU 1).
        write("mlp_fp16_zero1-off_1.mem", "idle, 0, 500\nidle, 1, 480\n0, 520\n1, 500\n0, 3000\n1, 3620\n"
                                          "not a sample\n")
        # Without idle lines: the smallest of a GPU's first five samples (900), so 2,000 - 900.
        write("ddp_fp16_graph_2.mem", "0, 1000\n0, 900\n0, 950\n0, 1200\n0, 1500\n0, 2000\n")
        write("nccl_2.csv", NCCL_CSV)
        write("ddp_fp16_eager_2.json", json.dumps({"results": {"eager": {"images_per_s": 500000,
                                                                         "test_accuracy": 0.87}}}))
        write("ddp_fp16_graph_2.json", json.dumps({"results": {"graph": {"images_per_s": 740000,
                                                                         "test_accuracy": 0.8705}}}))

    def tearDown(self):
        self.tmp.cleanup()

    def test_example_figures(self):
        one = summary.example(self.out, "mlp_fp16_zero1-off_1")
        self.assertEqual(one["ips"], 1000000)
        self.assertEqual(one["accuracy"], 0.87)
        self.assertEqual(one["skipped"], 1)
        two = summary.example(self.out, "mlp_fp16_zero1-off_2")
        self.assertEqual(two["ips"], 1850000)
        self.assertEqual(two["skipped"], 2)
        self.assertIsNone(two["mib"])  # no samples
        self.assertIsNone(summary.example(self.out, "cnn_bf16_zero1-on_8"))  # no log

    def test_memory_rise(self):
        self.assertEqual(summary.peak_mib(os.path.join(self.out, "mlp_fp16_zero1-off_1.mem")), 3620 - 480)
        self.assertEqual(summary.peak_mib(os.path.join(self.out, "ddp_fp16_graph_2.mem")), 2000 - 900)
        self.assertIsNone(summary.peak_mib(os.path.join(self.out, "none.mem")))

    def test_nccl_rows(self):
        # The median rows only (not the mean, stddev or cv ones).
        self.assertEqual(summary.nccl(self.out, 2), [(1 << 20, 104.5, 104.5), (1 << 28, 357.9, 357.9)])
        self.assertEqual(summary.nccl(self.out, 4), [])

    def test_tables(self):
        sys.argv = ["multi_gpu_summary.py", self.out]
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            summary.main()
        t = text.getvalue()
        self.assertIn("| mlp | fp16 | off | 1 | 1,000,000 | 100.0% | 0.8700 | 1 | 3,140 |", t)
        self.assertIn("| mlp | fp16 | off | 2 | 1,850,000 | 92.5% | 0.8712 | 2 | - |", t)
        self.assertIn("| 2 | 268,435,456 | 512 | 357.9 | 357.9 |", t)
        self.assertEqual(t.count("| 2 | 1,048,576 |"), 1)
        # 1.85M against DDP's better mode (graphed, 740k): 2.50.
        self.assertIn("| fp16 | 2 | 500,000 | 740,000 | 0.8700 / 0.8705 | - / 1,100 | 1,850,000 | - | 2.50 |", t)
        self.assertIn("| consistency_2 | FAIL (exit 1, consistency_2.log) |", t)


if __name__ == "__main__":
    unittest.main()

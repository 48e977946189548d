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
NCCL_CSV = ('name,iterations,real_time,cpu_time,time_unit,bytes_per_second,items_per_second,label,error_occurred,'
            'error_message,"algbw_GBps","busbw_GBps","params","ranks"\n'
            '"BM_nccl_allreduce/1048576/iterations:10/manual_time",10,0.02,0.03,ms,,,,,,104.5,104.5,1.04858e+06,2\n'
            '"BM_nccl_allreduce/268435456/iterations:10/manual_time",10,1.5,1.6,ms,,,,,,357.9,357.9,2.68435e+08,2\n')


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
        # Idle 500 MiB in the first five samples (GPU 1: 500 once, then 510),
        # then 3,000 and 3,620: the rise is 3,120 (GPU 1).
        idle = "".join(f"0, 500\n1, {510 - (i == 0) * 10}\n" for i in range(5))
        write("mlp_fp16_zero1-off_1.mem", idle + "0, 3000\n1, 3620\nnot a sample\n")
        write("nccl_2.txt", "a line before the CSV\n" + NCCL_CSV)
        write("ddp_fp16_2.json", json.dumps({"results": {"eager": {"images_per_s": 500000, "test_accuracy": 0.87},
                                                         "graph": {"images_per_s": 740000, "test_accuracy": 0.8705}}}))

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
        # GPU 1's baseline is its smallest of the first five samples (500), so 3620 - 500.
        self.assertEqual(summary.peak_mib(os.path.join(self.out, "mlp_fp16_zero1-off_1.mem")), 3120)

    def test_nccl_rows(self):
        self.assertEqual(summary.nccl(self.out, 2), [(1 << 20, 104.5, 104.5), (1 << 28, 357.9, 357.9)])
        self.assertEqual(summary.nccl(self.out, 4), [])

    def test_tables(self):
        sys.argv = ["multi_gpu_summary.py", self.out]
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            summary.main()
        t = text.getvalue()
        self.assertIn("| mlp | fp16 | off | 1 | 1,000,000 | 100.0% | 0.8700 | 1 | 3,120 |", t)
        self.assertIn("| mlp | fp16 | off | 2 | 1,850,000 | 92.5% | 0.8712 | 2 | - |", t)
        self.assertIn("| 2 | 268,435,456 | 512 | 357.9 | 357.9 |", t)
        # 1.85M against DDP's better mode (graphed, 740k): 2.50.
        self.assertIn("| fp16 | 2 | 500,000 | 740,000 | 0.8705 | - | 1,850,000 | 2.50 |", t)
        self.assertIn("| consistency_2 | FAIL (exit 1, consistency_2.log) |", t)


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""safetensors interoperability between mixprec and Python.

    safetensors_interop.py check-mixprec WRITER DIR
        Makes values here (seeded), has mixprec's WRITER program
        (safetensors_interop_write) save them as F16, BF16, F32 and I64
        tensors with metadata, then reads the file back with this script's
        own parser and numpy, with PyTorch, and with the safetensors package
        where it is installed, and checks names, dtypes, shapes, metadata and
        every element's bits.
    safetensors_interop.py check-checkpoint WRITER DIR
        Has mixprec's WRITER program (checkpoint_interop_write) train a small
        model and save a checkpoint, then checks its tensors' names, dtypes,
        shapes and values (against invariants of the training state) with
        the own parser and numpy, and loads its model weights into a
        PyTorch module.
    safetensors_interop.py write-torch DIR
        Saves PyTorch tensors to DIR/torch.safetensors (safetensors.torch.
        save_file where installed, else this script's own writer from the
        tensors' bytes) and their expected bits and values to
        DIR/torch_expected.json, for the C++ test safetensors_interop_test.

No mixprec code runs in here: the parser and the writer below follow the
format description (8-byte little-endian header length, JSON header, data).
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np

NUMPY = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8",
         "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?", "BF16": "<u2"}
BITS = {"F16": "<u2", "BF16": "<u2", "F32": "<u4", "F64": "<u8", "I64": "<u8", "I32": "<u4", "U8": "u1",
        "BOOL": "u1"}


def parse(path):
    """Own reader: (header length, metadata, {name: (dtype, shape, raw bytes)})."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors, pos = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = e["data_offsets"]
        assert begin == pos, f"{name}: begins at {begin}, previous ended at {pos}"
        count = int(np.prod(e["shape"], dtype=np.int64))
        assert end - begin == count * np.dtype(NUMPY[e["dtype"]]).itemsize, f"{name}: size"
        tensors[name] = (e["dtype"], e["shape"], data[begin:end])
        pos = end
    assert pos == len(data), f"data section {len(data)} bytes, tensors cover {pos}"
    return n, metadata, tensors


def bf16_bits(values):
    """The bfloat16 bits of float32-exact values that bfloat16 holds exactly."""
    u32 = np.asarray(values, dtype=np.float32).view(np.uint32)
    assert not (u32 & 0xFFFF).any(), "a value is not exact in bfloat16"
    return (u32 >> 16).astype(np.uint16)


def make_spec(rng):
    """Values exact in their dtype, so no rounding decides the outcome."""
    f16 = np.concatenate([rng.integers(-2048, 2049, 60) / 64.0,
                          [65504.0, -65504.0, 2.0 ** -24, -0.0, 0.0, 2.0 ** -14]])
    bf16 = np.concatenate([rng.integers(-255, 256, 40) / 8.0, [2.0 ** 100, -2.0 ** -120, -0.0, 1.5 * 2.0 ** 127]])
    f32 = np.concatenate([rng.standard_normal(45).astype(np.float32), np.float32([3.4e38, 1e-45, -0.0, 1.0])])
    i64 = np.concatenate([rng.integers(-2 ** 62, 2 ** 62, 10), [-2 ** 63, 2 ** 63 - 1, 0, -1]])
    return {
        "metadata": {"format": "pt", "written_by": "mixprec", "step": "1200", "note \u00e9\u20ac": "\u2713"},
        "tensors": [
            {"name": "layer.0.weight", "dtype": "F16", "shape": [6, 11], "values": [float(x) for x in f16]},
            {"name": "layer.0.bias", "dtype": "BF16", "shape": [4, 11], "values": [float(x) for x in bf16]},
            {"name": "master.weight", "dtype": "F32", "shape": [7, 7], "values": [float(x) for x in f32]},
            {"name": "step_counts", "dtype": "I64", "shape": [2, 7], "values": [int(x) for x in i64]},
        ],
    }


def expected_bits(t):
    v = t["values"]
    if t["dtype"] == "F16":
        return np.asarray(v, dtype=np.float16).view(np.uint16)
    if t["dtype"] == "BF16":
        return bf16_bits(v)
    if t["dtype"] == "F32":
        return np.asarray(v, dtype=np.float32).view(np.uint32)
    return np.asarray(v, dtype=np.int64).view(np.uint64)


def check_mixprec(writer, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    spec = make_spec(np.random.default_rng(20240611))
    spec_path = os.path.join(out_dir, "mixprec_spec.json")
    st_path = os.path.join(out_dir, "mixprec.safetensors")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    subprocess.run([writer, spec_path, st_path], check=True)

    # 1. Own parser + numpy.
    n, metadata, tensors = parse(st_path)
    assert n % 8 == 0, f"header length {n} is not a multiple of 8"
    assert metadata == spec["metadata"], metadata
    assert set(tensors) == {t["name"] for t in spec["tensors"]}, sorted(tensors)
    for t in spec["tensors"]:
        dtype, shape, raw = tensors[t["name"]]
        assert dtype == t["dtype"] and shape == t["shape"], (t["name"], dtype, shape)
        got = np.frombuffer(raw, dtype=BITS[dtype])
        want = expected_bits(t)
        assert np.array_equal(got, want), f"{t['name']}: bits differ at {np.nonzero(got != want)[0][:5]}"
        if dtype == "F16":  # and as numbers, through numpy's own float16
            assert np.array_equal(np.frombuffer(raw, "<f2").astype(np.float64), np.asarray(t["values"]))
    print(f"own parser + numpy: {len(tensors)} tensors, metadata and every bit match")

    # 2. PyTorch, from the same bytes.
    try:
        import torch
    except ImportError as e:
        print(f"skip PyTorch: cannot import torch ({e})")
        torch = None
    if torch is not None:
        tdtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}
        for t in spec["tensors"]:
            dtype, shape, raw = tensors[t["name"]]
            got = torch.frombuffer(bytearray(raw), dtype=tdtype[dtype]).reshape(shape)
            want = torch.tensor(t["values"], dtype=torch.float64 if dtype != "I64" else torch.int64)
            want = want.to(tdtype[dtype]).reshape(shape)
            assert torch.equal(got, want), t["name"]
            # -0.0 == 0.0 for torch.equal: compare the signs too.
            if dtype != "I64":
                assert torch.equal(torch.signbit(got), torch.signbit(want)), t["name"]
        print(f"PyTorch {torch.__version__}: every tensor equal")

    # 3. The safetensors package, where installed.
    try:
        from safetensors import safe_open
    except ImportError as e:
        print(f"skip the safetensors package: cannot import it ({e})")
    else:
        with safe_open(st_path, framework="np") as f:
            assert f.metadata() == spec["metadata"], f.metadata()
            for t in spec["tensors"]:
                if t["dtype"] == "BF16":
                    continue  # numpy has no bfloat16
                arr = f.get_tensor(t["name"])
                assert list(arr.shape) == t["shape"], t["name"]
                assert np.array_equal(arr.reshape(-1).view(BITS[t["dtype"]]), expected_bits(t)), t["name"]
        print("safetensors package: metadata and tensors equal")
    return 0


def own_write(path, tensors, metadata):
    """Own writer: tensors {name: (dtype, shape, bytes)}, header padded to 8."""
    header = {"__metadata__": metadata}
    data = b""
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def write_torch(out_dir):
    import torch  # required here: the point is PyTorch's bytes

    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0])
    tensors = {
        "model.fc1.weight": torch.cat([torch.randn(95, generator=g), special]).to(torch.float16).reshape(10, 10),
        "model.fc1.bias": torch.cat([torch.randn(43, generator=g) * 1e4, special]).to(torch.bfloat16).reshape(4, 12),
        "master.fc1.weight": torch.cat([torch.randn(59, generator=g), special, torch.tensor([1e-40])]).reshape(5, 13),
        "optimizer.step": torch.randint(-2 ** 62, 2 ** 62, (3, 5), generator=g, dtype=torch.int64),
        "optimizer.exp_avg_sq": torch.rand(17, generator=g, dtype=torch.float64),
        "scaler.growth_tracker": torch.tensor(7, dtype=torch.int32),
        "mask": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    metadata = {"format": "pt", "written_by": "torch " + torch.__version__, "epoch": "3"}
    path = os.path.join(out_dir, "torch.safetensors")
    st_names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}

    def raw_bytes(t):
        t = t.contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same 16 bits as int16
            t = t.view(torch.int16)
        return t.numpy().tobytes()

    try:
        from safetensors.torch import save_file
    except ImportError as e:
        print(f"safetensors package not importable ({e}): writing with this script's own writer")
        own_write(path, {k: (st_names[v.dtype], list(v.shape), raw_bytes(v)) for k, v in tensors.items()}, metadata)
        writer = "safetensors_interop.py own writer"
    else:
        save_file(tensors, path, metadata=metadata)
        writer = "safetensors.torch.save_file"

    expected = {"writer": writer, "metadata": metadata, "tensors": {}}
    for name, t in tensors.items():
        dtype = st_names[t.dtype]
        bits = np.frombuffer(raw_bytes(t), dtype=BITS[dtype])
        values = t.to(torch.float64).reshape(-1).tolist() if t.dtype != torch.int64 else t.reshape(-1).tolist()
        expected["tensors"][name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "bits": [int(b) for b in bits],
            # JSON has no inf or nan: those elements are checked by their bits only.
            "values": [v if isinstance(v, int) or np.isfinite(v) else None for v in values],
        }
    with open(os.path.join(out_dir, "torch_expected.json"), "w") as f:
        json.dump(expected, f)
    print(f"{len(tensors)} tensors written to {path} by {writer}")
    return 0


def check_checkpoint(writer, out_dir):
    """A mixprec checkpoint (AdamW, amsgrad, 12 steps, one skipped), read
    with the own parser and numpy, then the model weights into a PyTorch
    module. The values are checked against invariants that hold whatever
    the gradients were: weights are the fp16 rounding of the masters (numpy
    rounds here), amsgrad's max_exp_avg_sq >= exp_avg_sq >= 0, every step
    count equals the applied steps (11 of 12), the scale a power of two."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "checkpoint.safetensors")
    subprocess.run([writer, path], check=True)
    _, metadata, tensors = parse(path)
    assert metadata["format"] == "mixprec-checkpoint" and metadata["optimizer"] == "AdamW", metadata
    assert metadata["user.epoch"] == "3" and "rng.mt19937_64" in metadata, metadata
    shapes = {"fc1.weight": [16, 8], "fc1.bias": [16], "fc2.weight": [4, 16], "fc2.bias": [4]}
    arrays = {}
    for name, shape in shapes.items():
        for key, dtype in [(name, "F16"), (f"mixprec/master/{name}", "F32"), (f"mixprec/exp_avg/{name}", "F32"),
                           (f"mixprec/exp_avg_sq/{name}", "F32"), (f"mixprec/max_exp_avg_sq/{name}", "F32")]:
            got_dtype, got_shape, raw = tensors[key]
            assert (got_dtype, got_shape) == (dtype, shape), (key, got_dtype, got_shape)
            arrays[key] = np.frombuffer(raw, NUMPY[dtype]).reshape(shape)
        master, weight = arrays[f"mixprec/master/{name}"], arrays[name]
        assert np.array_equal(master.astype(np.float16).view("<u2"), weight.view("<u2")), name
        v, vmax = arrays[f"mixprec/exp_avg_sq/{name}"], arrays[f"mixprec/max_exp_avg_sq/{name}"]
        assert (v >= 0).all() and (vmax >= v).all() and (v > 0).any(), name
    steps = np.frombuffer(tensors["mixprec/step"][2], "<i8")
    applied = np.frombuffer(tensors["mixprec/applied_steps"][2], "<i8")
    counts = np.frombuffer(tensors["mixprec/scaler/counts"][2], "<i8")
    assert list(steps) == [11] * 4 and list(applied) == [11] and list(counts) == [11, 1], (steps, applied, counts)
    scale = float(np.frombuffer(tensors["mixprec/scaler/scale"][2], "<f4")[0])
    assert scale > 0 and np.log2(scale) == round(np.log2(scale)), scale
    expected = set(shapes) | {f"mixprec/{s}/{n}" for n in shapes for s in
                              ("master", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    expected |= {"mixprec/step", "mixprec/lr", "mixprec/applied_steps", "mixprec/scaler/scale",
                 "mixprec/scaler/trackers", "mixprec/scaler/counts", "mixprec/scaler/skip_streak"}
    assert set(tensors) == expected, sorted(set(tensors) ^ expected)
    print(f"own parser + numpy: {len(tensors)} tensors of a checkpoint, invariants hold")
    try:
        import torch
    except ImportError as e:
        print(f"skip PyTorch: cannot import torch ({e})")
        return 0
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).half()
    state = {}
    for name in shapes:
        dtype, shape, raw = tensors[name]
        state[name.replace("fc1", "0").replace("fc2", "2")] = torch.frombuffer(bytearray(raw),
                                                                              dtype=torch.float16).reshape(shape)
    model.load_state_dict(state)
    assert torch.equal(model[0].weight, torch.from_numpy(arrays["fc1.weight"].copy()))
    print(f"PyTorch {torch.__version__}: the model weights load into an nn.Module")
    return 0


def main(argv):
    if len(argv) == 4 and argv[1] == "check-mixprec":
        return check_mixprec(argv[2], argv[3])
    if len(argv) == 4 and argv[1] == "check-checkpoint":
        return check_checkpoint(argv[2], argv[3])
    if len(argv) == 3 and argv[1] == "write-torch":
        return write_torch(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

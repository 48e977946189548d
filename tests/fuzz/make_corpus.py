#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of safetensors_fuzz into corpus/safetensors/.

A few small valid files (every dtype, metadata, scalars, empty tensors, an
empty file) and invalid ones that sit next to the checks (overlap, gap,
trailing bytes, duplicate keys, bad dtypes and shapes, a NUL in the header,
truncation). Written here from the format description, with the standard
library only, so the seeds do not come from the code under test.

    python3 tests/fuzz/make_corpus.py        # rewrites the corpus
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "safetensors")

SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
         "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def raw(header_text, data=b"", pad=True):
    """8-byte little-endian length, the header (space-padded to 8), data."""
    h = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def valid(tensors, metadata=None):
    """tensors: list of (name, dtype, shape); data bytes are a counter."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((len(data) + i) % 251 for i in range(n))
    return raw(json.dumps(header, separators=(",", ":"), ensure_ascii=False), data)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    seeds = {
        "valid_one_f32": valid([("w", "F32", [2, 2])]),
        "valid_all_dtypes": valid([("t_" + d, d, [2]) for d in sorted(SIZES, key=lambda d: -SIZES[d])]),
        "valid_metadata": valid([("layer.weight", "BF16", [3, 2]), ("layer.bias", "F16", [3])],
                                {"format": "pt", "step": "12"}),
        "valid_scalar_and_empty": valid([("s", "I64", []), ("e", "F32", [0, 4]), ("b", "BOOL", [3])]),
        "valid_empty_file": raw("{}"),
        "valid_unpadded": raw('{"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}', b"abc", pad=False),
        "valid_unicode_name": valid([("w\u00e9\u20ac", "I8", [2])], {"k\u00fc": "v\u00f6"}),
        "bad_overlap": raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                           '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12)),
        "bad_gap": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                       '"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', bytes(12)),
        "bad_trailing": raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(9)),
        "bad_duplicate": raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                             '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', bytes(2)),
        "bad_dtype": raw('{"a":{"dtype":"F17","shape":[1],"data_offsets":[0,1]}}', bytes(1)),
        "bad_negative_dim": raw('{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', bytes(1)),
        "bad_overflow": raw('{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}', bytes(8)),
        "bad_size": raw('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)),
        "bad_metadata": raw('{"__metadata__":{"step":3}}'),
        "bad_nul": raw(b'{}\x00{"a":1}'),
        "bad_length": struct.pack("<Q", 1 << 40) + b"{}",
        "bad_nested": raw('{"a":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}}', bytes(1)),
    }
    seeds["bad_truncated"] = seeds["valid_metadata"][:-3]
    for name, data in seeds.items():
        with open(os.path.join(OUT, name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

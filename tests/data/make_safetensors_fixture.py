#!/usr/bin/env python3
"""Writes tests/data/fixture.safetensors with Python's `safetensors` package,
for tests/test_safetensors.cpp to read; and checks a file written by patchwork.

    pip install --break-system-packages safetensors numpy   (by hand, never in CI)
    python3 tests/data/make_safetensors_fixture.py                 # (re)writes the fixture
    python3 tests/data/make_safetensors_fixture.py --check FILE    # verifies a file patchwork wrote

The values are simple formulas so the C++ test can state them independently:
    "f32.matrix"   F32 [2, 3]     i * 0.25 - 1          (i = 0, 1, ... in row-major order)
    "f32.cube"     F32 [2, 2, 2]  (-1)^i * (i + 0.5)
    "f32.tenth"    F32 [3]        0.1, -0.1, 3.4028234663852886e38 (rounded to float32)
    "f64.vector"   F64 [4]        1/3, -2/3, 1e-300, 2^60
    "f64.scalar"   F64 []         (0-d) 2.718281828459045
    "f32.empty"    F32 [0, 3]     no elements
    "f64.row"      F64 [1, 5]     i * i - 2
metadata {"source": "make_safetensors_fixture.py", "note": "patchwork test fixture"}
"""
import math
import pathlib
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def expected():
    return {
        "f32.matrix": np.array([i * 0.25 - 1 for i in range(6)], dtype=np.float32).reshape(2, 3),
        "f32.cube": np.array([(-1) ** i * (i + 0.5) for i in range(8)], dtype=np.float32).reshape(2, 2, 2),
        "f32.tenth": np.array([0.1, -0.1, 3.4028234663852886e38], dtype=np.float32),
        "f64.vector": np.array([1 / 3, -2 / 3, 1e-300, 2.0**60], dtype=np.float64),
        "f64.scalar": np.array(math.e, dtype=np.float64),
        "f32.empty": np.zeros((0, 3), dtype=np.float32),
        "f64.row": np.array([i * i - 2 for i in range(5)], dtype=np.float64).reshape(1, 5),
    }


METADATA = {"source": "make_safetensors_fixture.py", "note": "patchwork test fixture"}


def check(path):
    """Reads `path` with the reference reader and compares every tensor and dtype."""
    got = load_file(path)
    want = expected()
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert np.array_equal(g, w), (name, g, w)
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    for k, v in METADATA.items():
        assert meta.get(k) == v, (k, meta)
    print(f"{path}: {len(got)} tensors and metadata as expected; __metadata__ = {meta}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
        return
    out = pathlib.Path(__file__).resolve().parent / "fixture.safetensors"
    save_file(expected(), str(out), metadata=METADATA)
    check(str(out))


if __name__ == "__main__":
    main()

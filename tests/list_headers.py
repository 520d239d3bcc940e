#!/usr/bin/env python3
"""Print every public header under include/, relative to it, one per line.

Headers of the CUDA backend (patchwork/cuda/) need the CUDA toolkit's headers;
tests/gpu/host_headers.cpp checks them when the backend is built. The MPI
transport (patchwork/dist/mpi.hpp) needs <mpi.h>; tests/dist compiles it
when MPI is found."""
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("*.hpp")):
    rel = path.relative_to(root).as_posix()
    if rel.startswith("patchwork/cuda/") or rel.startswith("patchwork/kernels/") or rel == "patchwork/dist/mpi.hpp":
        continue
    print(rel)

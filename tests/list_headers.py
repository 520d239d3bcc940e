#!/usr/bin/env python3
"""Print every public header under include/, relative to it, one per line.

Headers of the CUDA backend (patchwork/cuda/) need the CUDA toolkit's headers;
tests/gpu/host_headers.cpp checks them when the backend is built. The MPI
transport (patchwork/dist/mpi.hpp) needs <mpi.h>; tests/dist compiles it
when MPI is found. The NCCL transport (patchwork/dist/nccl.hpp) needs
<nccl.h>, <mpi.h> and the CUDA runtime; tests/gpu/host_nccl.cpp compiles it
(real headers) when all are found, tests/dist/dist_check.cpp on the CPU
execution of the CUDA code."""
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("*.hpp")):
    rel = path.relative_to(root).as_posix()
    if rel.startswith("patchwork/cuda/") or rel.startswith("patchwork/kernels/") or rel in ("patchwork/dist/mpi.hpp", "patchwork/dist/nccl.hpp"):
        continue
    print(rel)

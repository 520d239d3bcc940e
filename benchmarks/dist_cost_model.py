#!/usr/bin/env python3
"""Step time of data-parallel training against node count, on paper.

    benchmarks/dist_cost_model.py [bench-out/dist]

Reads what scripts/bench-dist measured on this machine (bytes.md: bytes
all-reduced per step per method; steps.md: the step time of one process on one
thread, global batch 16; allreduce.md: the all-reduce time on 2 ranks) and
prints, for fine-tuning and LoRA on MiniLM, the modelled step time on P nodes
of one such core each, for a 1 Gbit/s and a 100 Gbit/s network:

    T(P) = C / P + T_ar(P),    T_ar(P) = 2 (P - 1) alpha + 2 (P - 1) / P * S / beta

C: the measured one-process step (compute scales with the rows per node),
S: the bytes all-reduced per step, beta: the link bandwidth, alpha: the
per-message latency of a ring all-reduce (2 (P - 1) messages). No overlap of
communication with backward is assumed (an upper bound on T). It also checks
the model on this machine: 2 processes over shared memory, with alpha and beta
read off allreduce.md, against the measured 2-process step."""
import pathlib
import re
import statistics
import sys

d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/dist")


def table(name):
    rows = []
    for line in (d / name).read_text().splitlines():
        if line.startswith("|") and not line.startswith("|---") and not re.match(r"\|\s*(method|bytes)\s*\|", line):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


bytes_per_step = {r[0]: int(r[2]) for r in table("bytes.md")}
steps = {}
for r in table("steps.md"):
    steps.setdefault(r[0], []).append([float(x) for x in r[2:6]])
ar = [(int(r[0]), float(r[1]) * 1e-6) for r in table("allreduce.md")]

# The 2-rank shared-memory all-reduce: latency from the smallest message, bandwidth
# from a 4 MiB one (DataParallel's default bucket); S bytes go as ceil(S / 4 MiB) buckets.
a_shm = min(ar)[1]
b_shm = (4 << 20) / dict(ar)[4 << 20]
print(f"shared memory, 2 ranks: latency {a_shm * 1e6:.1f} us, bandwidth {b_shm / 1e9:.2f} GB/s (4 MiB messages)\n")

print("| method | C: 1 x 1 thread (ms) | 2 x 1 measured (ms) | of which waiting | 2 x 1 modelled (ms) |")
print("|---|---:|---:|---:|---:|")
for m in ("lora", "finetune"):
    c = statistics.median(x[0] for x in steps[m])
    two = statistics.median(x[2] for x in steps[m])
    wait = statistics.median(x[3] for x in steps[m])
    s = bytes_per_step[m]
    buckets = -(-s // (4 << 20))
    model = c / 2 + 1e3 * (buckets * a_shm + s / b_shm)
    print(f"| {m} | {c:.0f} | {two:.0f} | {wait:.1f} | {model:.0f} |")

nets = {"1 Gbit/s": (50e-6, 125e6), "100 Gbit/s": (5e-6, 12.5e9)}
print()
print("| method | bytes/step | network | " + " | ".join(f"P={p}" for p in (1, 2, 4, 8, 16)) + " |")
print("|---|---:|---|" + "---:|" * 5)
for m in ("finetune", "lora"):
    c = statistics.median(x[0] for x in steps[m]) / 1e3
    s = bytes_per_step[m]
    for net, (alpha, beta) in nets.items():
        cells = []
        for p in (1, 2, 4, 8, 16):
            t = c / p + (2 * (p - 1) * alpha + 2 * (p - 1) / p * s / beta if p > 1 else 0)
            cells.append(f"{t * 1e3:.0f} ms ({c / t:.1f}x)")
        print(f"| {m} | {s} | {net} | " + " | ".join(cells) + " |")

#!/usr/bin/env python3
"""Summarise the raw outputs scripts/bench writes into bench-out/ as Markdown:
GEMM peak and layer GFLOP/s per configuration, the training-step comparison
with PyTorch (ratios and the targets), and peak memory per policy.

    python3 benchmarks/summarize.py bench-out
"""
import json
import os
import pathlib
import re
import statistics
import sys

CONFIGS = ["eigen", "openblas"]
TARGET = {64: 1.5, 1024: 1.0}  # torch ms / patchwork ms must reach this


def kv(line):
    return dict(re.findall(r"(\w+)=(\S+)", line))


def read_steps(out, impl):
    """(policy, batch) -> list of per-round median ms, from step-<impl>.round<r>.txt."""
    rows = {}
    for path in sorted(out.glob(f"step-{impl}.round*.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("STEP "):
                d = kv(line)
                rows.setdefault((d["policy"], int(d["batch"])), []).append(float(d["median_ms"]))
    return rows


def mid(values):
    return statistics.median(values)


def with_spread(values):
    """Median, and the range of the values in parentheses when there are several."""
    return f"{mid(values):.3f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


LAYER_ORDER = ["BM_Gemm", "LinearForward", "LinearBackward", "Adapter32Forward", "Adapter32Backward", "LoRA8Forward",
               "LoRA8Backward", "LayerNormForward", "LayerNormBackward", "ReluForward", "ReluBackward",
               "TrainStepAdapter", "TrainStepLoRA", "TrainStepFineTune"]


def layer_key(name):
    base = name.split("/")[0]
    nums = [int(x) for x in re.findall(r":(\d+)", name)]
    return (LAYER_ORDER.index(base) if base in LAYER_ORDER else 99, nums)


def read_layers(path):
    """name -> (real time, time unit, GFLOPS or None), the median aggregate when repeated."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    out = {}
    for b in data.get("benchmarks", []):
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b.get("run_name", b["name"])
        out[name.replace("/real_time", "")] = (b["real_time"], b["time_unit"], b.get("GFLOPS"))
    return out, data.get("context", {})


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out")
    lines = ["# patchwork CPU benchmarks", ""]
    machine = out / "machine.txt"
    if machine.exists():
        lines += ["```", machine.read_text().strip(), "```", ""]
        if "quick: 1" in machine.read_text():
            lines += ["**Quick mode (BENCH_QUICK=1): a smoke run with few steps, not a measurement.**", ""]

    # ---- GEMM peak and layers
    layers = {c: read_layers(out / f"layers-{c}.json") for c in CONFIGS}
    layers = {c: v for c, v in layers.items() if v}
    if layers:
        names = sorted({n for res, _ in layers.values() for n in res}, key=layer_key)
        lines += ["## Layers and GEMM peak (Google Benchmark, median of repetitions)", ""]
        head = "| benchmark | " + " | ".join(f"{c} time | {c} GFLOP/s" for c in layers) + " |"
        lines += [head, "|" + "---|" * (1 + 2 * len(layers))]
        for n in names:
            cells = []
            for c in layers:
                t = layers[c][0].get(n)
                if t is None:
                    cells += ["", ""]
                else:
                    cells += [f"{t[0]:.3f} {t[1]}", f"{t[2]:.1f}" if t[2] is not None else ""]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        for c in layers:
            peak = max((v[2] or 0) for k, v in layers[c][0].items() if k.startswith("BM_Gemm"))
            lines.append(f"- {c}: measured SGEMM peak {peak:.1f} GFLOP/s "
                         f"({layers[c][1].get('patchwork_build', '')})")
        tf = out / "gemm-torch.txt"
        for line in (tf.read_text().splitlines() if tf.exists() else []):
            if line.startswith("GEMM "):
                d = kv(line)
                lines.append(f"- PyTorch torch.mm {d['m']}x{d['k']}x{d['n']}: {d['gflops']} GFLOP/s "
                             f"({d['median_ms']} ms, {d['threads']} threads)")
        lines.append("")

    # ---- training step vs PyTorch
    torch = read_steps(out, "torch")
    ours = {c: read_steps(out, c) for c in CONFIGS}
    ours = {c: v for c, v in ours.items() if v}
    order = ["adapter", "lora", "finetune"]
    keys = sorted(set(k for v in ours.values() for k in v) | set(torch),
                  key=lambda k: (order.index(k[0]) if k[0] in order else 9, k[1]))
    if keys:
        rounds = max(len(v) for d in list(ours.values()) + [torch] for v in d.values()) if torch or ours else 0
        lines += [f"## Training step, median ms per step (speed-up = PyTorch ms / patchwork ms; "
                  f"median of {rounds} interleaved round(s), range of the round medians beside it)", ""]
        head = "| policy | batch | PyTorch | " + " | ".join(
            f"patchwork {c} | speed-up ({c})" for c in ours) + " | target |"
        lines += [head, "|" + "---|" * (4 + 2 * len(ours))]
        verdicts = []
        for k in keys:
            t = torch.get(k)
            goal = TARGET.get(k[1])
            cells = [k[0], str(k[1]), with_spread(t) if t else "n/a"]
            for c in ours:
                o = ours[c].get(k)
                if o is None:
                    cells += ["", ""]
                    continue
                cells.append(with_spread(o))
                if t:
                    r = mid(t) / mid(o)
                    mark = "" if goal is None else (" holds" if r >= goal else " **missed**")
                    cells.append(f"{r:.2f}x{mark}")
                    if goal is not None:
                        verdicts.append((k, c, r, goal))
                else:
                    cells.append("")
            cells.append(f">= {goal}x" if goal else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if verdicts:
            held = sum(1 for v in verdicts if v[2] >= v[3])
            lines.append(f"Targets (>= 1.5x at batch 64, >= 1.0x at batch 1024): {held} of {len(verdicts)} hold.")
            for (p, b), c, r, g in verdicts:
                if r < g:
                    lines.append(f"- missed: {p} batch {b} with {c}: {r:.2f}x (target {g}x)")
            lines.append("")

    # ---- phases
    phases = []
    for c in CONFIGS:
        f = out / f"phases-{c}.txt"
        if f.exists():
            phases += [kv(line) for line in f.read_text().splitlines() if line.startswith("PHASES ")]
    if phases:
        cols = ["zero_grad_ms", "forward_ms", "loss_ms", "backward_ms", "step_ms", "total_ms"]
        lines += ["## patchwork step split into phases, median ms (step_phases)", ""]
        lines += ["| gemm | policy | batch | " + " | ".join(c.replace("_ms", "") for c in cols) + " |",
                  "|" + "---|" * (3 + len(cols))]
        for d in phases:
            lines.append(f"| {d['impl'].replace('patchwork-', '')} | {d['policy']} | {d['batch']} | "
                         + " | ".join(f"{float(d[c]):.3f}" for c in cols) + " |")
        lines.append("")

    # ---- memory
    mem = {}
    for c in CONFIGS:
        for p in ("adapter", "finetune"):
            f = out / f"memory-{c}-{p}.txt"
            if f.exists():
                for line in f.read_text().splitlines():
                    if line.startswith("MEMORY "):
                        mem[(c, p)] = kv(line)
    if mem:
        lines += ["## Peak memory, 50M-parameter model (12 x [Linear(2048,2048), LayerNorm, ReLU] + head)", ""]
        lines += ["| gemm | policy | params | trainable | batch | steps | RSS after build MiB | peak RSS MiB "
                  "| median step ms |", "|---|---|---|---|---|---|---|---|---|"]
        for (c, p), d in sorted(mem.items()):
            lines.append(f"| {c} | {p} | {int(d['params']):,} | {int(d['trainable']):,} | {d['batch']} | "
                         f"{d['steps']} | {d['rss_model_mb']} | {d['peak_rss_mb']} | {d['step_ms']} |")
        lines.append("")
        for c in CONFIGS:
            a, f = mem.get((c, "adapter")), mem.get((c, "finetune"))
            if a and f:
                lines.append(f"- {c}: peak RSS finetune / adapter = "
                             f"{float(f['peak_rss_mb']) / float(a['peak_rss_mb']):.2f}x")
        lines.append("")
    # ---- noise
    noise = out / "noise.log"
    if noise.exists():
        samples = [kv(line) for line in noise.read_text().splitlines() if "load=" in line]
        busy = [d for d in samples if int(d.get("cc1plus", "0") or 0) > 0]
        if samples:
            peak = max(float(d["load"]) for d in samples)
            lines.append(f"Noise monitor: {len(samples)} samples every 5 s during the measurements; a compiler was "
                         f"running in {len(busy)} of them; highest 1-minute load average {peak:.2f} (the "
                         f"benchmarks' own threads count towards it).")
            steal = [int(d["steal"]) for d in samples if d.get("steal", "").isdigit()]
            if len(steal) > 1:
                t = [int(line.split()[0]) for line in noise.read_text().splitlines() if "load=" in line]
                cpu_jiffies = max(1, (t[-1] - t[0]) * 100 * os.cpu_count())
                lines.append(f"Hypervisor steal time during the run: {100 * (steal[-1] - steal[0]) / cpu_jiffies:.2f}% "
                             "of CPU time.")
            lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

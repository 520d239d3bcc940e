#!/usr/bin/env python3
"""Plots of multitask_patches --csv output (matplotlib).

usage: plot.py RESULTS.csv OUT_DIR

Writes two PNG files into OUT_DIR:
  multitask-accuracy.png  test accuracy per task (mean +- sample sd over seeds)
                          against the per-task backbone parameters (the bank,
                          % of the backbone, log scale) of every single-task
                          patch type; head only (bank 0) is the grey band, and
                          the joint row whose shared weights train is the
                          open marker.
  multitask-joint.png     joint (fit_multitask) against single-task training:
                          accuracy per task of single-task NormPatch, the
                          joint rows, and full fine-tuning, as bars with
                          sample-sd error bars and the seeds as dots.
"""
import collections
import csv
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = ["task 0: 10 classes", "task 1: coarse (4)", "task 2: inverted", "task 3: unseen 7-9"]
HEAD = "head only"
FULL = "FineTune (K full models)"
SINGLE_NORM = "NormPatch + head"
SHARED_TRAINS = "NormPatch joint (shared trains)"


def load(path):
    acc = collections.defaultdict(list)  # (row, task) -> [accuracy % per seed]
    bank_pct = {}
    order = []
    seeds = set()
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row, task = r["row"], int(r["task"])
            acc[(row, task)].append(100 * float(r["accuracy"]))
            bank_pct[row] = float(r["bank_pct"])
            seeds.add(int(r["seed"]))
            if row not in order:
                order.append(row)
    if not order:
        sys.exit(f"plot.py: no rows in {path}")
    return acc, bank_pct, order, sorted(seeds)


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_accuracy(acc, bank_pct, order, seeds, out):
    single = [r for r in order if "joint" not in r and r != HEAD]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), sharex=True)
    for task, ax in enumerate(axes):
        if (HEAD, task) in acc:
            m, s = mean_sd(acc[(HEAD, task)])
            ax.axhspan(m - s, m + s, color="0.85", zorder=0)
            ax.axhline(m, color="0.45", lw=1.2, ls="--", zorder=1, label=f"{HEAD} (bank 0)")
        for i, row in enumerate(single):
            m, s = mean_sd(acc[(row, task)])
            ax.errorbar(bank_pct[row], m, yerr=s, fmt=markers[i % len(markers)], ms=7, capsize=4,
                        color=colours[i % len(colours)], label=row, zorder=3)
        if (SHARED_TRAINS, task) in acc:
            m, s = mean_sd(acc[(SHARED_TRAINS, task)])
            ax.errorbar(bank_pct[SHARED_TRAINS], m, yerr=s, fmt="o", mfc="none", ms=8, mew=1.6, capsize=4,
                        color="black", label=SHARED_TRAINS + " (+ shared backbone)", zorder=3)
        ax.set_xscale("log")
        ax.set_title(TASKS[task] if task < len(TASKS) else f"task {task}")
        ax.set_xlabel("bank per task, % of backbone (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    seed_text = ", ".join(str(s) for s in seeds)
    fig.suptitle(f"Fashion-MNIST, 4 tasks on one pre-trained backbone: accuracy against patch size "
                 f"(mean ± sd over seeds {seed_text})")
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_joint(acc, order, seeds, out):
    rows = [r for r in order if r == SINGLE_NORM or "joint" in r or r == FULL]
    # single-task NormPatch, the frozen joint rows, then shared trains against FineTune
    rows.sort(key=lambda r: (r == FULL, r == SHARED_TRAINS, "joint" in r))
    colours = ["#1f77b4", "#9ecae1", "#6baed6", "#3182bd", "#e6550d", "#31a354"]
    n_tasks = 1 + max(t for (_, t) in acc)
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        for task in range(n_tasks):
            vals = acc[(row, task)]
            m, s = mean_sd(vals)
            x = task + (i - (len(rows) - 1) / 2) * width
            ax.bar(x, m, width * 0.95, yerr=s, capsize=3, color=colours[i % len(colours)],
                   label=row if task == 0 else None, edgecolor="black", lw=0.4)
            ax.plot([x] * len(vals), vals, ".", color="black", ms=3)
    ax.set_xticks(range(n_tasks))
    ax.set_xticklabels(TASKS[:n_tasks])
    lo = min(min(v) for (r, _), v in acc.items() if r in rows)
    ax.set_ylim(max(0, lo - 8), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    seed_text = ", ".join(str(s) for s in seeds)
    ax.set_title(f"Joint (fit_multitask) against single-task training (bars: mean ± sd, dots: seeds {seed_text})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out_dir = sys.argv[1], sys.argv[2]
    acc, bank_pct, order, seeds = load(src)
    os.makedirs(out_dir, exist_ok=True)
    plot_accuracy(acc, bank_pct, order, seeds, os.path.join(out_dir, "multitask-accuracy.png"))
    plot_joint(acc, order, seeds, os.path.join(out_dir, "multitask-joint.png"))
    print(f"wrote {os.path.join(out_dir, 'multitask-accuracy.png')} and {os.path.join(out_dir, 'multitask-joint.png')}")


if __name__ == "__main__":
    main()

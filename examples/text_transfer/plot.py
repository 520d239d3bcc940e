#!/usr/bin/env python3
"""Table and plot of text_transfer runs (matplotlib for the plot).

usage: plot.py PATCHWORK.csv [TORCH.csv] [--png OUT.png]

Prints one markdown table with both sides (test accuracy as mean +- sample
standard deviation over the seeds, trainable parameters besides the head and
their share of full fine-tuning, seconds per epoch, and the PyTorch side's
peak RSS when its CSV has it), and with --png draws accuracy against
trainable parameters (log axis; the head-only rows, which train nothing
besides the head, are drawn at 1).
"""
import collections
import csv
import statistics
import sys

ORDER = ["head", "bitfit", "ln", "pfeiffer", "houlsby", "lora", "finetune"]
LABEL = {"head": "head only", "bitfit": "BitFit (Linear biases)", "ln": "LN tuning",
         "pfeiffer": "Pfeiffer adapter (24)", "houlsby": "Houlsby adapters (24)", "lora": "LoRA r=8 q,v",
         "finetune": "full fine-tuning"}


def read(path):
    rows = collections.defaultdict(list)
    with open(path) as f:
        for r in csv.DictReader(f):
            rows[r["method"]].append(r)
    return rows


def stats(rows, key):
    v = [float(r[key]) for r in rows]
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    png = sys.argv[sys.argv.index("--png") + 1] if "--png" in sys.argv else None
    if png in args:
        args.remove(png)
    if not args:
        sys.exit(__doc__)
    sides = [("patchwork", read(args[0]))] + ([("PyTorch + PEFT", read(args[1]))] if len(args) > 1 else [])
    full = None
    for _, rows in sides:
        if "finetune" in rows:
            full = float(rows["finetune"][0]["trainable"])
    head = "| method | trainable | % of full |" + "".join(
        f" {n} accuracy % | {n} s/epoch |" for n, _ in sides)
    has_rss = len(sides) > 1 and any("peak_rss_mib" in r[0] for r in sides[1][1].values())
    if has_rss:
        head += " PyTorch peak RSS MiB |"
    print(head)
    print("|---|---:|---:|" + "---:|---:|" * len(sides) + ("---:|" if has_rss else ""))
    for m in ORDER:
        if not any(m in rows for _, rows in sides):
            continue
        first = next(rows[m] for _, rows in sides if m in rows)
        trainable = int(first[0]["trainable"])
        share = f"{100 * trainable / full:.3f}" if full else "?"
        line = f"| {LABEL[m]} | {trainable:,} | {share} |"
        for _, rows in sides:
            if m in rows:
                a, s = stats(rows[m], "accuracy")
                t, _ = stats(rows[m], "seconds_per_epoch")
                line += f" {100 * a:.1f} +- {100 * s:.1f} (n={len(rows[m])}) | {t:.1f} |"
            else:
                line += " - | - |"
        if has_rss:
            r = sides[1][1].get(m)
            line += f" {max(float(x['peak_rss_mib']) for x in r):.0f} |" if r else " - |"
        print(line)
    if png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (name, rows), marker in zip(sides, ["o", "s"]):
            xs, ys, es = [], [], []
            for m in ORDER:
                if m in rows:
                    xs.append(max(1, int(rows[m][0]["trainable"])))
                    a, s = stats(rows[m], "accuracy")
                    ys.append(100 * a)
                    es.append(100 * s)
            ax.errorbar(xs, ys, yerr=es, fmt=marker, capsize=3, label=name)
            if name == "patchwork":
                for x, y, m in zip(xs, ys, [m for m in ORDER if m in rows]):
                    ax.annotate(LABEL[m], (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters besides the head (log; head only at 1)")
        ax.set_ylabel("test accuracy, % (mean +- sd over seeds)")
        ax.set_title("all-MiniLM-L6-v2 on WordNet noun supersense (26 classes)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

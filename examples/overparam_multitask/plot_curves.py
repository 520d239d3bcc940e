#!/usr/bin/env python3
"""Training curves of overparam_multitask, averaged over seeds, as a PNG (gnuplot).

usage: plot_curves.py CURVES.csv OUT.png

Left: training loss (sum of the three task losses) per epoch; right: mean test
accuracy over the three tasks per epoch. One colour per trunk width; solid
lines are direct training, dashed and dotted the OverParam runs (expansion 2, 4, ...).
"""
import collections
import csv
import os
import subprocess
import sys
import tempfile


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    sums = collections.defaultdict(lambda: [0.0, 0.0, 0])  # (width, expansion, epoch) -> loss, acc, n
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            key = (int(row["width"]), int(row["expansion"]), int(row["epoch"]))
            acc = (float(row["acc_a"]) + float(row["acc_b"]) + float(row["acc_c"])) / 3
            s = sums[key]
            s[0] += float(row["train_loss"])
            s[1] += 100 * acc
            s[2] += 1
    configs = sorted({(w, e) for (w, e, _) in sums})
    widths = sorted({w for (w, _) in configs})
    expansions = sorted({e for (_, e) in configs})
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]
    with tempfile.TemporaryDirectory() as tmp:
        plots_loss, plots_acc = [], []
        for w, e in configs:
            path = os.path.join(tmp, f"w{w}_e{e}.dat")
            with open(path, "w") as f:
                for (w2, e2, ep), (loss, acc, n) in sorted(sums.items()):
                    if (w2, e2) == (w, e):
                        f.write(f"{ep} {loss / n} {acc / n}\n")
            colour = colours[widths.index(w) % len(colours)]
            dash = expansions.index(e) + 1
            title = f"w={w} " + ("direct" if e == 0 else f"overparam x{e}")
            style = f"with linespoints lw 2 pt 7 ps 0.6 dt {dash} lc rgb '{colour}' title '{title}'"
            plots_loss.append(f"'{path}' using 1:2 {style}")
            plots_acc.append(f"'{path}' using 1:3 {style}")
        script = "\n".join([
            "set terminal pngcairo size 1400,560 font 'sans,11'" if has_cairo() else "set terminal png size 1400,560",
            f"set output '{out}'",
            "set multiplot layout 1,2 title 'Fashion-MNIST, 3 tasks, compact trunk trained directly vs overparameterised (mean of seeds)'",
            "set grid",
            "set key top right",
            "set xlabel 'epoch'",
            "set ylabel 'training loss (sum over tasks)'",
            "plot " + ", ".join(plots_loss),
            "set key bottom right",
            "set ylabel 'mean test accuracy (%)'",
            "plot " + ", ".join(plots_acc),
            "unset multiplot",
        ])
        subprocess.run(["gnuplot"], input=script, text=True, check=True)


def has_cairo():
    proc = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
    return "pngcairo" in proc.stdout + proc.stderr


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The results table of docs/results.md section 7 from text_search CSV files
(--csv), which may come from several processes: one row per method (and
lambda for the search), accuracy mean +- sample standard deviation over seeds.

    python3 examples/text_search/table.py a.csv b.csv ...
"""
import csv
import statistics
import sys

LAYERS = 10_646_784  # the six layers of all-MiniLM-L6-v2 (fine-tuning every layer)

rows = {}
for path in sys.argv[1:]:
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = (r["method"], float(r["lambda"]))
            rows.setdefault(key, []).append(r)

order = {"search": 0, "finetune": 1, "lora": 2, "hand": 3}
print("| scheme | schemes found (seeds 1, 2, 3) | trainable besides the head (mean) | % of fine-tuning every layer "
      "| test accuracy % (mean +- sd) |")
print("|---|---|---:|---:|---:|")
for (method, lam), rs in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
    rs.sort(key=lambda r: int(r["seed"]))
    acc = [100 * float(r["accuracy"]) for r in rs]
    trainable = statistics.mean(int(r["trainable"]) for r in rs)
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    name = f"search, lambda {lam:g}" if method == "search" else method
    schemes = ", ".join(r["scheme"] for r in rs)
    print(f"| {name} | {schemes} | {trainable:,.0f} | {100 * trainable / LAYERS:.2f} | "
          f"{statistics.mean(acc):.1f} +- {sd:.1f} |")

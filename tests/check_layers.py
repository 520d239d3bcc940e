#!/usr/bin/env python3
"""The library's floors, read from its includes.

Every header under include/patchwork (and kernels/) may include headers of
its own floor and of the floors below it, never one above:

    core  <  ops, compose, cuda, kernels  <  layers  <  policies
          <  search, multitask, train, io, text, dist  <  transformer

The umbrella headers (patchwork.hpp, cuda.cuh, kernels/ops.cuh) include
everything. No two
headers share a file name. Usage: check_layers.py REPO_ROOT"""
import pathlib
import re
import sys

FLOORS = {
    "core": 0,
    "ops": 1, "compose": 1, "cuda": 1, "kernels": 1,
    "layers": 2,
    "policies": 3,
    "search": 4, "multitask": 4, "train": 4, "io": 4, "text": 4, "dist": 4,
    "transformer": 5,
}
# Umbrellas: patchwork.hpp and cuda.cuh include everything; kernels/ops.cuh
# defines the device operations that every floor declares (Linear's GEMMs,
# the activations, the losses, the optimisers) and is included by cuda.cuh only.
UMBRELLAS = {"patchwork.hpp", "cuda.cuh", "ops.cuh"}

root = pathlib.Path(sys.argv[1])
inc = root / "include" / "patchwork"
headers = [p for p in inc.rglob("*") if p.suffix in (".hpp", ".cuh") and p.is_file() and "kernels" not in p.relative_to(inc).parts]
headers += [p for p in (root / "kernels").rglob("*") if p.suffix in (".hpp", ".cuh")]
problems = []
names = {}
for h in headers:
    if (h.parent == inc or h.parent == root / "kernels") and h.name in UMBRELLAS:
        continue
    folder = "kernels" if root / "kernels" in h.parents else h.relative_to(inc).parts[0]
    if folder not in FLOORS:
        problems.append(f"{h.relative_to(root)}: folder '{folder}' has no floor (add it to tests/check_layers.py)")
        continue
    names.setdefault(h.name, []).append(str(h.relative_to(root)))
    for line_no, line in enumerate(h.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r'\s*#\s*include\s+"patchwork/([^/"]+)/', line)
        if not m:
            continue
        target = m.group(1)
        if target not in FLOORS:
            problems.append(f"{h.relative_to(root)}:{line_no}: includes an unknown folder '{target}'")
        elif FLOORS[target] > FLOORS[folder]:
            problems.append(f"{h.relative_to(root)}:{line_no}: {folder}/ (floor {FLOORS[folder]}) includes "
                            f"{target}/ (floor {FLOORS[target]}), a higher floor")
for name, where in sorted(names.items()):
    if len(where) > 1:
        problems.append(f"two headers named {name}: {', '.join(sorted(where))}")
for p in problems:
    print(p)
print(f"{len(headers)} headers checked, {len(problems)} problem(s)")
sys.exit(1 if problems else 0)

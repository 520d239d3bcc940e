#!/usr/bin/env python3
"""Sum meson test logs into one line: tests: N passed, N failed, N skipped.

A doctest program contributes its test cases; any other test counts as one.
A program that failed without a doctest summary (a crash, a sanitizer
report) counts as one failure.
"""
import json
import os
import re
import sys

SUMMARY = re.compile(r"\[doctest\] test cases:\s*(\d+) \|\s*(\d+) passed \|\s*(\d+) failed \|\s*(\d+) skipped")

passed = skipped = 0
failed = int(os.environ.get("PATCHWORK_BUILD_FAILURES", "0"))
for path in sys.argv[1:]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as err:
        print(f"cannot read {path}: {err}")
        failed += 1
        continue
    for line in lines:
        entry = json.loads(line)
        result = entry.get("result")
        match = SUMMARY.search(entry.get("stdout") or "")
        if result == "SKIP":
            skipped += 1
        elif match:
            _, p, f, s = map(int, match.groups())
            passed, failed, skipped = passed + p, failed + f, skipped + s
            if result != "OK" and f == 0:
                failed += 1  # the program failed after its tests passed (a sanitizer report at exit)
        elif result == "OK":
            passed += 1
        else:
            failed += 1
if not sys.argv[1:] and not failed:
    failed += 1
print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)

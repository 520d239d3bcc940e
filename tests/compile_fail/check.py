#!/usr/bin/env python3
"""Compile-fail check: a misapplied policy must not compile, and the compiler's
message must contain the readable text the source file names in a line
`// expected: <text>`. Usage: check.py SOURCE COMPILER [FLAGS...]"""
import re
import subprocess
import sys

source, command = sys.argv[1], sys.argv[2:]
text = open(source, encoding="utf-8").read()
wanted = re.search(r"//\s*expected:\s*(.+)", text)
if not wanted:
    print(f"{source}: no '// expected:' line")
    sys.exit(1)
wanted = wanted.group(1).strip()
proc = subprocess.run(command + ["-fsyntax-only", source], capture_output=True, text=True)
if proc.returncode == 0:
    print(f"{source}: compiled, but it must not")
    sys.exit(1)
if wanted not in proc.stderr:
    print(f"{source}: failed to compile, but without the message '{wanted}':")
    print(proc.stderr[:4000])
    sys.exit(1)
print(f"{source}: rejected with '{wanted}'")

#!/usr/bin/env python3
"""Runs the planted-bug program of the CPU execution of the CUDA code in the
ThreadSanitizer build: block_sum without its barrier (--race) must be reported
as a data race, the correct copy (--no-race) must not be."""
import os
import subprocess
import sys

program = sys.argv[1]
env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0:exitcode=66:report_signal_unsafe=0")


def run(flag):
    p = subprocess.run([program, flag], env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


code, out = run("--race")
if "ThreadSanitizer: data race" not in out or "block_sum" not in out:
    print(out)
    print("FAIL: block_sum without its barrier was not reported as a data race (exit %d)" % code)
    sys.exit(1)
print("block_sum without its barrier: data race reported (exit %d)" % code)

code, out = run("--no-race")
if code != 0 or "ThreadSanitizer" in out:
    print(out)
    print("FAIL: the correct block_sum was reported (exit %d)" % code)
    sys.exit(1)
print("block_sum with its barriers: no report")

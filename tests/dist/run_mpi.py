#!/usr/bin/env python3
"""Run a program under mpirun on this machine only and check how it ended.

    run_mpi.py --np N [--fail] [--within S] [--expect TEXT]... [--skip-code C] [--tmpdir] -- PROGRAM ARGS...

Without --fail the job must exit 0; with it, it must exit non-zero (a rank
failed and the job was aborted). --within S: the job must end within S
seconds (a failed rank must not leave the others hanging). --expect TEXT: the
combined output must contain TEXT. --skip-code C: a job exiting C exits 77
(meson's "skipped"). --tmpdir appends a fresh temporary
directory to the program's arguments. MPI runs over shared memory and the
loopback interface only; running as root is allowed (containers)."""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--np", type=int, required=True)
ap.add_argument("--fail", action="store_true")
ap.add_argument("--within", type=float, default=None)
ap.add_argument("--expect", action="append", default=[])
ap.add_argument("--tmpdir", action="store_true")
ap.add_argument("--skip-code", type=int, default=None)
ap.add_argument("command", nargs=argparse.REMAINDER)
a = ap.parse_args()
cmd = a.command[1:] if a.command and a.command[0] == "--" else a.command

env = dict(os.environ)
env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl": "self,vader", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
            "OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_rmaps_base_oversubscribe": "1",
            "OMPI_MCA_mpi_yield_when_idle": "1", "OMPI_MCA_hwloc_base_binding_policy": "none"})
mpirun = env.get("MPIRUN", "mpirun")
with tempfile.TemporaryDirectory() as tmp:
    full = [mpirun, "--oversubscribe", "-np", str(a.np)] + cmd + ([tmp] if a.tmpdir else [])
    t0 = time.monotonic()
    p = subprocess.run(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - t0
out = p.stdout
sys.stdout.write(out)
print(f"run_mpi: {' '.join(full)} -> exit {p.returncode} in {seconds:.1f} s")
if a.skip_code is not None and p.returncode == a.skip_code:
    print("run_mpi: skipped (the program exited with the skip code)")
    sys.exit(77)
problems = []
if a.fail and p.returncode == 0:
    problems.append("the job should have failed but exited 0")
if not a.fail and p.returncode != 0:
    problems.append(f"the job failed with exit {p.returncode}")
if a.within is not None and seconds > a.within:
    problems.append(f"the job took {seconds:.1f} s, more than {a.within} s")
for text in a.expect:
    if text not in out:
        problems.append(f"the output lacks {text!r}")
for pr in problems:
    print("run_mpi: " + pr)
sys.exit(1 if problems else 0)

#!/usr/bin/env python3
"""PyTorch side of benchmarks/conv_bench.cpp: the same convolutions on the CPU.

Shapes (batch 64, input H x H with H = 28 and 14, channels_last memory format,
i.e. NHWC as patchwork):
    Conv3x3_16_32     nn.Conv2d(16, 32, 3, padding=1)
    Depthwise3x3_32   nn.Conv2d(32, 32, 3, padding=1, groups=32)
    Conv1x1_32_64     nn.Conv2d(32, 64, 1)
MobileNet-style blocks (as in conv_bench.cpp; BatchNorm in training mode):
    MobileNetBlock_24_144 at 56 x 56, MobileNetBlock_32_192 at 28 x 28:
    Conv2d(C, E, 1) BatchNorm2d(E) ReLU6 Conv2d(E, E, 3, padding=1, groups=E) BatchNorm2d(E) ReLU6
    Conv2d(E, C, 1) BatchNorm2d(C), convolutions without bias
Modes:
    Forward           y = conv(x), autograd recording (x requires grad, as inside a network)
    ForwardBackward   y = conv(x); y.backward(dy): weight, bias and input gradients
Each: --warmup calls, then at least --reps calls and --min-time seconds, one
perf_counter interval per call; the median (and p10, p90) in ms.

Output, one line per case:
    CONV impl=torch layer=<name> mode=<mode> hw=<H> median_ms=<m> p10_ms=<a> p90_ms=<z> reps=<n> threads=<k>
"""
import argparse
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--min-time", type=float, default=1.0)
    return p.parse_args()


args = parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)

BATCH = 64
SPECS = (  # name, in, out, kernel, padding, groups (as kSpecs in conv_bench.cpp)
    ("Conv3x3_16_32", 16, 32, 3, 1, 1),
    ("Depthwise3x3_32", 32, 32, 3, 1, 32),
    ("Conv1x1_32_64", 32, 64, 1, 0, 1),
)
SIZES = (28, 14)
BLOCKS = (  # name, channels, expanded, H (as kBlocks in conv_bench.cpp)
    ("MobileNetBlock_24_144", 24, 144, 56),
    ("MobileNetBlock_32_192", 32, 192, 28),
)


def mobilenet_block(c, e):
    return nn.Sequential(
        nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
        nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
        nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))


def quantile(values, q):
    """Nearest-rank quantile, as bench::quantile in benchmarks/common.hpp."""
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def measure(fn):
    for _ in range(args.warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < args.reps or (time.perf_counter() - start < args.min_time and len(times) < 50 * args.reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main():
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}", file=sys.stderr)
    torch.manual_seed(0)
    for name, cin, cout, k, pad, groups in SPECS:
        for hw in SIZES:
            conv = nn.Conv2d(cin, cout, k, padding=pad, groups=groups).to(memory_format=torch.channels_last)
            x = torch.rand(BATCH, cin, hw, hw).mul_(2).sub_(1).to(memory_format=torch.channels_last)
            x.requires_grad_(True)
            o = hw + 2 * pad - k + 1
            dy = torch.rand(BATCH, cout, o, o).mul_(2).sub_(1).to(memory_format=torch.channels_last)

            def forward():
                return conv(x)

            def forward_backward():
                conv(x).backward(dy)

            for mode, fn in (("Forward", forward), ("ForwardBackward", forward_backward)):
                t = measure(fn)
                print(f"CONV impl=torch layer={name} mode={mode} hw={hw} median_ms={statistics.median(t):.4f} "
                      f"p10_ms={quantile(t, 0.1):.4f} p90_ms={quantile(t, 0.9):.4f} reps={len(t)} "
                      f"threads={args.threads}", flush=True)
            x.grad = None
            conv.zero_grad(set_to_none=True)
    for name, c, e, hw in BLOCKS:
        block = mobilenet_block(c, e).to(memory_format=torch.channels_last).train()
        x = torch.rand(BATCH, c, hw, hw).mul_(2).sub_(1).to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        dy = torch.rand(BATCH, c, hw, hw).mul_(2).sub_(1).to(memory_format=torch.channels_last)

        def block_forward():
            return block(x)

        def block_forward_backward():
            block(x).backward(dy)

        for mode, fn in (("Forward", block_forward), ("ForwardBackward", block_forward_backward)):
            t = measure(fn)
            print(f"CONV impl=torch layer={name} mode={mode} hw={hw} median_ms={statistics.median(t):.4f} "
                  f"p10_ms={quantile(t, 0.1):.4f} p90_ms={quantile(t, 0.9):.4f} reps={len(t)} "
                  f"threads={args.threads}", flush=True)


if __name__ == "__main__":
    main()

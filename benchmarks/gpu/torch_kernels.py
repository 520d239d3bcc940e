#!/usr/bin/env python3
"""The shapes of kernels_bench.cu in PyTorch eager on the GPU (torch.cuda.Event
timing, warm-up, median), printing the same CSV lines ("csv,torch,...") so the
two outputs can be compared side by side."""
import statistics

import torch

WARMUP, REPS = 5, 30


def median_ms(f):
    for _ in range(WARMUP):
        f()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_gbps(nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2.0 * nbytes / (median_ms(lambda: dst.copy_(src)) * 1e6)


def report(name, shape, ms, nbytes):
    gbps = nbytes / (ms * 1e6)
    copy = copy_gbps(int(nbytes // 2))
    print(f"{name:34s} {shape:26s} {ms:10.4f} ms {gbps:9.1f} GB/s {copy:9.1f} GB/s {100 * gbps / copy:6.1f}%")
    print(f"csv,torch,{name},{shape},{ms:.6f},{gbps:.3f},{copy:.3f}")


def adapter(dtype, label, n, d, r):
    h = torch.zeros(n, d, device="cuda", dtype=dtype, requires_grad=True)
    D = torch.zeros(r, d, device="cuda", dtype=dtype, requires_grad=True)
    bd = torch.zeros(r, device="cuda", dtype=dtype, requires_grad=True)
    U = torch.zeros(d, r, device="cuda", dtype=dtype, requires_grad=True)
    bu = torch.zeros(d, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.zeros(n, d, device="cuda", dtype=dtype)
    e = h.element_size()
    acc = 4 if dtype == torch.bfloat16 else e
    shape = f"{n}x{d} r{r} {label}"

    def fwd():
        return h + torch.nn.functional.gelu(h @ D.t() + bd) @ U.t() + bu

    with torch.no_grad():
        report("adapter_forward", shape, median_ms(fwd), 2.0 * n * d * e + n * r * acc)
    report("adapter_forward_backward", shape, median_ms(lambda: fwd().backward(g)), 5.0 * n * d * e + 2.0 * n * r * acc)


def mix(dtype, label, m, k):
    cands = torch.zeros(k, m, device="cuda", dtype=dtype)
    alpha = torch.zeros(k, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        f = lambda: (torch.softmax(alpha, 0).to(dtype)[:, None] * cands).sum(0)
        report("softmax_mix_forward", f"{k}x{m} {label}", median_ms(f), (k + 1) * m * cands.element_size())


def multitask(n, d, r, k):
    h = torch.zeros(n, d, device="cuda")
    D, bd = torch.zeros(k, r, d, device="cuda"), torch.zeros(k, r, device="cuda")
    U, bu = torch.zeros(k, d, r, device="cuda"), torch.zeros(k, d, device="cuda")
    task = (torch.arange(n, device="cuda") * k // n).long()

    def f():  # gather per-row parameters (bmm over rows)
        z = torch.bmm(D[task], h[:, :, None])[:, :, 0] + bd[task]
        return h + torch.bmm(U[task], torch.nn.functional.gelu(z)[:, :, None])[:, :, 0] + bu[task]

    with torch.no_grad():
        report("multitask_adapter_forward", f"{n}x{d} r{r} K{k} fp32", median_ms(f), 2.0 * n * d * 4 + n * r * 4)


def main():
    print(f"{'kernel':34s} {'shape':26s} {'median':>13s} {'achieved':>14s} {'D2D copy':>14s} {'ratio':>7s}")
    for r in (16, 64):
        adapter(torch.float32, "fp32", 16384, 768, r)
        adapter(torch.bfloat16, "bf16", 16384, 768, r)
    mix(torch.float32, "fp32", 1 << 23, 4)
    mix(torch.bfloat16, "bf16", 1 << 23, 4)
    multitask(16384, 768, 16, 1)
    multitask(16384, 768, 16, 32)


if __name__ == "__main__":
    main()

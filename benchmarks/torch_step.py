#!/usr/bin/env python3
"""PyTorch side of the training-step comparison (benchmarks/step_compare.cpp is
the patchwork side; both print the same lines, scripts/bench joins them).

Model (identical to benchmarks/example_model.hpp and examples/transfer):
    body = Linear(784,256), LayerNorm(256), ReLU, Linear(256,256), LayerNorm(256), ReLU
    head = Linear(256,5)
Policies:
    adapter   body frozen, a bottleneck adapter after the body
              (h + up(relu(down(h))), 256->32->256, up-projection zero-initialised),
              adapter and head train
    lora      peft LoraConfig(r=8, lora_alpha=16, target the two body Linears,
              modules_to_save=["head"]): LoRA factors and head train, the rest frozen
    finetune  everything trains
    head      body frozen, only the head trains
One step = zero_grad, forward, cross-entropy (mean over the batch), backward,
AdamW step (lr 1e-3, weight decay 0.01). Input: a pool of 16384 random samples
with random labels in memory, cycled batch by batch (no data loading).
Each configuration: --warmup steps, then at least max(20, steps * 64 / batch)
timed steps and at least --min-time seconds (as step_compare), one
perf_counter interval per step; the median is reported (p10 and p90 beside it).

Output, one line per configuration:
    STEP impl=torch policy=<p> batch=<b> median_ms=<m> p10_ms=<a> p90_ms=<z> steps=<n> trainable=<t> threads=<k>
         loss=<last loss>
"""
import argparse
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--batches", default="64,1024")
    p.add_argument("--policies", default="adapter,lora,finetune")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200, help="timed steps at batch 64 (fewer for larger batches)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps per configuration at least")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the same steps on the GPU (benchmarks/gpu/step_gpu is the patchwork side); "
                        "each timed step ends with torch.cuda.synchronize()")
    p.add_argument("--gemm", action="store_true",
                   help="also time torch.mm (PyTorch's BLAS) at the GEMM-peak sizes of bench_layers "
                        "and at the first layer's forward shape")
    return p.parse_args()


args = parse_args()
# Thread count first: torch reads it once at start-up for some pools.
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)

IN, HID, OUT, RANK, LORA_ALPHA, BOTTLENECK = 784, 256, 5, 8, 16, 32
POOL_SAMPLES = 16384


def make_body():
    return nn.Sequential(nn.Linear(IN, HID), nn.LayerNorm(HID), nn.ReLU(),
                         nn.Linear(HID, HID), nn.LayerNorm(HID), nn.ReLU())


class Adapter(nn.Module):
    """Houlsby bottleneck adapter: y = h + up(relu(down(h))), up zero-initialised."""

    def __init__(self, d, r):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(torch.relu(self.down(h)))


class Model(nn.Module):
    def __init__(self, adapter=False):
        super().__init__()
        self.body = make_body()
        self.adapter = Adapter(HID, BOTTLENECK) if adapter else None
        self.head = nn.Linear(HID, OUT)

    def forward(self, x):
        h = self.body(x)
        if self.adapter is not None:
            h = self.adapter(h)
        return self.head(h)


def build(policy):
    if policy == "finetune":
        return Model()
    if policy == "head":  # body frozen, only the head trains (the GPU comparison's second policy)
        m = Model()
        for p in m.body.parameters():
            p.requires_grad_(False)
        return m
    if policy == "adapter":
        m = Model(adapter=True)
        for p in m.body.parameters():
            p.requires_grad_(False)
        return m
    if policy == "lora":
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["body.0", "body.3"],
                         modules_to_save=["head"], bias="none")
        return get_peft_model(Model(), cfg)
    raise SystemExit(f"unknown policy {policy}")


def quantile(values, q):
    """Nearest-rank quantile, as bench::quantile in benchmarks/common.hpp."""
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def measure(policy, batch):
    torch.manual_seed(0)
    model = build(policy).to(args.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    # A pool of POOL_SAMPLES random samples with random labels, cycled batch by
    # batch: the loss stays near ln 5 instead of collapsing on one memorised
    # batch (which drives gradients and Adam's second moments into denormals).
    nb = max(1, POOL_SAMPLES // batch)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(nb, batch, IN, generator=gen).to(args.device)
    ys = torch.randint(0, OUT, (nb, batch), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    loss_fn = nn.CrossEntropyLoss()
    it = [0]
    last = [0.0]

    def step():
        i = it[0] % nb
        it[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xs[i]), ys[i])
        loss.backward()
        opt.step()
        last[0] = loss.detach()

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    steps = max(20, args.steps * 64 // batch)
    start = time.perf_counter()
    while len(times) < steps or (time.perf_counter() - start < args.min_time and len(times) < 50 * steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    impl = "torch-cuda" if args.device == "cuda" else "torch"
    print(f"STEP impl={impl} policy={policy} batch={batch} median_ms={statistics.median(times):.4f} "
          f"p10_ms={quantile(times, 0.1):.4f} p90_ms={quantile(times, 0.9):.4f} steps={len(times)} "
          f"trainable={trainable} threads={args.threads} loss={float(last[0]):.4f}",
          flush=True)


def gemm():
    """torch.mm GFLOP/s, median of repeated runs: n^3 squares as BM_Gemm, and the
    first body Linear's forward shape at batch 1024 (x [1024,784] times W^T [784,256])."""
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (1024, 784, 256)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        c = torch.mm(a, b)
        reps = max(5, int(2e10 / (2 * m * k * n)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"GEMM impl=torch m={m} k={k} n={n} median_ms={t * 1e3:.4f} gflops={2 * m * k * n / t / 1e9:.1f} "
              f"reps={reps} threads={args.threads}", flush=True)


def main():
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}, {torch.__config__.parallel_info().splitlines()[0]}",
          file=sys.stderr)
    if args.gemm:
        gemm()
    for policy in args.policies.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            measure(policy, batch)


if __name__ == "__main__":
    main()

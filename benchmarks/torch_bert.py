#!/usr/bin/env python3
"""PyTorch side of the transformer benchmarks on the pre-trained
all-MiniLM-L6-v2 (6-layer BERT, hidden 384; scripts/fetch-model puts it in the
cache). Never part of CI; needs torch, transformers and peft.

Configurations (random token ids from a seeded generator, ids 1000..30521,
token types 0, full attention mask, no pooler layer):
    infer-32x64, infer-1x16        BertModel in eval mode under torch.no_grad():
                                   sentences/s (batch / median seconds per forward)
    lora-8x32, lora-32x64          one training step with PEFT LoRA r=8, alpha 16,
                                   on query and value (lora_dropout 0), base frozen
    finetune-8x32, finetune-32x64  one training step with every weight trainable
    infer-32x128, lora-32x128, finetune-32x128
                                   the same at 32 x 128 tokens (the GPU comparison's shapes)
    lora_bf16-8x32, lora_bf16-32x128
                                   the LoRA step under torch.autocast(bfloat16): fp32
                                   weights and AdamW, bf16 matrix products (bert_gpu's
                                   lora_bf16 stores the model in bf16 with fp32 masters)
With --device cuda everything runs on the GPU in fp32 but lora_bf16 (each timed call ends
with torch.cuda.synchronize()); benchmarks/gpu/bert_gpu is the patchwork side
and prints the same JSON lines with "patchwork.bert_gpu." for "torch-cuda.bert.".
One training step = zero_grad, forward (train mode, dropout probabilities set to
--dropout, 0 by default so both sides compute the same function), mean pooling
over the tokens, Linear(384, 4) head, cross-entropy (mean) against seeded random
labels, backward, AdamW step (lr 1e-4, weight decay 0.01) on the trainable
parameters (LoRA factors and head, or everything and head). Reported: median
ms/step of --iters timed steps after --warmup steps (p10 and p90 in the table),
and the median CPU time of the process per step (its threads added up: close
to threads x wall time on an idle machine; it includes the thread pool's
spin-waiting, so on a loaded machine it grows too and only flags the load).

Peak memory: each configuration of --memory (default lora-8x32 and, for
context, finetune-8x32) runs again in a fresh process (`--only NAME`), which
reports resource.getrusage's ru_maxrss after its steps (the process peak, model
loading included; VmHWM of /proc/self/status beside it, which should agree) and
its RSS just before the model is loaded (Python, torch, transformers and peft
imported). These runs come first, before this process imports torch.

Measure on an idle machine. On the 2-core build machine with one other busy
process (load average about 2-3), 2 threads were far slower than 1: inference
1x16 486 ms against 19 ms, LoRA 8x32 3.7 s against 0.19 s per step, with CPU
time equal to wall time (one thread of the pool spins while the other waits
for a core). A table whose cpu ms is not near 2x the median ms was loaded;
--threads 1 gives figures that hold up better there.

Output: one JSON object a line, {"name": ..., "value": ..., "unit": ...}, then a
table for people (lines starting with '#').

    python3 benchmarks/torch_bert.py [--iters 20] [--warmup 3] [--only lora-8x32]
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ["infer-32x64", "infer-1x16", "lora-8x32", "lora-32x64", "finetune-8x32", "finetune-32x64",
           "infer-32x128", "lora-32x128", "finetune-32x128", "lora_bf16-8x32", "lora_bf16-32x128"]
SEED = 1234
CLASSES = 4


def parse_args():
    cache = os.environ.get("PATCHWORK_MODEL_DIR", os.path.join(os.path.expanduser("~"), ".cache/patchwork/models"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(cache, "all-MiniLM-L6-v2"), help="model folder")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--iters", type=int, default=20, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    p.add_argument("--only", metavar="NAME", help="run only NAME in this process and report its peak RSS")
    p.add_argument("--memory", default="lora-8x32,finetune-8x32",
                   help="configurations whose peak RSS is measured in a fresh process ('' for none)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probabilities in training")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention kernel")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs (cuda: the side of benchmarks/gpu/bert_gpu, fp32, eager)")
    args = p.parse_args()
    for name in ([args.only] if args.only else args.configs.split(",")) + [m for m in args.memory.split(",") if m]:
        if name not in CONFIGS:
            p.error(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    if not os.path.isfile(os.path.join(args.model, "model.safetensors")):
        p.error(f"no model.safetensors in {args.model} (run scripts/fetch-model, or pass --model)")
    return args


def memory_of(name):
    """Peak RSS of `name` in a fresh process: [(json name, value, unit)]. Called
    before this process imports torch: Linux carries the parent's ru_maxrss
    over to a child (fork copies the pages, exec keeps the high-water mark), so
    a parent with a model loaded would set the child's figure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--iters", "3", "--warmup", "1",
           "--model", args.model, "--threads", str(args.threads), "--dropout", str(args.dropout),
           "--attention", args.attention, "--device", args.device]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    out = []
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            if any(k in obj["name"] for k in (".peak_rss.", ".rss_before_load.", ".vm_hwm.")):
                out.append((obj["name"], obj["value"], obj["unit"]))
    return out


args = parse_args()
PREFIX = "torch-cuda" if args.device == "cuda" else "torch"  # the JSON names' first part
memory = [] if args.only else [line for m in args.memory.split(",") if m for line in memory_of(m)]
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch starts its pools
import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
transformers.logging.set_verbosity_error()


def status_mib(field):
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak of this program image) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load(training):
    from transformers import BertModel
    kw = {"attn_implementation": args.attention, "add_pooling_layer": False}
    if training:
        kw.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    model = BertModel.from_pretrained(args.model, **kw).to(args.device)
    model.train(training)
    return model


def inputs(batch, tokens):
    g = torch.Generator().manual_seed(SEED + batch * 1000 + tokens)
    ids = torch.randint(1000, 30522, (batch, tokens), generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    enc = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    return {k: v.to(args.device) for k, v in enc.items()}, labels.to(args.device)


def timed(fn, iters, warmup):
    """Wall seconds of each timed call, and the median CPU seconds of this
    process per call (all its threads)."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, cpu = [], []
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, statistics.median(cpu)


def quantile(times, q):
    s = sorted(times)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_config(name):
    """Returns [(json name, value, unit)] and a table row."""
    kind, shape = name.split("-")
    batch, tokens = map(int, shape.split("x"))
    enc, labels = inputs(batch, tokens)
    if kind == "infer":
        model = load(training=False)

        def forward():
            with torch.no_grad():
                model(**enc)
        times, cpu = timed(forward, args.iters, args.warmup)
        med = statistics.median(times)
        return ([(f"{PREFIX}.bert.infer.{shape}", batch / med, "sentences/s"),
                 (f"{PREFIX}.bert.infer.{shape}.ms", med * 1e3, "ms/batch"),
                 (f"{PREFIX}.bert.infer.{shape}.cpu_ms", cpu * 1e3, "cpu-ms/batch")],
                (name, med * 1e3, quantile(times, 0.1) * 1e3, quantile(times, 0.9) * 1e3,
                 f"{batch / med:.1f} sentences/s", cpu * 1e3))
    torch.manual_seed(SEED)
    model = load(training=True)
    if kind in ("lora", "lora_bf16"):
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, bias="none")
        model = peft.get_peft_model(model, config)
        model.train()
    head = torch.nn.Linear(384, CLASSES).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    last = {}

    # lora_bf16: the same step under autocast to bf16 (fp32 weights and optimiser,
    # bf16 matrix products), PyTorch's usual mixed precision.
    amp = (torch.autocast(device_type=args.device, dtype=torch.bfloat16) if kind == "lora_bf16"
           else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        opt.step()
        last["loss"] = loss.item()
    times, cpu = timed(step, args.iters, args.warmup)
    med = statistics.median(times)
    trainable = sum(p.numel() for p in params)
    return ([(f"{PREFIX}.bert.train.{kind}.{shape}", med * 1e3, "ms/step"),
             (f"{PREFIX}.bert.train.{kind}.{shape}.cpu_ms", cpu * 1e3, "cpu-ms/step")],
            (name, med * 1e3, quantile(times, 0.1) * 1e3, quantile(times, 0.9) * 1e3,
             f"{trainable:,} trainable, loss {last['loss']:.4f}", cpu * 1e3))


def emit(name, value, unit):
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit}), flush=True)


def main():
    if args.only:
        before = status_mib("VmRSS")
        lines, _ = run_config(args.only)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        kind, shape = args.only.split("-")
        for line in lines + [(f"{PREFIX}.bert.peak_rss.{kind}.{shape}", peak, "MiB"),
                             (f"{PREFIX}.bert.vm_hwm.{kind}.{shape}", status_mib("VmHWM"), "MiB"),
                             (f"{PREFIX}.bert.rss_before_load.{kind}.{shape}", before, "MiB")]:
            emit(*line)
        return
    rows = []
    load_before = os.getloadavg()[0]
    for name in args.configs.split(","):
        lines, row = run_config(name)
        for line in lines:
            emit(*line)
        rows.append(row)
    for line in memory:
        emit(*line)
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), attention {args.attention}, "
          f"{args.iters} timed after {args.warmup} warm-up, "
          f"1-minute load average {load_before:.2f} before the timings, {os.getloadavg()[0]:.2f} after")
    print(f"# {'config':<16} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'cpu ms':>9}  notes")
    for name, med, p10, p90, note, cpu in rows:
        print(f"# {name:<16} {med:>10.2f} {p10:>9.2f} {p90:>9.2f} {cpu:>9.2f}  {note}")
    for name, value, unit in memory:
        print(f"# {name:<40} {value:>9.1f} {unit}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The PyTorch + PEFT side of examples/text_transfer, on identical inputs.

Run by hand (never by CI). It needs torch, transformers and peft from pip,
the model cached by scripts/fetch-model, and the tokenized examples that
text_transfer writes with --dump-data, so both sides see the same synsets,
token ids and labels:

    build/examples/text_transfer/text_transfer --methods head --seeds 1 --dump-data /tmp/tt.jsonl ...
    python3 examples/text_transfer/text_transfer_torch.py --data /tmp/tt.jsonl --csv torch.csv [options]

Options mirror text_transfer's: --methods, --seeds, --seed, --epochs, --batch,
--head-lr, --lr-METHOD, --threads (default 2). The recipe is the same:
transformers' BertModel (float32, dropout off), mean pooling over the real
tokens, a Linear(384, C) head (Kaiming-uniform weight with gain 1, zero bias),
cross-entropy, AdamW (weight decay 0.01, PyTorch's betas and eps), the head in
its own group at --head-lr, 10 % linear warm-up then cosine decay to 0, each
epoch in a fresh seeded order, batches padded to their longest text, test
accuracy at the end. The methods:

    head      the encoder frozen
    bitfit    the bias of every Linear of the encoder (requires_grad; not the
              LayerNorm shifts, as patchwork's BiasOnly)
    ln        PEFT's LNTuningConfig on every LayerNorm (embeddings included)
    pfeiffer  a bottleneck adapter (384 -> 24 -> 384, ReLU, residual) on each
              FFN output projection, before the residual sum and LayerNorm
    houlsby   the same with GELU on the attention output projection as well
    lora      PEFT LoraConfig(r=8, lora_alpha=16, target query and value, no dropout)
    finetune  every parameter

PEFT has no bottleneck adapters, so those two are forward hooks here with
text_transfer's initialisation (down-projection Kaiming-uniform with gain
sqrt(2), up-projection and both biases zero). Prints one line per run and
writes the same CSV columns as text_transfer (method, seed, accuracy,
trainable, seconds_per_epoch, final_loss, lr) plus peak_rss_mib (the
process's, so run one method per process to read it per method).
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import transformers
import peft

DEFAULT_LR = {"head": 0.0, "bitfit": 1e-3, "ln": 1e-3, "pfeiffer": 1e-3, "houlsby": 1e-3, "lora": 5e-4,
              "finetune": 5e-5}


def model_dir():
    base = os.environ.get("PATCHWORK_MODEL_DIR") or os.path.join(os.environ.get("HOME", "/root"),
                                                                 ".cache/patchwork/models")
    return os.path.join(base, "all-MiniLM-L6-v2")


def load_data(path):
    splits = {"train": ([], []), "test": ([], [])}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            splits[r["split"]][0].append(r["ids"])
            splits[r["split"]][1].append(r["label"])
    return splits


def batch(ids, labels, idx):
    n = max(len(ids[i]) for i in idx)
    x = torch.zeros(len(idx), n, dtype=torch.long)
    m = torch.zeros(len(idx), n, dtype=torch.long)
    for r, i in enumerate(idx):
        x[r, :len(ids[i])] = torch.tensor(ids[i])
        m[r, :len(ids[i])] = 1
    return x, m, torch.tensor([labels[i] for i in idx])


class Bottleneck(torch.nn.Module):
    """y = h + U act(D h + b_d) + b_u, identity at the start."""

    def __init__(self, d, r, act):
        super().__init__()
        self.down = torch.nn.Linear(d, r)
        self.up = torch.nn.Linear(r, d)
        bound = math.sqrt(2.0) * math.sqrt(3.0 / d)
        torch.nn.init.uniform_(self.down.weight, -bound, bound)
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.act = act

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


def add_adapters(bert, houlsby, width=24):
    adapters = torch.nn.ModuleList()
    act = torch.nn.GELU() if houlsby else torch.nn.ReLU()
    for layer in bert.encoder.layer:
        targets = [layer.output.dense] + ([layer.attention.output.dense] if houlsby else [])
        for t in targets:
            a = Bottleneck(bert.config.hidden_size, width, act)
            adapters.append(a)
            t.register_forward_hook(lambda mod, inp, out, a=a: a(out))
    return adapters


def build(method, seed):
    torch.manual_seed(seed)
    bert = transformers.BertModel.from_pretrained(model_dir(), hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0, add_pooling_layer=False)
    bert.requires_grad_(False)
    extra = []
    if method == "bitfit":
        for n, p in bert.named_parameters():
            if n.endswith(".bias") and "LayerNorm" not in n:
                p.requires_grad_(True)
    elif method == "finetune":
        bert.requires_grad_(True)
    elif method == "ln":
        bert = peft.get_peft_model(bert, peft.LNTuningConfig(target_modules=["LayerNorm"]))
    elif method == "lora":
        bert = peft.get_peft_model(bert, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=["query", "value"]))
    elif method in ("pfeiffer", "houlsby"):
        extra = list(add_adapters(bert, method == "houlsby").parameters())
    trainable = [p for p in bert.parameters() if p.requires_grad] + extra
    return bert, trainable


def run(method, seed, data, a):
    bert, params = build(method, seed)
    classes = max(data["train"][1] + data["test"][1]) + 1
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(bert.config.hidden_size, classes)
    bound = math.sqrt(3.0 / bert.config.hidden_size)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    lr = a.lr.get(method, DEFAULT_LR[method])
    groups = [{"params": list(head.parameters()), "lr": a.head_lr}]
    if params:
        groups.append({"params": params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    ids, labels = data["train"]
    n = len(ids)
    per_epoch = (n + a.batch - 1) // a.batch
    total = per_epoch * a.epochs
    warm = max(1, total // 10)

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))) if s < total else 0.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    trainable = sum(p.numel() for p in params)
    seconds, loss_sum = 0.0, 0.0
    bert.train(False)  # dropout is off anyway; eval mode keeps every module deterministic

    def embed(x, m):
        h = bert(input_ids=x, attention_mask=m).last_hidden_state
        mf = m.unsqueeze(-1).to(h.dtype)
        return (h * mf).sum(1) / mf.sum(1)

    for epoch in range(a.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        t0 = time.perf_counter()
        loss_sum = 0.0
        for b in range(0, n, a.batch):
            x, m, y = batch(ids, labels, order[b:b + a.batch])
            opt.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(True):
                loss = torch.nn.functional.cross_entropy(head(embed(x, m)), y)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
        seconds += time.perf_counter() - t0
        if not a.quiet:
            print(f"    {method:9s} seed {seed}  epoch {epoch + 1}: mean loss {loss_sum / per_epoch:.4f}"
                  f"  ({seconds:.1f} s)", flush=True)
    correct = 0
    tids, tlabels = data["test"]
    with torch.no_grad():
        for b in range(0, len(tids), 64):
            x, m, y = batch(tids, tlabels, list(range(b, min(len(tids), b + 64))))
            correct += int((head(embed(x, m)).argmax(1) == y).sum())
    return correct / len(tids), trainable, seconds / a.epochs, loss_sum / per_epoch, lr


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--methods", default="head,bitfit,ln,pfeiffer,houlsby,lora,finetune")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv")
    p.add_argument("--quiet", action="store_true")
    for m in DEFAULT_LR:
        p.add_argument(f"--lr-{m}", type=float)
    a = p.parse_args()
    a.lr = {m: getattr(a, f"lr_{m}") for m in DEFAULT_LR if getattr(a, f"lr_{m}") is not None}
    torch.set_num_threads(a.threads)
    data = load_data(a.data)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{a.threads} threads; {len(data['train'][0])} training and {len(data['test'][0])} test texts", flush=True)
    out = open(a.csv, "w") if a.csv else None
    if out:
        out.write("method,seed,accuracy,trainable,seconds_per_epoch,final_loss,lr,peak_rss_mib\n")
    for method in a.methods.split(","):
        if method not in DEFAULT_LR:
            sys.exit(f"unknown method {method!r}")
        for s in range(a.seed, a.seed + a.seeds):
            acc, trainable, spe, loss, lr = run(method, s, data, a)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  {method:9s} seed {s}: test accuracy {acc:.4f}, {trainable} trainable besides the head, "
                  f"{spe:.1f} s per epoch, peak RSS {rss:.0f} MiB", flush=True)
            if out:
                out.write(f"{method},{s},{acc},{trainable},{spe},{loss},{lr},{rss:.0f}\n")
                out.flush()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks the fixtures of this folder against the recipe README.md states,
without transformers or peft: the encoder written out from model.safetensors
with plain torch operations in float64 (what a C++ implementation does), the
LoRA step as README.md describes it, gradients by autograd, and one finite
difference per gradient tensor. By hand, never in CI:

    python3 tests/data/minilm/check_reference.py [--model DIR]

Prints the largest relative errors and exits non-zero when one is above 1e-9
(float64 against float64) or the stored token ids disagree with texts.txt.
"""
import argparse
import math
import os
import pathlib
import sys

import torch
from safetensors.torch import load_file

HEADS, EPS, LAYERS = 12, 1e-12, 6


def encoder(w, ids, types, mask, lora=None, scale=2.0):
    """Last hidden state [B, T, 384] of BERT; lora: {(layer, 'query'|'value'): (A, B)}."""
    B, T = ids.shape
    pos = torch.arange(T)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos] \
        + w["embeddings.token_type_embeddings.weight"][types]
    x = layer_norm(x, w, "embeddings.LayerNorm")
    bias = (1.0 - mask.to(x.dtype))[:, None, None, :] * -1e300  # pad keys get no weight
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."

        def proj(name):
            y = linear(x, w, p + f"attention.self.{name}")
            if lora and (i, name) in lora:
                a, b = lora[(i, name)]
                y = y + scale * (x @ a.T) @ b.T
            return y
        q, k, v = (proj(n).view(B, T, HEADS, -1).transpose(1, 2) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = layer_norm(x + linear(ctx, w, p + "attention.output.dense"), w, p + "attention.output.LayerNorm")
        h = linear(x, w, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = layer_norm(x + linear(h, w, p + "output.dense"), w, p + "output.LayerNorm")
    return x


def linear(x, w, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def layer_norm(x, w, name):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w[name + ".weight"] + w[name + ".bias"]


def mean_pool(h, mask):
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    here = pathlib.Path(__file__).resolve().parent
    cache = pathlib.Path(os.environ.get("PATCHWORK_MODEL_DIR", pathlib.Path.home() / ".cache/patchwork/models"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(cache / "all-MiniLM-L6-v2"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    w = {k: v.double() for k, v in load_file(os.path.join(args.model, "model.safetensors")).items()}
    worst = {}

    ref = load_file(str(here / "reference.safetensors"))
    texts = (here / "texts.txt").read_text(encoding="utf-8").splitlines()
    from transformers import BertTokenizer  # only to re-check the stored ids
    tok = BertTokenizer.from_pretrained(args.model)
    enc = tok(texts, padding="longest", truncation=True, max_length=128, return_tensors="pt")
    ids_ok = all(torch.equal(enc[k], ref[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
    ids_ok &= torch.equal(ref["lengths"], ref["attention_mask"].sum(1))
    # transformers 5's BertTokenizer runs on the Rust `tokenizers`; the Python
    # implementation (BertTokenizerLegacy) must give the same ids on these texts.
    legacy = getattr(__import__("transformers"), "BertTokenizerLegacy", None)
    if legacy is not None:
        slow = legacy(os.path.join(args.model, "vocab.txt"), do_lower_case=True, tokenize_chinese_chars=True,
                      strip_accents=None)
        senc = slow(texts, padding="longest", truncation=True, max_length=128, return_tensors="pt")
        ids_ok &= all(torch.equal(senc[k], ref[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        h = encoder(w, ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    packed = h[ref["attention_mask"].bool()]
    worst["hidden f64"] = rel(packed, ref["last_hidden_state_packed_f64"])
    worst["embedding f64"] = rel(mean_pool(h, ref["attention_mask"]), ref["sentence_embedding_f64"])
    worst["hidden f32 vs f64 (per token, max)"] = float(
        ((ref["last_hidden_state_packed"].double() - packed).norm(dim=1) / packed.norm(dim=1)).max())
    # Packing order: row 0's real tokens first, each row on its own (no padding) gives the same.
    one = ref["lengths"][3].item()
    with torch.no_grad():
        alone = encoder(w, ref["input_ids"][3:4, :one], ref["token_type_ids"][3:4, :one],
                        ref["attention_mask"][3:4, :one])[0]
    start = ref["lengths"][:3].sum().item()
    worst["row 3 alone"] = rel(alone, ref["last_hidden_state_packed_f64"][start:start + one])

    step = load_file(str(here / "lora_step.safetensors"))
    names = [k for k in step if k.startswith("base_model.")]
    params = {n: step[n].double().requires_grad_() for n in names + ["head.weight", "head.bias"]}

    def loss_of(p):
        lora = {}
        for i in range(LAYERS):
            for m in ("query", "value"):
                base = f"base_model.model.encoder.layer.{i}.attention.self.{m}"
                lora[(i, m)] = (p[base + ".lora_A.weight"], p[base + ".lora_B.weight"])
        h = encoder(w, step["input_ids"], step["token_type_ids"], step["attention_mask"], lora)
        logits = mean_pool(h, step["attention_mask"]) @ p["head.weight"].T + p["head.bias"]
        return torch.nn.functional.cross_entropy(logits, step["labels"])

    loss = loss_of(params)
    loss.backward()
    worst["loss f64"] = abs(loss.item() - step["loss"].item()) / abs(step["loss"].item())
    worst["grad f64 (worst tensor)"] = max(rel(params[n].grad, step["grad." + n]) for n in params)
    sub = [enc["input_ids"][i] for i in step["text_index"].tolist()]
    ids_ok &= all(torch.equal(s[:int(m.sum())], r[:int(m.sum())])
                  for s, r, m in zip(sub, step["input_ids"], step["attention_mask"]))
    # Central differences on the largest-gradient entry of every tensor.
    fd_worst = 0.0
    with torch.no_grad():
        for n, p in params.items():
            g = step["grad." + n].double()
            j = int(g.abs().argmax())
            e = 1e-5
            orig = p.view(-1)[j].item()
            p.view(-1)[j] = orig + e
            up = loss_of(params).item()
            p.view(-1)[j] = orig - e
            down = loss_of(params).item()
            p.view(-1)[j] = orig
            fd_worst = max(fd_worst, abs((up - down) / (2 * e) - g.view(-1)[j].item()) / abs(g.view(-1)[j].item()))
    worst["finite difference (worst tensor, largest entry)"] = fd_worst

    for k, v in worst.items():
        print(f"{k:<50} {v:.3e}")
    print("token ids match texts.txt:", ids_ok)
    limits = {"hidden f32 vs f64 (per token, max)": 1e-5, "finite difference (worst tensor, largest entry)": 1e-6}
    bad = [k for k, v in worst.items() if v > limits.get(k, 1e-9)] + ([] if ids_ok else ["token ids"])
    if bad:
        print("FAILED:", ", ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()

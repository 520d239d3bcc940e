#!/usr/bin/env python3
"""Writes the PEFT fixtures of tests/test_peft.cpp (run by hand, never by CI).

    python3 tests/data/peft/make_fixtures.py

A tiny random BertModel (hidden 32, 2 layers, 4 heads, intermediate 64,
vocab 100, 40 positions), a PEFT LoRA adapter on it (r = 4, lora_alpha = 8,
query and value, seeded non-zero A and B) saved by PEFT's save_pretrained,
a padded batch of token ids and PEFT's last hidden states in float32 and
float64. Everything is seeded; see README.md for what each file holds.
"""
import json
import os
import shutil
import sys

import torch
import peft
import safetensors
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240609

torch.set_num_threads(1)
torch.manual_seed(SEED)
gen = torch.Generator().manual_seed(SEED)

config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
                    hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager")
model = BertModel(config, add_pooling_layer=False).eval()
# Every weight drawn again, larger than BERT's 0.02 init so the layers do more
# than pass the embeddings through; LayerNorm scales around 1.
with torch.no_grad():
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))

base_dir = os.path.join(HERE, "base")
shutil.rmtree(base_dir, ignore_errors=True)
model.save_pretrained(base_dir, safe_serialization=True)
model.name_or_path = "tiny-random-bert"

lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, bias="none")
pm = get_peft_model(model, lora).eval()
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))

adapter_dir = os.path.join(HERE, "adapter")
shutil.rmtree(adapter_dir, ignore_errors=True)
pm.save_pretrained(adapter_dir)
os.remove(os.path.join(adapter_dir, "README.md"))  # PEFT's model card template; not a fixture

# A padded batch: lengths 9, 4, 12 (T = 12), ids 1..99 with [CLS] = 2 and
# [SEP] = 3 at the ends, token types 0 except the second half of row 2.
lengths = [9, 4, 12]
B, T = len(lengths), max(lengths)
input_ids = torch.zeros(B, T, dtype=torch.int64)
token_type_ids = torch.zeros(B, T, dtype=torch.int64)
attention_mask = torch.zeros(B, T, dtype=torch.int64)
for b, n in enumerate(lengths):
    input_ids[b, :n] = torch.randint(4, 100, (n,), generator=gen)
    input_ids[b, 0], input_ids[b, n - 1] = 2, 3
    attention_mask[b, :n] = 1
token_type_ids[2, 6:12] = 1


def run(m):
    with torch.no_grad():
        return m(input_ids=input_ids, token_type_ids=token_type_ids,
                 attention_mask=attention_mask).last_hidden_state.contiguous()


h32 = run(pm)
with pm.disable_adapter():
    base32 = run(pm)
pm64 = pm.double()
h64 = run(pm64)
err = ((h32.double() - h64).norm(dim=-1) / h64.norm(dim=-1))[attention_mask.bool()].max().item()
diff = ((h32 - base32).norm(dim=-1) / base32.norm(dim=-1))[attention_mask.bool()].min().item()

versions = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                safetensors=safetensors.__version__)
save_file({
    "input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
    "last_hidden_state": h32, "last_hidden_state_f64": h64, "base_last_hidden_state": base32,
}, os.path.join(HERE, "outputs.safetensors"),
    metadata={"source": "tests/data/peft/make_fixtures.py", "versions": json.dumps(versions)})
print("versions", versions)
print("float32 against float64, worst token vector relative error: %.3g" % err)
print("adapter on against off, smallest token vector relative change: %.3g" % diff)

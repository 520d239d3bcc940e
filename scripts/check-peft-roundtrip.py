#!/usr/bin/env python3
"""By-hand check: PEFT loads an adapter that patchwork trained and saved, and
gives patchwork's outputs. Not run by CI (it needs torch, transformers, peft).

    scripts/check-peft-roundtrip.py [BUILD_DIR]      # default: build

1. Runs BUILD_DIR/tests/test_peft's training test with PATCHWORK_PEFT_EXPORT
   set: patchwork trains the LoRA factors of the tiny BERT of tests/data/peft
   for 20 steps, writes the adapter with save_peft_lora (adapter_config.json,
   adapter_model.safetensors) and its own last hidden states.
2. Loads the tiny BERT with transformers, the adapter with
   PeftModel.from_pretrained, runs the fixture's padded batch and compares the
   hidden states at the real tokens with patchwork's (relative error per token
   vector). Exits 1 when the worst is above 1e-5 or PEFT did not take the
   adapter as saved.
"""
import os
import subprocess
import sys
import tempfile

import torch
import peft
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "peft")


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
    exe = os.path.join(build, "tests", "test_peft")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="peft_roundtrip_") as out:
        env = dict(os.environ, PATCHWORK_PEFT_EXPORT=out, PATCHWORK_TEST_DATA=os.path.join(ROOT, "tests", "data"))
        run = subprocess.run([exe, "-tc=a LoRA adapter trained by patchwork*"], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "(no output)")
        if run.returncode != 0:
            print(run.stdout, run.stderr)
            return 1
        print("patchwork wrote:", sorted(os.listdir(out)))

        base = BertModel.from_pretrained(os.path.join(DATA, "base"), attn_implementation="eager",
                                         add_pooling_layer=False).eval()
        model = PeftModel.from_pretrained(base, out).eval()
        cfg = model.peft_config["default"]
        print("PEFT config: peft_type %s, r %d, lora_alpha %s, target_modules %s"
              % (cfg.peft_type.value, cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)))

        saved = load_file(os.path.join(out, "adapter_model.safetensors"))
        state = model.state_dict()
        worst_factor = 0.0
        for key, value in saved.items():
            live = state[key.replace(".lora_A.weight", ".lora_A.default.weight")
                            .replace(".lora_B.weight", ".lora_B.default.weight")]
            worst_factor = max(worst_factor, (live - value).abs().max().item())
        print("LoRA factors: %d tensors in the file, largest difference from PEFT's loaded copy %g"
              % (len(saved), worst_factor))

        ref = load_file(os.path.join(DATA, "outputs.safetensors"))
        mask = ref["attention_mask"]
        with torch.no_grad():
            h = model(input_ids=ref["input_ids"], token_type_ids=ref["token_type_ids"],
                      attention_mask=mask).last_hidden_state
        ours = load_file(os.path.join(out, "patchwork_outputs.safetensors"))["last_hidden_state"]
        real = mask.bool()
        err = ((h - ours).norm(dim=-1) / h.norm(dim=-1))[real]
        moved = ((ref["last_hidden_state"] - ours).norm(dim=-1) / ours.norm(dim=-1))[real]
        print("hidden states, %d real tokens: PEFT against patchwork, relative error per token vector: "
              "max %.3g, median %.3g" % (err.numel(), err.max().item(), err.median().item()))
        print("(the trained adapter moved the outputs from the fixture adapter's by %.3g per token vector, median)"
              % moved.median().item())
        print("versions: torch %s, transformers %s, peft %s" % (torch.__version__, transformers.__version__,
                                                                 peft.__version__))
        ok = err.max().item() <= 1e-5 and worst_factor == 0.0
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Hugging Face side of benchmarks/tokenizer_bench.cpp: the same WordNet texts, one thread.

    python3 benchmarks/torch_tokenizer.py [--model-dir DIR] [--reps N] [--python-sample N]

Tokenizes every WordNet gloss text (lemmas joined by ", ", then ": ", then the
gloss: io/wordnet.hpp's Synset::text()) with the Rust `tokenizers` library
reading all-MiniLM-L6-v2's tokenizer.json, no truncation, no padding,
RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false:
    encode          Tokenizer.encode(text) per text
    encode_batch    Tokenizer.encode_batch over 128 texts at a time, truncated to
                    128 tokens and padded to the longest (as tokenizer_bench's encode_batch)
and, on the first --python-sample texts, transformers' Python BertTokenizer
(the reference the C++ tokenizer matches; very slow, for scale only).
Each mode runs --reps times over the corpus; the best (least disturbed) run
counts. CPU time is process time, which excludes time lost to other processes.

Output, one line per mode:
    TOKENIZER impl=<impl> mode=<mode> texts=<n> mb=<MB> best_s=<s> cpu_s=<s> texts_per_s=<r> mb_per_s=<r>
              texts_per_cpu_s=<r> mb_per_cpu_s=<r> tokens=<t>
(MB = 10^6 bytes of UTF-8; Google Benchmark's bytes_per_second in tokenizer_bench
counts 2^20-byte MiB and uses CPU time.)
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer"))
from make_fixture import FILES, read_synsets  # noqa: E402  (the same text format as the fixture)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path(
        os.environ.get("PATCHWORK_MODEL_DIR", Path.home() / ".cache/patchwork/models")) / "all-MiniLM-L6-v2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--python-sample", type=int, default=5000)
    return p.parse_args()


def run(impl, mode, texts, reps, fn):
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    best, best_cpu, tokens = float("inf"), float("inf"), 0
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        tokens = fn(texts)
        t1, c1 = time.perf_counter(), time.process_time()
        best, best_cpu = min(best, t1 - t0), min(best_cpu, c1 - c0)
    print(f"TOKENIZER impl={impl} mode={mode} texts={len(texts)} mb={mb:.2f} best_s={best:.3f} cpu_s={best_cpu:.3f} "
          f"texts_per_s={len(texts) / best:.0f} mb_per_s={mb / best:.2f} texts_per_cpu_s={len(texts) / best_cpu:.0f} "
          f"mb_per_cpu_s={mb / best_cpu:.2f} tokens={tokens}", flush=True)


def main():
    args = parse_args()
    from tokenizers import Tokenizer
    import tokenizers

    texts = [text for pos in FILES for _, text in read_synsets(pos)]
    tok = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    print(f"# tokenizers {tokenizers.__version__}, {len(texts)} texts, RAYON_NUM_THREADS=1", flush=True)

    def per_text(ts):
        return sum(len(tok.encode(t).ids) for t in ts)

    batched = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    batched.enable_truncation(128)
    batched.enable_padding(pad_id=0, pad_token="[PAD]")

    def per_batch(ts):
        n = 0
        for i in range(0, len(ts), 128):
            for e in batched.encode_batch(ts[i:i + 128]):
                n += sum(e.attention_mask)
        return n

    run("hf_tokenizers", "encode", texts, args.reps, per_text)
    run("hf_tokenizers", "encode_batch", texts, args.reps, per_batch)

    if args.python_sample > 0:
        import transformers
        Slow = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
        slow = Slow(str(args.model_dir / "vocab.txt"), do_lower_case=True)
        run("hf_python", "encode", texts[:args.python_sample], 1, lambda ts: sum(len(slow(t)["input_ids"]) for t in ts))


if __name__ == "__main__":
    main()

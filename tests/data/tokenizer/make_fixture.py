#!/usr/bin/env python3
"""Reference ids for tests/test_tokenizer.cpp, from Hugging Face's Python BERT tokenizer.
(fixture.jsonl.gz was made with transformers 5.24.0, tokenizers 0.23.3, Python 3.11.7.)

    python3 tests/data/tokenizer/make_fixture.py [MODEL_DIR]

MODEL_DIR holds all-MiniLM-L6-v2's vocab.txt and tokenizer.json (default:
$PATCHWORK_MODEL_DIR/all-MiniLM-L6-v2, else ~/.cache/patchwork/models/all-MiniLM-L6-v2).
Needs transformers (5.x: the Python implementation is BertTokenizerLegacy; 4.x:
BertTokenizer) and tokenizers; neither is needed by the library or its tests.

Writes fixture.jsonl.gz beside this script, one JSON object per line:
  {"kind": "wordnet", "pos": "noun", "offset": 1740, "ids": [...]}
      a WordNet synset's text (lemmas joined by ", ", then ": ", then the gloss;
      the C++ test rebuilds it from /usr/share/wordnet with io/wordnet.hpp)
  {"kind": "text", "text": "...", "ids": [...]}
      a hand-made edge case or one of 1,000 seeded random strings over many
      Unicode blocks, [CLS] ... [SEP] without truncation
  {"kind": "pair", "a": REF, "b": REF, "max_length": N, "ids": [...], "type_ids": [...]}
  {"kind": "single", "a": REF, "max_length": N, "ids": [...]}
      truncated encodings (longest first for pairs)
  {"kind": "batch", "texts": [REF...], "padding": "longest"|"max_length", "max_length": N,
   "ids": [[...]], "type_ids": [[...]], "mask": [[...]]}
REF is a literal string or {"wn": [pos, offset]}.

It also encodes everything with BertTokenizerFast (the Rust tokenizers library
reading tokenizer.json) and lists every disagreement with the Python reference
in fast_disagreements.txt.
"""
import gzip
import json
import os
import random
import sys
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
WORDNET = Path("/usr/share/wordnet")
FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
SAMPLE = {"noun": 2000, "verb": 1200, "adj": 1200, "adv": 600}  # 5,000 texts
SEED = 20261201


def read_synsets(pos):
    """(offset, text) for every synset of a data file, in file order."""
    out = []
    with open(WORDNET / FILES[pos], "rb") as f:
        for raw in f:
            if raw.startswith(b"  "):
                continue  # licence header
            line = raw.decode("utf-8").rstrip("\n")
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            w_cnt = int(fields[3], 16)
            lemmas = []
            for k in range(w_cnt):
                word = fields[4 + 2 * k]
                if word.endswith(")") and "(" in word:
                    word = word[: word.rindex("(")]  # adjective markers (a), (p), (ip)
                lemmas.append(word.replace("_", " "))
            gloss = gloss.rstrip(" \t\r\n")
            out.append((int(fields[0]), ", ".join(lemmas) + ": " + gloss))
    return out


EDGE_CASES = [
    "",
    " ",
    "   \t\n  \r\n ",
    "Hello, world!",
    "Café naïve Ångström",
    "CAFÉ NAÏVE ÅNGSTRÖM résumé façade coöperate",
    "e\u0301 vs \u00e9 (combining acute vs precomposed)",
    "a\u0308\u0301\u0323 stacked marks",
    "\u0301\u0302 marks alone",
    "中文字符测试：北京大学。",
    "日本語のテキスト、カタカナとひらがな",
    "한국어 텍스트 입니다",
    "漢字mixed中with英文letters",
    "\U00020000\U0002A700 extension ideographs \uF900\uFA0E compatibility ideographs",
    "emoji 😀 👍🏽 ❤️ 👨‍👩‍👧 🇫🇷",
    "العربية نص تجريبي مع تشكيل: كَتَبَ",
    "עברית טקסט עם ניקוד: שָׁלוֹם",
    "ภาษาไทย ทดสอบ",
    "हिन्दी पाठ परीक्षण",
    "Ελληνικά ΟΔΟΣ ΟΔΟΣ. ΣΟΦΟΣ Σ ΑΣ-Β ὈΔΥΣΣΕΎΣ",
    "Русский ТЕКСТ Ёлка",
    "İstanbul DİYARBAKIR ıi",
    "straße STRASSE ﬁne ﬂow Ǆ ǅ ǆ",
    "...!!!???---;;;::,,((()))[[[]]]{{{}}}",
    "a.b,c;d:e!f?g'h\"i(j)k[l]m{n}o<p>q=r+s$t^u`v|w~x@y#z%&*/\\_",
    "¡¿«»‹›„“”‘’—–…·•†‡§¶※",
    "price: $12.50, €3, £4, ¥5, 50%, 3×4÷2, ±1, ½",
    "supercalifragilisticexpialidocious" * 3 + "x",
    "a" * 100,
    "a" * 101,
    "é" * 101,
    "word " + "b" * 150 + " word",
    "control\x00chars\x01here\x07and\x1bthere\x7f\x85end",
    "tab\tnew\nline\rcarriage\x0bvt\x0cff",
    "zero\u200bwidth\u200cjoiner\u200dsoft\u00adhyphen\ufeffbom",
    "replacement \ufffd char",
    "no\u00a0break\u2003em\u3000ideographic\u2028line\u2029para",
    "private \ue000 use \U000F0000 and unassigned \U000E0080",
    "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３！？",
    "ｶﾀｶﾅ half-width katakana",
    "mixed CaSe WoRdS and UPPER lower",
    "don't won't it's O'Neill rock'n'roll",
    "e-mail self-driving state-of-the-art",
    "http://example.com/path?q=1&r=2#frag user@example.org",
    "numbers 1234567890 3.14159 1,000,000 1e-10",
    "[CLS] already [SEP] special [MASK] tokens [PAD] [UNK]",
    "lower [cls] [sep] and partial [CL S] [MASK",
    "x[MASK]y",
    "unaffable unbelievable antidisestablishmentarianism",
    "Ω ohm sign \u2126, Å angstrom sign \u212b, K kelvin \u212a",
    "ℌ𝔢𝔩𝔩𝔬 𝐁𝐨𝐥𝐝 ①②③ ㎏ ™ ﬀ",
    "ǅungla ǈubljana Ǌ",
    "ŉ ǰ ΐ ﬓ",
    "\u0130\u0307 dotted I with extra dot",
    "Ɐ Ɑ ẞ ß",
    "Ⓐⓑ ᵃᵇᶜ ª º",
    "tabs\t\t\tand   many     spaces",
    "\u1100\u1161\u11a8 conjoining jamo 각",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters and 🂡 cards",
    "﷽ ligature and ﷺ",
    "\u0f40\u0f71\u0f72 tibetan \U0001D165\U0001D16E",
    "Z\u0335\u0336a\u0337l\u0338g\u0334o zalgo",
    "a\u20dd enclosing circle mark",
    "\u00ad\u00ad",
    "end with sigma ΑΣ",
]

# Code point pools for random strings: Latin and its accents, Greek, Cyrillic,
# Hebrew and Arabic, Indic scripts, general punctuation, CJK symbols, full-width
# forms, ideographs, Hangul, emoji, combining marks, math letters, private use,
# C0/C1 controls, presentation forms, Linear B, an unassigned plane, compatibility
# ideographs, jamo, Cyrillic extensions, Georgian, Cherokee.
RANDOM_POOLS = [(0x20, 0x7f), (0xa0, 0x250), (0x370, 0x400), (0x400, 0x530), (0x590, 0x700), (0x900, 0xe00),
                (0x1e00, 0x2000), (0x2000, 0x2070), (0x3000, 0x3100), (0xff00, 0xfff0), (0x4e00, 0x4e80),
                (0xac00, 0xac40), (0x1f300, 0x1f650), (0x300, 0x370), (0x1d400, 0x1d800), (0xe000, 0xe010),
                (0x0, 0x20), (0x80, 0xa0), (0xfe00, 0xfe70), (0x10000, 0x10100), (0xd0000, 0xd0010),
                (0x2f800, 0x2f810), (0x1100, 0x1200), (0xa640, 0xa700), (0x1c80, 0x1d00), (0x10a0, 0x1100),
                (0x13a0, 0x1400), (0xab70, 0xabc0)]


def random_texts(rng, n):
    """Random strings over RANDOM_POOLS, mostly ASCII between, with spaces.

    Code points this Python's Unicode tables leave unassigned are skipped
    (except the always-unassigned plane 13 pool): a newer table in utf8proc
    may assign them, and the fixture is about the rules, not table versions.
    """
    import unicodedata
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(RANDOM_POOLS) if rng.random() < 0.6 else (0x20, 0x7f)
            c = chr(rng.randrange(lo, hi))
            if unicodedata.category(c) == "Cn" and lo != 0xd0000:
                continue
            chars.append(c)
            if rng.random() < 0.15:
                chars.append(" ")
        out.append("".join(chars))
    return out


PAIRS = [
    ("Is this the question?", "This is the answer."),
    ("", "only the second"),
    ("only the first", ""),
    ("Café naïve", "中文 text"),
]


def main():
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(
        os.environ.get("PATCHWORK_MODEL_DIR", Path.home() / ".cache/patchwork/models")) / "all-MiniLM-L6-v2"
    vocab = model_dir / "vocab.txt"
    Slow = getattr(transformers, "BertTokenizerLegacy", None)
    if Slow is None:  # transformers 4.x
        Slow = transformers.BertTokenizer
    slow = Slow(str(vocab), do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                                unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                                cls_token="[CLS]", mask_token="[MASK]")
    fast._tokenizer.no_truncation()
    fast._tokenizer.no_padding()
    print(f"transformers {transformers.__version__}, python reference {Slow.__name__}, fast tokenizer "
          f"{type(fast).__name__}")

    rng = random.Random(SEED)
    texts = {}
    rows = []
    for pos in FILES:
        synsets = read_synsets(pos)
        for offset, text in synsets:
            texts[(pos, offset)] = text
        for offset, _ in sorted(rng.sample(synsets, SAMPLE[pos])):
            rows.append({"kind": "wordnet", "pos": pos, "offset": offset})
    wn_keys = [(r["pos"], r["offset"]) for r in rows]

    def resolve(ref):
        return ref if isinstance(ref, str) else texts[tuple(ref["wn"])]

    def wn(key):
        return {"wn": [key[0], key[1]]}

    disagreements = []

    def both(kind, ref, enc_args, **kwargs):
        """Encode with the Python reference; note where the fast tokenizer differs."""
        kwargs = dict(kwargs, return_token_type_ids=True, return_attention_mask=True)
        s = slow(*enc_args, **kwargs)
        f = fast(*enc_args, **kwargs)
        if s["input_ids"] != f["input_ids"] or s.get("token_type_ids") != f.get("token_type_ids"):
            disagreements.append({"kind": kind, "input": ref, "kwargs": {k: v for k, v in kwargs.items() if "return" not in k}, "python": s["input_ids"],
                                  "rust": f["input_ids"]})
        return s

    for r in rows:
        text = texts[(r["pos"], r["offset"])]
        r["ids"] = both("wordnet", wn((r["pos"], r["offset"])), [text])["input_ids"]
    for text in EDGE_CASES + random_texts(rng, 1000):
        rows.append({"kind": "text", "text": text, "ids": both("text", text, [text])["input_ids"]})

    # Truncation: real glosses at several lengths, singles and pairs (longest first).
    for i in range(60):
        a = wn_keys[rng.randrange(len(wn_keys))]
        b = wn_keys[rng.randrange(len(wn_keys))]
        n = rng.choice([3, 4, 5, 8, 13, 16, 24, 32, 64])
        s = both("pair", [wn(a), wn(b)], [resolve(wn(a)), resolve(wn(b))], truncation="longest_first", max_length=n)
        rows.append({"kind": "pair", "a": wn(a), "b": wn(b), "max_length": n, "ids": s["input_ids"],
                     "type_ids": s["token_type_ids"]})
        s = both("single", wn(a), [resolve(wn(a))], truncation=True, max_length=max(n, 2))
        rows.append({"kind": "single", "a": wn(a), "max_length": max(n, 2), "ids": s["input_ids"]})
    for a, b in PAIRS:
        for n in (0, 5, 8):
            kwargs = {"truncation": "longest_first", "max_length": n} if n else {}
            s = both("pair", [a, b], [a, b], **kwargs)
            rows.append({"kind": "pair", "a": a, "b": b, "max_length": n, "ids": s["input_ids"],
                         "type_ids": s["token_type_ids"]})

    # Padded batches.
    for padding, n in (("longest", 0), ("longest", 16), ("max_length", 32), ("max_length", 8)):
        refs = [wn(wn_keys[rng.randrange(len(wn_keys))]) for _ in range(5)] + ["", "short text"]
        kwargs = {"padding": padding}
        if n:
            kwargs.update(truncation=True, max_length=n)
        s = both("batch", refs, [[resolve(x) for x in refs]], **kwargs)
        rows.append({"kind": "batch", "texts": refs, "padding": padding, "max_length": n, "ids": s["input_ids"],
                     "type_ids": s["token_type_ids"], "mask": s["attention_mask"]})

    # mtime=0: the same inputs give the same bytes.
    with gzip.GzipFile(HERE / "fixture.jsonl.gz.tmp", "wb", compresslevel=9, mtime=0) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii"))
    os.replace(HERE / "fixture.jsonl.gz.tmp", HERE / "fixture.jsonl.gz")

    with open(HERE / "fast_disagreements.txt.tmp", "w", encoding="utf-8") as f:
        f.write(f"# Where BertTokenizerFast (tokenizers {__import__('tokenizers').__version__}) differs from the "
                f"Python reference ({Slow.__name__}, transformers {transformers.__version__}): "
                f"{len(disagreements)} of {len(rows)} cases.\n")
        for d in disagreements:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(HERE / "fast_disagreements.txt.tmp", HERE / "fast_disagreements.txt")
    n_wn = sum(r["kind"] == "wordnet" for r in rows)
    print(f"{len(rows)} cases ({n_wn} WordNet texts); the fast tokenizer disagrees on {len(disagreements)}")
    for d in disagreements[:20]:
        print("  ", json.dumps(d, ensure_ascii=False)[:300])


if __name__ == "__main__":
    main()

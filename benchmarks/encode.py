"""Encoding speed: forja's encoder against tokenizers' single-thread encode_batch, same vocabulary.

    .venv/bin/python benchmarks/encode.py [--mb 8] [--vocab 4096]

Extracts the text of the bundled demo site, trains the tokenize stage's byte-level BPE on
it, repeats the text to about --mb megabytes, then encodes it, in one run, with:
  forja     tasks.tokenization.encode_all (the merges loaded into tiktoken, all cores)
  baseline  tokenizers' Tokenizer.encode_batch with one thread (RAYON_NUM_THREADS=1)
and checks that both give the same ids for every text. The last line is one JSON object.
"""
from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool: the baseline is single-thread

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.config import TokenizeConfig  # noqa: E402
from tasks.crawl import extract  # noqa: E402
from tasks.tokenization import encode_all, train_tokenizer  # noqa: E402


def demo_texts() -> list[str]:
    pages = sorted((ROOT / "data" / "demo-site").rglob("*.html"))
    texts = [extract(p.read_text(encoding="utf-8", errors="replace"), p.as_uri())[0] for p in pages]
    return [t for t in texts if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    texts = demo_texts()
    tok = train_tokenizer(texts, TokenizeConfig(vocab_size=args.vocab))
    size = sum(len(t.encode()) for t in texts)
    corpus = texts * max(1, round(args.mb * 2**20 / size))
    mb = sum(len(t.encode()) for t in corpus) / 2**20
    print(f"corpus: {len(corpus)} documents, {mb:.1f} MB (demo site text x{len(corpus) // len(texts)}); "
          f"vocab {tok.get_vocab_size()}; cores {os.cpu_count()}")

    encode_all(tok, texts[:4])  # load tiktoken and build its tables outside the timing
    t0 = time.perf_counter()
    fast = encode_all(tok, corpus)
    forja_rate = mb / (time.perf_counter() - t0)
    print(f"forja:    {forja_rate:7.2f} MB/s (merges in tiktoken, {os.cpu_count()} threads)")

    t0 = time.perf_counter()
    slow = [e.ids for e in tok.encode_batch(corpus)]
    base_rate = mb / (time.perf_counter() - t0)
    print(f"baseline: {base_rate:7.2f} MB/s (tokenizers encode_batch, 1 thread)")
    identical = fast == slow
    print(f"identical ids: {identical}; ratio {forja_rate / base_rate:.2f}")
    print(json.dumps({"mb": round(mb, 2), "mb_per_s": round(forja_rate, 2), "baseline_mb_per_s": round(base_rate, 2),
                      "ratio": round(forja_rate / base_rate, 2), "identical_ids": identical}))


if __name__ == "__main__":
    main()

"""Dedupe speed and quality: forja's batched MinHash + LSH against datasketch's per-token loop.

    .venv/bin/python benchmarks/dedupe.py [--docs 20000] [--baseline-docs 1000] [--redis redis://127.0.0.1:6379/0]

Builds a seeded synthetic corpus of ~2 KB documents with 10% planted near-duplicates
(copies with 1-12 words replaced), then times, in one run:
  forja     tasks.dedupe.find_duplicates: signatures and decisions in this process, batch by batch,
            all documents (in the stage, signatures are one unit of work per crawl shard on the
            run's runner: scale with processes or Dask workers, not measured here)
  redis     (with --redis) the same on the Redis index, on a prefix: documents per second, and
            round trips per document counted at the client's connection; decisions must equal
            the memory index's
  baseline  datasketch MinHash.update per shingle + the same MinHashLSH, on a prefix
and scores forja against the exact Jaccard of every planted pair:
  recall_j90  planted pairs with exact Jaccard >= 0.9 that forja removed
  precision   removals whose exact Jaccard with the kept document is >= threshold - 0.1
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tasks.dedup.minhash import canonical  # noqa: E402

# datasketch, tasks.dedupe and tasks.config are imported where used.


def corpus(n: int, dup_fraction: float, seed: int = 0) -> tuple[list[str], dict[int, int]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzáéíóúçã"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(30000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    n_dup = int(n * dup_fraction)
    originals = [list(rng.choice(vocab, 330, p=p)) for _ in range(n - n_dup)]
    docs = [" ".join(w) for w in originals]
    planted: dict[int, int] = {}
    for _ in range(n_dup):
        src = int(rng.integers(len(originals)))
        words = list(originals[src])
        for pos in rng.choice(len(words), int(rng.integers(1, 13)), replace=False):
            words[pos] = vocab[int(rng.integers(len(vocab)))]
        planted[len(docs)] = src
        docs.append(" ".join(words))
    order = rng.permutation(len(docs))  # duplicates anywhere, not all at the end
    where = {int(old): new for new, old in enumerate(order)}
    return [docs[i] for i in order], {where[d]: where[s] for d, s in planted.items()}


def shingle_set(text: str, k: int) -> set[str]:
    w = canonical(text).split()
    return {" ".join(w[i : i + k]) for i in range(len(w) - k + 1)}


def jaccard(a: str, b: str, k: int) -> float:
    x, y = shingle_set(a, k), shingle_set(b, k)
    return len(x & y) / len(x | y)


def baseline(texts: list[str], cfg) -> float:
    """datasketch's documented loop: one MinHash.update call per shingle, then the LSH."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        for s in shingle_set(text, cfg.shingle_size):
            m.update(s.encode())
        lsh.query(m)
        lsh.insert(i, m)
    return len(texts) / (time.perf_counter() - t0)


def on_redis(ids: list[str], texts: list[str], url: str, memory: dict) -> dict:
    """Dedupe on the Redis index, counting the client's requests (a pipeline is one)."""
    import redis.connection

    from tasks.config import DedupeConfig
    from tasks.dedupe import find_duplicates

    sent = [0]
    original = redis.connection.Connection.send_packed_command

    def counted(self, *args, **kwargs):
        sent[0] += 1
        return original(self, *args, **kwargs)

    redis.connection.Connection.send_packed_command = counted
    try:
        t0 = time.perf_counter()
        removed = find_duplicates(ids, texts, DedupeConfig(index="redis", redis_url=url))
        rate = len(ids) / (time.perf_counter() - t0)
    finally:
        redis.connection.Connection.send_packed_command = original
    if removed != memory:
        raise SystemExit("the Redis index decided differently from the memory index")
    return {"redis_docs": len(ids), "redis_docs_per_s": round(rate, 1),
            "redis_round_trips_per_doc": round(sent[0] / len(ids), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--baseline-docs", type=int, default=1000)
    ap.add_argument("--redis", help="also time the Redis index at this URL (a scratch database)")
    ap.add_argument("--redis-docs", type=int, default=5000)
    args = ap.parse_args()
    from tasks.config import DedupeConfig
    from tasks.dedupe import find_duplicates

    cfg = DedupeConfig()
    texts, planted = corpus(args.docs, 0.10)
    print(f"corpus: {len(texts)} documents, mean {np.mean([len(t) for t in texts]):.0f} chars, "
          f"{len(planted)} planted near-duplicates; cores: {os.cpu_count()}")

    t0 = time.perf_counter()
    removed = find_duplicates([str(i) for i in range(len(texts))], texts, cfg)
    forja_rate = len(texts) / (time.perf_counter() - t0)
    print(f"forja:    {forja_rate:8.0f} docs/s  ({len(removed)} removed)")

    extra = {}
    if args.redis:
        n = min(args.redis_docs, len(texts))
        ids = [str(i) for i in range(n)]
        extra = on_redis(ids, texts[:n], args.redis, find_duplicates(ids, texts[:n], cfg))
        print(f"redis:    {extra['redis_docs_per_s']:8.0f} docs/s  ({n} docs, "
              f"{extra['redis_round_trips_per_doc']} round trips per document, same decisions as memory)")

    base_rate = baseline(texts[: args.baseline_docs], cfg)
    print(f"baseline: {base_rate:8.0f} docs/s  (datasketch MinHash.update per shingle, {args.baseline_docs} docs)")

    # Ground truth from exact Jaccard. A planted copy is found if it or its source was removed
    # as a duplicate of the other (order decides which one is kept).
    pairs = {(min(d, s), max(d, s)): jaccard(texts[d], texts[s], cfg.shingle_size) for d, s in planted.items()}
    removed = {i: (int(j), kind, sim) for i, (j, kind, sim) in removed.items()}
    linked = {(min(i, j), max(i, j)) for i, (j, _, _) in removed.items()}
    high = [p for p, j in pairs.items() if j >= 0.9]
    recall = sum(p in linked for p in high) / max(len(high), 1)
    correct = sum(jaccard(texts[i], texts[j], cfg.shingle_size) >= cfg.threshold - 0.1 for i, (j, _, _) in removed.items())
    precision = correct / max(len(removed), 1)
    print(f"planted pairs with Jaccard >= 0.9: {len(high)}; recall {recall:.4f}; precision {precision:.4f}")
    result = {"docs": len(texts), "docs_per_s": round(forja_rate, 1), "baseline_docs_per_s": round(base_rate, 1),
              "ratio": round(forja_rate / base_rate, 2), "recall_j90": round(recall, 4),
              "precision": round(precision, 4), "pairs_j90": len(high), "removed": len(removed), **extra}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

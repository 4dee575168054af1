"""dedupe: drop exact duplicates (hash of normalised text) and near-duplicates (MinHash LSH).

Every removed document is linked to the kept one it duplicates, with the kind of match
and the estimated Jaccard similarity, in removed.parquet.
"""
from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import LeanMinHash, MinHash, MinHashLSH
from prefect import task

from tasks import stage
from tasks.config import DedupeConfig
from tasks.reports import publish_counts

log = logging.getLogger("forja.dedupe")
_WORD = re.compile(r"\w+", re.UNICODE)

REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("kind", pa.string()),
    ("duplicate_of", pa.string()), ("duplicate_of_url", pa.string()), ("similarity", pa.float64()),
])


def canonical(text: str) -> str:
    """Text as compared for exact duplicates: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str, size: int) -> set[bytes]:
    words = _WORD.findall(canonical(text))
    if len(words) < size:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def signature(text: str, cfg: DedupeConfig) -> LeanMinHash:
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)  # sha1-based: stable across PYTHONHASHSEED
    m.update_batch(sorted(shingles(text, cfg.shingle_size)))
    return LeanMinHash(m)


def find_duplicates(ids: list[str], texts: list[str], cfg: DedupeConfig) -> dict[int, tuple[int, str, float]]:
    """Map index of each removed document to (index it duplicates, kind, similarity).

    Documents are visited in order, so the first of a group is the one kept.
    """
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    exact: dict[str, int] = {}
    sigs: dict[int, LeanMinHash] = {}
    removed: dict[int, tuple[int, str, float]] = {}
    for i, text in enumerate(texts):
        digest = hashlib.sha256(canonical(text).encode()).hexdigest()
        if digest in exact:
            removed[i] = (exact[digest], "exact", 1.0)
            continue
        sig = signature(text, cfg)
        best, best_sim = None, 0.0
        for cand in lsh.query(sig):
            sim = sig.jaccard(sigs[cand])
            if sim >= cfg.threshold and (sim > best_sim or (sim == best_sim and cand < best)):
                best, best_sim = cand, sim
        if best is not None:
            removed[i] = (best, "near", float(best_sim))
            continue
        exact[digest] = i
        sigs[i] = sig
        lsh.insert(i, sig)
        if (i + 1) % 1000 == 0:
            log.info("dedupe: %d/%d documents", i + 1, len(texts))
    return removed


def build(cfg: DedupeConfig, documents: Path, out: Path) -> dict:
    table = pq.read_table(documents)
    ids, urls, texts = (table.column(c).to_pylist() for c in ("id", "url", "text"))
    removed = find_duplicates(ids, texts, cfg)
    keep = np.array([i not in removed for i in range(len(ids))], dtype=bool)
    pq.write_table(table.filter(pa.array(keep)), out / "documents.parquet", compression="zstd")
    rows = [
        {"id": ids[i], "url": urls[i], "kind": kind, "duplicate_of": ids[j], "duplicate_of_url": urls[j], "similarity": sim}
        for i, (j, kind, sim) in sorted(removed.items())
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=REMOVED_SCHEMA), out / "removed.parquet", compression="zstd")
    kinds = [k for _, k, _ in removed.values()]
    return {"documents_in": len(ids), "documents_out": int(keep.sum()),
            "removed": {"exact": kinds.count("exact"), "near": kinds.count("near")}}


@task(name="dedupe", persist_result=True, cache_policy=stage.CACHE_POLICY)
def dedupe(cfg: DedupeConfig, crawled: stage.Manifest, workdir: str) -> stage.Manifest:
    """Remove exact and near-duplicate documents from the crawl output."""
    import tasks.dedupe as me

    m = stage.run_stage("dedupe", cfg, [crawled], workdir,
                        lambda out, key: build(cfg, crawled.path("documents.parquet"), out), [me])
    publish_counts("dedupe", m)
    return m

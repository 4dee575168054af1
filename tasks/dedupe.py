"""dedupe: drop exact duplicates (hash of normalised text) and near-duplicates (MinHash LSH).

Every removed document is linked to the kept one it duplicates, with the kind of match
and the estimated Jaccard similarity, in removed.parquet.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import LeanMinHash
from prefect import task

from tasks import stage
from tasks.config import DedupeConfig
from tasks.dedupe_index import DedupeIndex
from tasks.minhash import Signer, sign_chunk
from tasks.reports import publish_counts

log = logging.getLogger("forja.dedupe")
PARALLEL_MIN_DOCS = 4000  # below this, starting worker processes costs more than it saves

REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("kind", pa.string()),
    ("duplicate_of", pa.string()), ("duplicate_of_url", pa.string()), ("similarity", pa.float64()),
])


def signature_chunks(texts: list[str], cfg: DedupeConfig, chunk: int = 1000) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """MinHash signatures ((n, num_perm) uint32) and exact digests of texts, chunk by chunk.

    Large corpora are signed in worker processes; chunks are yielded as they arrive, so
    the caller's LSH work overlaps with the signing of later chunks.
    """
    params = (cfg.num_perm, cfg.shingle_size, cfg.seed)
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    workers = min(cfg.workers or os.cpu_count() or 1, len(chunks))
    if workers <= 1 or len(texts) < PARALLEL_MIN_DOCS:
        signer = Signer(*params)
        yield from (signer.sign(c) for c in chunks)
        return
    # spawn, not fork: the caller may be a Prefect worker thread while other threads hold
    # locks. Workers import only tasks.minhash (numpy, pyarrow, datasketch), not Prefect.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(sign_chunk, chunks, [params] * len(chunks))


def signature_matrix(texts: list[str], cfg: DedupeConfig) -> np.ndarray:
    parts = [sigs for sigs, _ in signature_chunks(texts, cfg)]
    return np.concatenate(parts) if parts else np.zeros((0, cfg.num_perm), np.uint32)



def lean(seed: int, row: np.ndarray) -> LeanMinHash:
    """A LeanMinHash over a signature row from Signer, without re-validating its values."""
    # LeanMinHash's constructor copies and re-checks the values; these come straight
    # from Signer as uint32 "affine32" values, so set its public slots directly.
    m = object.__new__(LeanMinHash)
    m.seed, m.scheme, m.hashvalues = seed, "affine32", row
    return m


def find_duplicates(ids: list[str], texts: list[str], cfg: DedupeConfig,
                    index: DedupeIndex | None = None) -> dict[int, tuple[str, str, float]]:
    """Map position of each removed document to (id it duplicates, kind, similarity).

    Documents are visited in order, so the first of a group is kept. LSH candidates are
    confirmed by their signature Jaccard before a document is removed, which is why the
    bands are tuned for recall. With a persistent index, documents indexed by earlier
    runs count too: kind is "exact", "near", or "seen" for an id already in the index.
    """
    own = index is None
    index = DedupeIndex(cfg) if own else index
    previous = len(index)
    removed: dict[int, tuple[str, str, float]] = {}
    i = 0
    try:
        for block, digests in signature_chunks(texts, cfg):
            for row, digest in zip(block, digests):
                key = ids[i]
                if (dup := index.exact(digest)) is not None:
                    removed[i] = (dup, "seen" if dup == key else "exact", 1.0)
                else:
                    sig = lean(cfg.seed, row)
                    best, best_sim = None, 0.0
                    for cand in index.candidates(sig):
                        cand = cand.decode() if isinstance(cand, bytes) else cand
                        sim = float(np.count_nonzero(index.signature(cand) == row)) / cfg.num_perm
                        if sim >= cfg.threshold and (sim > best_sim or (sim == best_sim and cand < best)):
                            best, best_sim = cand, sim
                    if best is not None:
                        removed[i] = (best, "near", best_sim)
                    else:
                        index.add(key, digest, row, sig)
                i += 1
            log.info("dedupe: %d/%d documents, %d removed (index held %d before)", i, len(texts), len(removed), previous)
    finally:
        if own:
            index.close(success=True)
    return removed


def build(cfg: DedupeConfig, documents: Path, out: Path, workdir: str | None = None) -> dict:
    table = pq.read_table(documents)
    ids, urls, texts = (table.column(c).to_pylist() for c in ("id", "url", "text"))
    index = DedupeIndex(cfg, workdir)
    previous, ok = len(index), False
    try:
        removed = find_duplicates(ids, texts, cfg, index)
        ok = True
    finally:
        index.close(success=ok)
    keep = np.array([i not in removed for i in range(len(ids))], dtype=bool)
    pq.write_table(table.filter(pa.array(keep)), out / "documents.parquet", compression="zstd")
    url_of = dict(zip(ids, urls))
    rows = [
        {"id": ids[i], "url": urls[i], "kind": kind, "duplicate_of": j, "duplicate_of_url": url_of.get(j, ""),
         "similarity": sim}
        for i, (j, kind, sim) in sorted(removed.items())
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=REMOVED_SCHEMA), out / "removed.parquet", compression="zstd")
    kinds = [k for _, k, _ in removed.values()]
    return {"documents_in": len(ids), "documents_out": int(keep.sum()), "index_before": previous,
            "removed": {k: kinds.count(k) for k in ("exact", "near", "seen")}}


@task(name="dedupe", persist_result=True, cache_policy=stage.CACHE_POLICY)
def dedupe(cfg: DedupeConfig, crawled: stage.Manifest, workdir: str) -> stage.Manifest:
    """Remove exact and near-duplicate documents from the crawl output."""
    import tasks.dedupe as me
    import tasks.dedupe_index
    import tasks.minhash

    m = stage.run_stage("dedupe", cfg, [crawled], workdir,
                        lambda out, key: build(cfg, crawled.path("documents.parquet"), out, workdir),
                        [me, tasks.minhash, tasks.dedupe_index])
    publish_counts("dedupe", m)
    return m

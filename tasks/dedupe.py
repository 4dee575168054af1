"""dedupe: drop exact duplicates (hash of normalised text) and near-duplicates (MinHash LSH).

Every removed document is linked to the kept one it duplicates, with the kind of match
and the estimated Jaccard similarity, in removed.parquet.

With a persistent index (dedupe.index_name) a run is deduplicated against every document
kept before. In the default `incremental: corpus` mode the output is still the whole
current corpus: a document kept before with the same text stays (counted unchanged), a
changed one replaces its own old entry (it is never a duplicate of itself), and a new one
that duplicates anything kept before is removed, naming it. `incremental: new_only`
outputs only new and changed documents.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks import stage
from tasks.config import DedupeConfig
from model.faults import fault_point
from tasks.dedup.dedupe_index import DedupeIndex, IndexUnavailable, apply_delta, is_outage, unavailable
from tasks.dedup.minhash import Signer, sign_chunk
from tasks.reports import publish_counts

log = logging.getLogger("forja.dedupe")
PARALLEL_MIN_DOCS = 4000  # below this, starting worker processes costs more than it saves
CHUNK = 1000  # documents per signing chunk and per written batch

REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("kind", pa.string()),
    ("duplicate_of", pa.string()), ("duplicate_of_url", pa.string()), ("similarity", pa.float64()),
])


def signature_chunks(text_chunks: Iterable[list[str]], cfg: DedupeConfig,
                     parallel: bool) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """MinHash signatures ((n, num_perm) uint32) and exact digests of each chunk of texts, in order.

    In parallel mode the chunks are signed in worker processes, at most two per worker in
    flight, so memory stays bounded and the caller's LSH work overlaps with signing.
    """
    params = (cfg.num_perm, cfg.shingle_size, cfg.seed)
    workers = cfg.workers or os.cpu_count() or 1
    if not parallel or workers <= 1:
        signer = Signer(*params)
        yield from (signer.sign(c) for c in text_chunks)
        return
    # spawn, not fork: the caller may be a Prefect worker thread while other threads hold
    # locks. Workers import only tasks.dedup.minhash (numpy, pyarrow), not Prefect.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for chunk in text_chunks:
            pending.append(pool.submit(sign_chunk, chunk, params))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def signature_matrix(texts: list[str], cfg: DedupeConfig) -> np.ndarray:
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    parts = [sigs for sigs, _ in signature_chunks(chunks, cfg, len(texts) >= PARALLEL_MIN_DOCS)]
    return np.concatenate(parts) if parts else np.zeros((0, cfg.num_perm), np.uint32)


def decide(chunks: Iterable[tuple[Any, list[str], list[str]]], cfg: DedupeConfig, index: DedupeIndex,
           parallel: bool, tally: Counter | None = None) -> Iterator[tuple[Any, dict[int, tuple[str, str, float]]]]:
    """For each (payload, ids, texts) chunk, in order: (payload, removals by position in the chunk).

    Documents are visited in order, so the first of a group is kept; documents indexed by
    earlier runs come before all of them. LSH candidates are confirmed by their signature
    Jaccard before a document is removed, which is why the bands are tuned for recall.
    Removal kinds: "exact", "near", and "seen" (an id this run already had, or, in
    new_only mode, a document kept before with the same text). tally counts the kept
    documents as "new", "changed" (an indexed id whose text changed) or "unchanged".
    """
    waiting: deque = deque()
    tally = Counter() if tally is None else tally
    this_run: set[str] = set()

    def texts():
        for payload, ids, chunk_texts in chunks:
            waiting.append((payload, ids))
            yield chunk_texts

    for block, digests in signature_chunks(texts(), cfg, parallel):
        payload, ids = waiting.popleft()
        removed: dict[int, tuple[str, str, float]] = {}
        for i, (key, row, digest, bands) in enumerate(zip(ids, block, digests, index.bands(block))):
            if key in this_run:  # the same id twice in one input: keep the first
                removed[i] = (key, "seen", 1.0)
                continue
            this_run.add(key)
            changed = False
            if index.has(key):  # kept by an earlier run
                if index.digest_for(key) == digest:
                    if cfg.incremental == "new_only":
                        removed[i] = (key, "seen", 1.0)
                    else:
                        tally["unchanged"] += 1
                    continue
                index.remove(key)  # its text changed: compare the new text with the others, not itself
                changed = True
            if (dup := index.exact(digest)) is not None:
                removed[i] = (dup, "exact", 1.0)
                continue
            best, best_sim = None, 0.0
            for cand in index.candidates(bands):
                if (sig := index.signature(cand)) is None:  # not an indexed id: nothing to compare
                    continue
                sim = float(np.count_nonzero(sig == row)) / cfg.num_perm
                if sim >= cfg.threshold and (sim > best_sim or (sim == best_sim and cand < best)):
                    best, best_sim = cand, sim
            if best is not None:
                removed[i] = (best, "near", best_sim)
            else:
                index.add(key, digest, row, bands)
                tally["changed" if changed else "new"] += 1
        yield payload, removed


def find_duplicates(ids: list[str], texts: list[str], cfg: DedupeConfig,
                    index: DedupeIndex | None = None) -> dict[int, tuple[str, str, float]]:
    """Map position of each removed document to (id it duplicates, kind, similarity); see decide()."""
    own = index is None
    index = DedupeIndex(cfg) if own else index
    chunks = ((start, ids[start : start + CHUNK], texts[start : start + CHUNK]) for start in range(0, len(ids), CHUNK))
    removed: dict[int, tuple[str, str, float]] = {}
    try:
        for start, part in decide(chunks, cfg, index, len(ids) >= PARALLEL_MIN_DOCS):
            removed |= {start + i: r for i, r in part.items()}
    finally:
        if own:
            index.close(success=True)
    return removed


def build(cfg: DedupeConfig, documents: list[Path], out: Path, workdir: str | None = None,
          delta_id: str | None = None) -> dict:
    """Stream the document shards in order; write each shard's kept documents to the shard of
    the same number, and removed.parquet linking each removed document to the one it duplicates.

    With a persistent index, the entries this run adds or removes go to out/index-delta.parquet
    (named delta_id, by default the folder's name): commit() applies them once out is committed.
    """
    if not documents:
        raise ValueError("dedupe got no document shards")
    sources = [pq.ParquetFile(f) for f in documents]
    try:
        return _build(cfg, sources, out, workdir, delta_id or out.name)
    except IndexUnavailable:
        raise
    except Exception as e:
        if cfg.index == "redis" and is_outage(e):  # timed out mid-run: name the server, not a socket
            raise unavailable(cfg.redis_url, e) from e
        raise


def commit(cfg: DedupeConfig, folder: str | Path, workdir: str | None = None) -> bool:
    """Apply a committed dedupe folder's index delta to the persistent index (once; idempotent)."""
    return apply_delta(cfg, folder, workdir)


def _build(cfg: DedupeConfig, sources: list, out: Path, workdir: str | None, delta_id: str) -> dict:
    index = DedupeIndex(cfg, workdir)
    previous, ok = len(index), False
    n_in = n_out = 0
    kinds: Counter = Counter()
    tally: Counter = Counter()
    url_of: dict[str, str] = {}
    removed_rows: list[dict] = []  # written at the end, when every kept document's url is known
    chunks = (((n, b), b.column("id").to_pylist(), b.column("text").to_pylist())
              for n, src in enumerate(sources) for b in src.iter_batches(batch_size=CHUNK))
    parallel = sum(src.metadata.num_rows for src in sources) >= PARALLEL_MIN_DOCS
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for (n, batch), removed in decide(chunks, cfg, index, parallel, tally):
            if n not in writers:  # shards arrive in order: close the previous one
                for w in writers.values():
                    w.close()
                writers = {n: pq.ParquetWriter(out / stage.shard_name("documents", n), sources[n].schema_arrow,
                                               compression="zstd")}
            ids, urls = batch.column("id").to_pylist(), batch.column("url").to_pylist()
            keep = np.array([i not in removed for i in range(batch.num_rows)], dtype=bool)
            url_of.update((k, u) for k, u, kept in zip(ids, urls, keep) if kept)
            writers[n].write_table(pa.Table.from_batches([batch.filter(pa.array(keep))]))
            removed_rows += [{"id": ids[i], "url": urls[i], "kind": kind, "duplicate_of": j, "similarity": sim}
                             for i, (j, kind, sim) in sorted(removed.items())]
            kinds.update(kind for _, kind, _ in removed.values())
            n_in += batch.num_rows
            n_out += int(keep.sum())
            log.info("dedupe: %d documents read, %d kept (index held %d before)", n_in, n_out, previous)
            fault_point("dedupe:indexed")
        for r in removed_rows:  # "" for a document kept by an earlier run and absent from this one
            r["duplicate_of_url"] = url_of.get(r["duplicate_of"], "")
        pq.write_table(pa.Table.from_pylist(removed_rows, schema=REMOVED_SCHEMA), out / "removed.parquet",
                       compression="zstd")
        index.write_delta(out, delta_id)
        ok = True
    finally:
        for w in writers.values():
            w.close()
        index.close(success=ok)
    return {"documents_in": n_in, "documents_out": n_out, "index_before": previous,
            "removed": {k: kinds[k] for k in ("exact", "near", "seen")},
            "kept": {k: tally[k] for k in ("new", "changed", "unchanged")}}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.dedupe", "tasks.dedup.minhash", "tasks.dedup.dedupe_index")


@task(name="dedupe", **stage.task_options(*CODE))
def dedupe(cfg: DedupeConfig, crawled: stage.Manifest, workdir: str) -> stage.Manifest:
    """Remove exact and near-duplicate documents from the crawl output."""
    m = stage.run_stage("dedupe", cfg, [crawled], workdir,
                        lambda out, key: build(cfg, stage.shards(crawled.folder), out, workdir, key),
                        CODE)
    commit(cfg, m.folder, workdir)  # also on a cache hit: a run killed after the rename applies it now
    publish_counts("dedupe", m)
    return m

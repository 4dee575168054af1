"""dedupe: drop exact duplicates (hash of normalised text) and near-duplicates (MinHash LSH).

Every removed document is linked to the kept one it duplicates, with the kind of match
and the estimated Jaccard similarity, in removed.parquet.

With a persistent index (dedupe.index_name) a run is deduplicated against every document
kept before. In the default `incremental: corpus` mode the output is still the whole
current corpus: a document kept before with the same text stays (counted unchanged), a
changed one replaces its own old entry (it is never a duplicate of itself), and a new one
that duplicates anything kept before is removed, naming it. `incremental: new_only`
outputs only new and changed documents.

The work is split in two: the MinHash signatures of each crawl shard are a unit of work
("dedupe-signatures", tasks.dedup.signatures) mapped on the run's runner (processes here, Dask
workers on a cluster), each writing a signature file into the stage's temp folder; then one
pass decides in shard order, a batch at a time (tasks.dedup.decide), so the output is the same
whatever the runner or the order the units finished in. The signature files are deleted
before the folder is committed. Memory is bounded by the batch: kept documents, removed rows
and the index delta are streamed, and the kept documents' urls (for duplicate_of_url) live in
the run's index store (Redis on a cluster), not in a Python dict.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks import stage
from tasks.config import DedupeConfig
from tasks.mapping import map_units
from model.faults import fault_point
from tasks.dedup.decide import decide_batch
from tasks.dedup.dedupe_index import DedupeIndex, IndexUnavailable, apply_delta, is_outage, unavailable
from tasks.dedup.minhash import Signer
from tasks.dedup.signatures import SignatureReader, sign_shard, signature_file
from tasks.reports import publish_counts

log = logging.getLogger("forja.dedupe")
CHUNK = 1000  # documents per decision batch (one set of index round trips) and per written batch
PENDING = ".removed-pending.parquet"  # removed rows before their duplicate_of_url is resolved

REMOVED_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("kind", pa.string()),
    ("duplicate_of", pa.string()), ("duplicate_of_url", pa.string()), ("similarity", pa.float64()),
])


def signature_matrix(texts: list[str], cfg: DedupeConfig) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures, computed here."""
    return Signer(cfg.num_perm, cfg.shingle_size, cfg.seed).signature_matrix(texts)


def find_duplicates(ids: list[str], texts: list[str], cfg: DedupeConfig,
                    index: DedupeIndex | None = None) -> dict[int, tuple[str, str, float]]:
    """Map position of each removed document to (id it duplicates, kind, similarity); see
    tasks.dedup.decide. Signs in this process: for in-memory lists (tests, benchmarks)."""
    own = index is None
    index = DedupeIndex(cfg) if own else index
    signer = Signer(cfg.num_perm, cfg.shingle_size, cfg.seed)
    removed: dict[int, tuple[str, str, float]] = {}
    try:
        for start in range(0, len(ids), CHUNK):
            sigs, digests = signer.sign(texts[start : start + CHUNK])
            part = decide_batch(index, cfg, ids[start : start + CHUNK], sigs, digests, Counter())
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
    try:
        return _build(cfg, [Path(f) for f in documents], out, workdir, delta_id or out.name)
    except IndexUnavailable:
        raise
    except Exception as e:
        if cfg.index == "redis" and is_outage(e):  # timed out mid-run: name the server, not a socket
            raise unavailable(cfg.redis_url, e) from e
        raise


def commit(cfg: DedupeConfig, folder: str | Path, workdir: str | None = None) -> bool:
    """Apply a committed dedupe folder's index delta to the persistent index (once; idempotent)."""
    return apply_delta(cfg, folder, workdir)


def _build(cfg: DedupeConfig, sources: list[Path], out: Path, workdir: str | None, delta_id: str) -> dict:
    # Signatures first, one unit of work per crawl shard on the run's runner; then the
    # decision, in shard order, in this process.
    jobs = [(cfg, str(src), str(out), n) for n, src in enumerate(sources)]
    try:
        map_units(sign_shard, jobs)
        return _decide(cfg, sources, out, workdir, delta_id)
    finally:
        for n in range(len(sources)):
            signature_file(out, n).unlink(missing_ok=True)


def _decide(cfg: DedupeConfig, sources: list[Path], out: Path, workdir: str | None, delta_id: str) -> dict:
    index = DedupeIndex(cfg, workdir)
    previous, ok = len(index), False
    n_in = n_out = 0
    kinds: Counter = Counter()
    tally: Counter = Counter()
    try:
        with pq.ParquetWriter(out / PENDING, REMOVED_SCHEMA) as pending:
            for n, path in enumerate(sources):
                src = pq.ParquetFile(path)
                reader = SignatureReader(signature_file(out, n), cfg.num_perm)
                with stage.partial(out / stage.shard_name("documents", n)) as tmp, \
                        pq.ParquetWriter(tmp, src.schema_arrow, compression="zstd") as writer:
                    for batch in src.iter_batches(batch_size=CHUNK):
                        ids, urls = batch.column("id").to_pylist(), batch.column("url").to_pylist()
                        sigs, digests = reader.take(batch.num_rows)
                        removed = decide_batch(index, cfg, ids, sigs, digests, tally, urls)
                        keep = np.array([i not in removed for i in range(batch.num_rows)], dtype=bool)
                        writer.write_table(pa.Table.from_batches([batch.filter(pa.array(keep))]))
                        rows = sorted(removed.items())
                        pending.write_table(pa.table({
                            "id": [ids[i] for i, _ in rows], "url": [urls[i] for i, _ in rows],
                            "kind": [r[1] for _, r in rows], "duplicate_of": [r[0] for _, r in rows],
                            "duplicate_of_url": [""] * len(rows), "similarity": [r[2] for _, r in rows]},
                            schema=REMOVED_SCHEMA))
                        kinds.update(kind for _, kind, _ in removed.values())
                        n_in += batch.num_rows
                        n_out += int(keep.sum())
                        log.info("dedupe: %d documents read, %d kept (index held %d before)", n_in, n_out, previous)
                        fault_point("dedupe:indexed")
                reader.finish()
                signature_file(out, n).unlink()
        _resolve_urls(index, out / PENDING, out / "removed.parquet")
        index.write_delta(out, delta_id)
        ok = True
    finally:
        (out / PENDING).unlink(missing_ok=True)
        index.close(success=ok)
    return {"documents_in": n_in, "documents_out": n_out, "index_before": previous,
            "removed": {k: kinds[k] for k in ("exact", "near", "seen")},
            "kept": {k: tally[k] for k in ("new", "changed", "unchanged")}}


def _resolve_urls(index: DedupeIndex, pending: Path, final: Path) -> None:
    """removed.parquet from the pending rows, a batch at a time: duplicate_of_url is the url of
    the document each removed one duplicates if this run kept it, else "" (one kept by an
    earlier run and absent from this one). The index recorded every kept url, so nothing here
    holds more than a batch."""
    with stage.partial(final) as tmp, pq.ParquetWriter(tmp, REMOVED_SCHEMA, compression="zstd") as writer:
        for batch in pq.ParquetFile(pending).iter_batches(batch_size=CHUNK):
            urls = index.urls_of(batch.column("duplicate_of").to_pylist())
            table = pa.Table.from_batches([batch]).set_column(4, "duplicate_of_url", pa.array(urls, pa.string()))
            writer.write_table(table)
        if not pq.ParquetFile(pending).metadata.num_rows:
            writer.write_table(REMOVED_SCHEMA.empty_table())


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.dedupe", "tasks.dedup.minhash", "tasks.dedup.dedupe_index", "tasks.dedup.store",
        "tasks.dedup.decide", "tasks.dedup.signatures")


@task(name="dedupe", **stage.task_options(*CODE))
def dedupe(cfg: DedupeConfig, crawled: stage.Manifest, workdir: str) -> stage.Manifest:
    """Remove exact and near-duplicate documents from the crawl output."""
    m = stage.run_stage("dedupe", cfg, [crawled], workdir,
                        lambda out, key: build(cfg, stage.shards(crawled.folder), out, workdir, key),
                        CODE)
    commit(cfg, m.folder, workdir)  # also on a cache hit: a run killed after the rename applies it now
    publish_counts("dedupe", m)
    return m

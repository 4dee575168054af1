"""dedupe's unit of work: the MinHash signatures and exact digests of one crawl shard.

One Prefect task run per crawl shard (tasks.mapping.map_units: processes on this machine, Dask
workers on a cluster) reads the shard's text column a batch at a time and writes
`signatures-NNNNN.parquet` into the stage's temp folder, atomically (stage.partial): one row
per document, in the shard's order (a fixed-size list of num_perm uint32 and the 32-byte
digest). The decision pass then reads these files in shard order. They are intermediate: the
stage deletes them before its folder is committed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks import stage
from tasks.config import DedupeConfig
from tasks.dedup.minhash import sign_chunk
from tasks.mapping import unit_options

PREFIX = "signatures"
BATCH = 1000  # documents signed and written at a time


def schema(num_perm: int) -> pa.Schema:
    return pa.schema([("signature", pa.list_(pa.uint32(), num_perm)), ("digest", pa.binary())])


def signature_file(folder: str | Path, n: int) -> Path:
    return Path(folder) / stage.shard_name(PREFIX, n)


@task(name="dedupe-signatures", **unit_options())
def sign_shard(cfg: DedupeConfig, shard: str, folder: str, n: int) -> dict:
    """Write the signatures of crawl shard `shard` (number n) into folder; returns its row count.
    Idempotent: a rerun (a lost worker) rewrites the same file."""
    params = (cfg.num_perm, cfg.shingle_size, cfg.seed)
    rows = 0
    with stage.partial(signature_file(folder, n)) as tmp:
        with pq.ParquetWriter(tmp, schema(cfg.num_perm), compression="none") as writer:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH, columns=["text"]):
                sigs, digests = sign_chunk(batch.column("text").to_pylist(), params)
                flat = pa.array(sigs.reshape(-1), pa.uint32())
                writer.write_table(pa.table({"signature": pa.FixedSizeListArray.from_arrays(flat, cfg.num_perm),
                                             "digest": pa.array(digests, pa.binary())}, schema=schema(cfg.num_perm)))
                rows += batch.num_rows
            if not rows:
                writer.write_table(schema(cfg.num_perm).empty_table())
    return {"shard": n, "documents": rows}


class SignatureReader:
    """Reads a signature file in step with its crawl shard: take(n) returns the next n rows'
    (signatures, digests), whatever batch boundaries either file has."""

    def __init__(self, path: Path, num_perm: int):
        self.path, self.num_perm = path, num_perm
        self._batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH)
        self._sigs = np.zeros((0, num_perm), np.uint32)
        self._digests: list[bytes] = []

    def take(self, n: int) -> tuple[np.ndarray, list[bytes]]:
        while len(self._digests) < n:
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError(f"{self.path} has fewer rows than its crawl shard: the signature unit "
                                   "did not finish; rerun the dedupe stage")
            sigs = batch.column("signature").flatten().to_numpy().reshape(-1, self.num_perm)
            self._sigs = np.concatenate([self._sigs, sigs])
            self._digests += batch.column("digest").to_pylist()
        sigs, digests = self._sigs[:n], self._digests[:n]
        self._sigs, self._digests = self._sigs[n:], self._digests[n:]
        return sigs, digests

    def finish(self) -> None:
        """Check that every row was taken: a file longer than its shard is stale."""
        if self._digests or any(b.num_rows for b in self._batches):
            raise RuntimeError(f"{self.path} has more rows than its crawl shard: rerun the dedupe stage")

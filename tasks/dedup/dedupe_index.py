"""Where dedupe keeps what it has seen: MinHash LSH bands, signatures and exact digests.

`memory` lives for one run unless `index_name` is set, in which case it is kept in
<workdir>/dedupe-index/<name>.parquet. `redis` puts datasketch's LSH storage and the
signatures in Redis, so the index can outgrow one process and, with `index_name`, persists
across runs: a later crawl is deduplicated against everything indexed before it.

A run never writes the persistent index. It reads it (the base) and keeps what it adds or
removes in a run-scoped store of the same kind (the overlay); the stage writes that change
into its own folder (index-delta.parquet), and the change is applied to the index only after
the folder is committed (apply_delta), exactly once: the index remembers the deltas it has
applied, and a run first applies any committed delta that was not (apply_pending). A run
killed before its commit leaves the index as it was, so its rerun sees the same index.

Each entry also remembers its document's exact digest, so a later run can tell a document
it kept before with the same text (unchanged) from a changed one, whose old entry is
removed before the new text is compared with the rest. Ids are stored as plain UTF-8
strings (datasketch's prepickle is off): nothing read from the index is ever unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHashLSH

from tasks.config import DedupeConfig
from tasks.dedup.store import LSH_WEIGHTS, Lookup, Store  # noqa: F401  (LSH_WEIGHTS: part of this module's API)

log = logging.getLogger("forja.dedupe")
REDIS_TIMEOUT_S = 10.0  # connect and socket timeouts unless the URL sets its own (?socket_timeout=...)
DELTA = "index-delta.parquet"
BATCH = 1000  # entries per Redis pipeline and per delta batch


class IndexUnavailable(ConnectionError):
    """The Redis server holding the dedupe index did not answer."""


def connect(url: str):
    """A Redis client with connect and socket timeouts, checked with a ping: a server that
    does not answer is a clear error naming the URL, never a hang."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        raise unavailable(url, e) from e
    return client


def is_outage(e: BaseException) -> bool:
    """Whether e is Redis not answering (refused, timed out, dropped)."""
    import redis

    return isinstance(e, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))


def unavailable(url: str, e: BaseException) -> IndexUnavailable:
    return IndexUnavailable(f"dedupe index: the Redis server at {url} did not answer ({e}); start it, fix "
                            "dedupe.redis_url, or use dedupe.index: memory")


def identity(cfg: DedupeConfig) -> str:
    """Which persistent index a delta belongs to."""
    return f"redis {cfg.redis_url} {cfg.index_name}" if cfg.index == "redis" else f"memory {cfg.index_name}"


class Persistent:
    """The persistent index named by cfg.index_name (its base store) and the deltas applied to it."""

    def __init__(self, cfg: DedupeConfig, workdir: str | Path | None, client=None):
        self.cfg, self.workdir = cfg, Path(workdir or ".")
        self.file = self.workdir / "dedupe-index" / f"{cfg.index_name}.parquet"
        self.client = client
        if cfg.index == "redis":
            self.store = Store(cfg, client, f"forja:dedupe:{cfg.index_name}")
        else:
            self.store = Store(cfg)
            self.applied_memory: set[str] = set()
            if self.file.exists():
                self._load()

    def applied(self, delta_id: str) -> bool:
        if self.client is not None:
            return bool(self.client.sismember(self.store.prefix + ":applied", delta_id))
        return delta_id in self.applied_memory

    def apply(self, delta: Path) -> bool:
        """Apply one committed delta unless it was applied before; True if it was applied now.
        Re-applying a partly applied delta gives the same index (removes, then overwriting adds)."""
        meta = pq.read_schema(delta).metadata or {}
        delta_id = meta.get(b"forja.delta_id", b"").decode()
        if not delta_id or self.applied(delta_id):
            return False
        added = removed = 0
        for batch in pq.ParquetFile(delta).iter_batches(batch_size=BATCH):  # bounded by the batch, not the delta
            ids, ops, digests = (batch.column(c).to_pylist() for c in ("id", "op", "digest"))
            sigs = batch.column("signature").flatten().to_numpy().reshape(-1, self.cfg.num_perm)
            self.store.remove(ids)
            adds = [i for i, op in enumerate(ops) if op == "add"]
            rows = sigs[adds] if adds else np.zeros((0, self.cfg.num_perm), np.uint32)
            self.store.write(adds=[(ids[i], digests[i], row, bands)
                                   for i, row, bands in zip(adds, rows, bands_of(self.store.lsh, rows))])
            added, removed = added + len(adds), removed + len(ids) - len(adds)
        if self.client is not None:
            self.client.sadd(self.store.prefix + ":applied", delta_id)
        else:
            self.applied_memory.add(delta_id)
            self._save()
        log.info("dedupe index %s: applied %s (%d added, %d removed)", self.cfg.index_name, delta_id,
                 added, removed)
        return True

    def apply_pending(self) -> None:
        """Apply every committed dedupe folder's delta for this index not applied yet, oldest first."""
        found = []
        for delta in (self.workdir / "artifacts" / "dedupe").glob(f"[!.]*/{DELTA}"):
            try:
                m = json.loads((delta.parent / "manifest.json").read_text())
                meta = pq.read_schema(delta).metadata or {}
            except (OSError, ValueError):
                continue  # not committed
            if meta.get(b"forja.index", b"").decode() == identity(self.cfg):
                found.append((m.get("created_at", 0), delta))
        for _, delta in sorted(found):
            self.apply(delta)

    def _save(self) -> None:
        s = self.store
        ids = list(s.sigs)
        sigs = np.stack([s.sigs[i] for i in ids]) if ids else np.zeros((0, self.cfg.num_perm), np.uint32)
        table = pa.table({
            "id": ids, "digest": [s.digest_of.get(i, b"") for i in ids],
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel(), pa.uint32()), self.cfg.num_perm),
        }).replace_schema_metadata({"forja.applied": json.dumps(sorted(self.applied_memory))})
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.file)

    def _load(self) -> None:
        table = pq.read_table(self.file)
        self.applied_memory = set(json.loads((table.schema.metadata or {}).get(b"forja.applied", b"[]")))
        sigs = table.column("signature").combine_chunks().values.to_numpy().reshape(-1, self.cfg.num_perm)
        self.store.write(adds=list(zip(table.column("id").to_pylist(), table.column("digest").to_pylist(),
                                       sigs, bands_of(self.store.lsh, sigs))))


def bands_of(lsh: MinHashLSH, block: np.ndarray) -> list[list[bytes]]:
    """The LSH bucket key of every band of each signature row in block.

    These are the keys MinHashLSH.query/insert derive one band at a time (the band's
    values byte-swapped, as bytes); deriving them for a whole block at once takes the
    per-document work in the deduplicating loop down to dictionary lookups.
    """
    swapped = np.ascontiguousarray(block.astype(np.uint32).byteswap())
    cuts = [(4 * start, 4 * end) for start, end in lsh.hashranges]
    return [[raw[a:b] for a, b in cuts] for raw in map(bytes, swapped)]


class DedupeIndex:
    """What one run sees: the persistent index as it was (read only) plus this run's own
    additions and removals, kept apart so they reach the index only through a committed delta.

    The decision pass works a batch at a time: lookup() and signatures() read what the batch
    needs from both stores (a round trip or two each), flush() writes the batch's additions,
    the ids it has seen and the urls of the documents it kept (one round trip)."""

    def __init__(self, cfg: DedupeConfig, workdir: str | Path | None = None):
        self.cfg = cfg
        self.client = connect(cfg.redis_url) if cfg.index == "redis" else None
        self.base = Persistent(cfg, workdir, self.client) if cfg.index_name is not None else None
        if self.base is not None:
            self.base.apply_pending()
        prefix = f"forja:dedupe:run:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.run = Store(cfg, self.client, prefix)
        # Base entries this run replaced (their text changed): as many as changed documents.
        self.masked: set[str] = set()
        self.lsh = self.run.lsh

    def __len__(self) -> int:
        """Entries the persistent index held when this run started."""
        return len(self.base.store) if self.base is not None else 0

    def bands(self, block: np.ndarray) -> list[list[bytes]]:
        return bands_of(self.lsh, block)

    def lookup(self, ids: list[str], digests: list[bytes], bands: list[list[bytes]]) -> tuple[Lookup, Lookup | None]:
        """What this run's store and the persistent index (None without one) hold about a batch.
        Masked base entries are not filtered here: the caller masks as it decides."""
        base = self.base.store.lookup(ids, digests, bands) if self.base is not None else None
        return self.run.lookup(ids, digests, bands), base

    def signatures(self, run_ids: set[str], base_ids: set[str]) -> tuple[dict, dict]:
        """Signatures of candidates found in this run's store and in the persistent index."""
        base = self.base.store.signatures(sorted(base_ids)) if self.base is not None else {}
        return self.run.signatures(sorted(run_ids)), base

    def mask(self, key: str) -> None:
        """Hide a persistent entry from this run (its document changed); removed at commit."""
        self.masked.add(key)

    def flush(self, adds: list, seen: list[str], urls: list[tuple[str, str]]) -> None:
        self.run.write(adds, seen, urls)

    def add(self, key: str, digest: bytes, row: np.ndarray, bands: list[bytes]) -> None:
        self.run.write([(key, digest, row, bands)])

    def candidates(self, keys: list[bytes]) -> set[str]:
        """Ids of indexed documents sharing at least one band with these band keys."""
        run, base = self.lookup([""], [b""], [keys])
        return run.candidates[0] | (base.candidates[0] - self.masked if base is not None else set())

    def urls_of(self, ids: list[str]) -> list[str]:
        """The url of each id's document if this run kept it, else ""."""
        return [u or "" for u in self.run.urls_of(ids)]

    def write_delta(self, folder: Path, delta_id: str) -> int:
        """Write this run's change to the persistent index into folder (applied after commit),
        a batch at a time; returns the number of rows."""
        if self.base is None:
            return 0
        schema = pa.schema([("id", pa.string()), ("op", pa.string()), ("digest", pa.binary()),
                            ("signature", pa.list_(pa.uint32(), self.cfg.num_perm))],
                           metadata={"forja.delta_id": delta_id, "forja.index": identity(self.cfg)})
        rows = 0
        with pq.ParquetWriter(folder / DELTA, schema, compression="zstd") as writer:
            def put(ids, ops, digests, sigs):
                flat = pa.array(np.asarray(sigs, np.uint32).reshape(-1), pa.uint32())
                writer.write_table(pa.table({"id": ids, "op": ops, "digest": pa.array(digests, pa.binary()),
                                             "signature": pa.FixedSizeListArray.from_arrays(flat, self.cfg.num_perm)},
                                            schema=schema))

            for ids in self.run.id_batches(BATCH):
                sigs = self.run.signatures(ids)
                put(ids, ["add"] * len(ids), [d or b"" for d in self.run.digests_of(ids)], [sigs[k] for k in ids])
                rows += len(ids)
            masked = sorted(self.masked)
            readded = self.run.signatures(masked)
            removed = [k for k in masked if k not in readded]
            if removed:
                put(removed, ["remove"] * len(removed), [b""] * len(removed),
                    np.zeros((len(removed), self.cfg.num_perm), np.uint32))
            if not rows + len(removed):
                writer.write_table(schema.empty_table())
        return rows + len(removed)

    def close(self, success: bool = True) -> None:
        """Drop this run's store (a Redis one would outlive the process)."""
        try:
            self.run.drop()
        finally:
            if self.client is not None:
                self.client.close()

def apply_delta(cfg: DedupeConfig, folder: str | Path, workdir: str | Path | None) -> bool:
    """After the dedupe folder is committed: apply its delta to the persistent index (once)."""
    delta = Path(folder) / DELTA
    if cfg.index_name is None or not delta.is_file():
        return False
    client = connect(cfg.redis_url) if cfg.index == "redis" else None
    try:
        return Persistent(cfg, workdir, client).apply(delta)
    finally:
        if client is not None:
            client.close()

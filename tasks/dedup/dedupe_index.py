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
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHashLSH

from tasks.config import DedupeConfig

log = logging.getLogger("forja.dedupe")
# (false-positive, false-negative) weights for choosing bands and rows: candidates are
# verified against the threshold afterwards, so missing a duplicate is the costlier error.
LSH_WEIGHTS = (0.1, 0.9)
REDIS_TIMEOUT_S = 10.0  # connect and socket timeouts unless the URL sets its own (?socket_timeout=...)
DELTA = "index-delta.parquet"


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


class Store:
    """One set of entries (id -> signature and exact digest, plus the LSH bands), in memory or
    in Redis under a key prefix."""

    def __init__(self, cfg: DedupeConfig, client=None, prefix: str = ""):
        self.cfg, self.redis, self.prefix = cfg, client, prefix
        if client is not None:
            kw = client.connection_pool.connection_kwargs
            conn = {k: kw[k] for k in ("host", "port", "db", "username", "password", "socket_timeout",
                                       "socket_connect_timeout") if kw.get(k) is not None}
            self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS, prepickle=False,
                                  storage_config={"type": "redis", "basename": prefix.encode(), "redis": conn})
        else:
            self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
            self.sigs: dict[str, np.ndarray] = {}
            self.digests: dict[bytes, str] = {}  # exact digest -> the id kept with it
            self.digest_of: dict[str, bytes] = {}  # id -> its exact digest

    def _id(self, key: str):
        return key.encode() if self.redis is not None else key

    def __len__(self) -> int:
        return int(self.redis.hlen(self.prefix + ":sig")) if self.redis is not None else len(self.sigs)

    def has(self, key: str) -> bool:
        if self.redis is not None:
            return bool(self.redis.hexists(self.prefix + ":sig", key))
        return key in self.sigs

    def exact(self, digest: bytes) -> str | None:
        if self.redis is not None:
            got = self.redis.hget(self.prefix + ":digest", digest)
            return got.decode() if got is not None else None
        return self.digests.get(digest)

    def digest_for(self, key: str) -> bytes | None:
        if self.redis is not None:
            return self.redis.hget(self.prefix + ":iddigest", key)
        return self.digest_of.get(key)

    def signature(self, key: str) -> np.ndarray | None:
        """The entry's signature; None for an id the index does not hold."""
        if self.redis is not None:
            raw = self.redis.hget(self.prefix + ":sig", key)
            return np.frombuffer(raw, dtype=np.uint32) if raw is not None else None
        return self.sigs.get(key)

    def candidates(self, keys: list[bytes]) -> set[str]:
        """Ids sharing a band with these band keys. Redis members are plain UTF-8 ids; anything
        else (a foreign or planted value) is skipped, never decoded further."""
        found: set = set()
        for key, table in zip(keys, self.lsh.hashtables):
            found.update(table.get(key))
        if self.redis is None:
            return found
        ids = set()
        for k in found:
            try:
                ids.add(k.decode())
            except UnicodeDecodeError:
                log.warning("dedupe index %s: ignored a band member that is not an id (%r...)", self.prefix, k[:16])
        return ids

    def add(self, key: str, digest: bytes, row: np.ndarray, bands: list[bytes]) -> None:
        if self.redis is not None:
            self.redis.hset(self.prefix + ":sig", key, row.astype(np.uint32).tobytes())
            if digest:
                self.redis.hset(self.prefix + ":digest", digest, key)
                self.redis.hset(self.prefix + ":iddigest", key, digest)
        else:
            self.sigs[key] = row
            if digest:
                self.digests[digest] = key
                self.digest_of[key] = digest
        stored = self._id(key)
        self.lsh.keys.insert(stored, *bands)
        for band, table in zip(bands, self.lsh.hashtables):
            table.insert(band, stored)

    def remove(self, key: str) -> None:
        """Drop an entry (signature, digest, LSH bands); nothing when it is absent."""
        digest = self.digest_for(key)
        if self.redis is not None:
            if digest and self.exact(digest) == key:
                self.redis.hdel(self.prefix + ":digest", digest)
            self.redis.hdel(self.prefix + ":iddigest", key)
            self.redis.hdel(self.prefix + ":sig", key)
        else:
            if digest and self.digests.get(digest) == key:
                del self.digests[digest]
            self.digest_of.pop(key, None)
            self.sigs.pop(key, None)
        if self._id(key) in self.lsh.keys:
            self.lsh.remove(self._id(key))

    def ids(self) -> Iterator[str]:
        if self.redis is not None:
            yield from (k.decode() for k, _ in self.redis.hscan_iter(self.prefix + ":sig", count=1000))
        else:
            yield from list(self.sigs)

    def drop(self) -> None:
        """Delete a Redis store's keys (ours and datasketch's bands)."""
        if self.redis is not None:
            keys = list(self.redis.scan_iter(match=self.prefix + "*"))
            for chunk in range(0, len(keys), 1000):
                self.redis.delete(*keys[chunk : chunk + 1000])


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
        table = pq.read_table(delta)
        ids, ops, digests = (table.column(c).to_pylist() for c in ("id", "op", "digest"))
        sigs = table.column("signature").combine_chunks().values.to_numpy().reshape(-1, self.cfg.num_perm)
        for key in ids:
            self.store.remove(key)
        adds = [i for i, op in enumerate(ops) if op == "add"]
        rows = sigs[adds] if adds else np.zeros((0, self.cfg.num_perm), np.uint32)
        for i, row, bands in zip(adds, rows, bands_of(self.store.lsh, rows)):
            self.store.add(ids[i], digests[i], row, bands)
        if self.client is not None:
            self.client.sadd(self.store.prefix + ":applied", delta_id)
        else:
            self.applied_memory.add(delta_id)
            self._save()
        log.info("dedupe index %s: applied %s (%d added, %d removed)", self.cfg.index_name, delta_id,
                 len(adds), len(ids) - len(adds))
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
        ids = list(self.store.ids())
        s = self.store
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
        for key, digest, row, bands in zip(table.column("id").to_pylist(), table.column("digest").to_pylist(),
                                           sigs, bands_of(self.store.lsh, sigs)):
            self.store.add(key, digest, row, bands)


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
    additions and removals, kept apart so they reach the index only through a committed delta."""

    def __init__(self, cfg: DedupeConfig, workdir: str | Path | None = None):
        self.cfg = cfg
        self.client = connect(cfg.redis_url) if cfg.index == "redis" else None
        self.base = Persistent(cfg, workdir, self.client) if cfg.index_name is not None else None
        if self.base is not None:
            self.base.apply_pending()
        prefix = f"forja:dedupe:run:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.run = Store(cfg, self.client, prefix)
        self.masked: set[str] = set()  # base entries this run removed (their text changed)
        self.lsh = self.run.lsh

    def __len__(self) -> int:
        """Entries the persistent index held when this run started."""
        return len(self.base.store) if self.base is not None else 0

    def _base(self, key: str) -> bool:
        return self.base is not None and key not in self.masked and self.base.store.has(key)

    def has(self, key: str) -> bool:
        """Whether a document with this id is indexed (kept by this or an earlier run)."""
        return self.run.has(key) or self._base(key)

    def digest_for(self, key: str) -> bytes | None:
        """The exact digest the indexed document with this id had (None if unknown)."""
        if self.run.has(key):
            return self.run.digest_for(key)
        return self.base.store.digest_for(key) if self._base(key) else None

    def exact(self, digest: bytes) -> str | None:
        if (got := self.run.exact(digest)) is not None:
            return got
        got = self.base.store.exact(digest) if self.base is not None else None
        return got if got is not None and got not in self.masked else None

    def signature(self, key: str) -> np.ndarray | None:
        """The signature of an indexed document; None for an id the index does not hold."""
        if self.run.has(key):
            return self.run.signature(key)
        return self.base.store.signature(key) if self._base(key) else None

    def candidates(self, keys: list[bytes]) -> set[str]:
        """Ids of indexed documents sharing at least one band with these band keys."""
        found = self.run.candidates(keys)
        if self.base is not None:
            found |= self.base.store.candidates(keys) - self.masked
        return found

    def bands(self, block: np.ndarray) -> list[list[bytes]]:
        return bands_of(self.lsh, block)

    def add(self, key: str, digest: bytes, row: np.ndarray, bands: list[bytes]) -> None:
        self.run.add(key, digest, row, bands)

    def remove(self, key: str) -> None:
        """Drop an indexed document (its text changed): from this run's view only."""
        self.run.remove(key)
        if self.base is not None and self.base.store.has(key):
            self.masked.add(key)

    def write_delta(self, folder: Path, delta_id: str) -> int:
        """Write this run's change to the persistent index into folder (applied after commit);
        returns the number of rows."""
        if self.base is None:
            return 0
        added = list(self.run.ids())
        removed = sorted(self.masked - set(added))
        sigs = [self.run.signature(k) for k in added] + [np.zeros(self.cfg.num_perm, np.uint32)] * len(removed)
        sigs_arr = np.stack(sigs) if sigs else np.zeros((0, self.cfg.num_perm), np.uint32)
        table = pa.table({
            "id": added + removed, "op": ["add"] * len(added) + ["remove"] * len(removed),
            "digest": [self.run.digest_for(k) or b"" for k in added] + [b""] * len(removed),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs_arr.ravel(), pa.uint32()), self.cfg.num_perm),
        }).replace_schema_metadata({"forja.delta_id": delta_id, "forja.index": identity(self.cfg)})
        pq.write_table(table, folder / DELTA, compression="zstd")
        return table.num_rows

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

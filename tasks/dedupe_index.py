"""Where dedupe keeps what it has seen: MinHash LSH bands, signatures and exact digests.

`memory` lives for one run unless `index_name` is set, in which case it is saved to
<workdir>/dedupe-index/<name>.parquet after a successful run and loaded by the next one.
`redis` puts datasketch's LSH storage and the signatures in Redis, so the index can
outgrow one process and, with `index_name`, persists across runs: a later crawl is
deduplicated against everything indexed before it (an incremental refresh).

Each entry also remembers its document's exact digest, so a later run can tell a document
it kept before with the same text (unchanged) from a changed one, whose old entry is
removed before the new text is compared with the rest.
"""
from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHashLSH

from tasks.config import DedupeConfig

# (false-positive, false-negative) weights for choosing bands and rows: candidates are
# verified against the threshold afterwards, so missing a duplicate is the costlier error.
LSH_WEIGHTS = (0.1, 0.9)


class DedupeIndex:
    """LSH candidates plus the signatures and digests needed to confirm them."""

    def __init__(self, cfg: DedupeConfig, workdir: str | Path | None = None):
        self.cfg = cfg
        self.persistent = cfg.index_name is not None
        name = cfg.index_name or f"run-{uuid.uuid4().hex[:12]}"
        self.file = Path(workdir or ".") / "dedupe-index" / f"{name}.parquet" if self.persistent else None
        if cfg.index == "redis":
            import redis

            self.redis = redis.Redis.from_url(cfg.redis_url)
            self.prefix = f"forja:dedupe:{name}"
            host, port, db = self._redis_params()
            self.lsh = MinHashLSH(
                threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS,
                storage_config={"type": "redis", "basename": self.prefix.encode(),
                                "redis": {"host": host, "port": port, "db": db}},
            )
            self.redis.ping()
        else:
            self.redis = None
            self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
            self.sigs: dict[str, np.ndarray] = {}
            self.digests: dict[bytes, str] = {}  # exact digest -> the id kept with it
            self.digest_of: dict[str, bytes] = {}  # id -> its exact digest
            if self.file is not None and self.file.exists():
                self._load()

    def _redis_params(self) -> tuple[str, int, int]:
        kw = self.redis.connection_pool.connection_kwargs
        return kw.get("host", "127.0.0.1"), int(kw.get("port", 6379)), int(kw.get("db", 0))

    def __len__(self) -> int:
        return int(self.redis.hlen(self.prefix + ":sig")) if self.redis is not None else len(self.sigs)

    def exact(self, digest: bytes) -> str | None:
        if self.redis is not None:
            got = self.redis.hget(self.prefix + ":digest", digest)
            return got.decode() if got is not None else None
        return self.digests.get(digest)

    def bands(self, block: np.ndarray) -> list[list[bytes]]:
        """The LSH bucket key of every band of each signature row in block.

        These are the keys MinHashLSH.query/insert derive one band at a time (the band's
        values byte-swapped, as bytes); deriving them for a whole block at once takes the
        per-document work in the deduplicating loop down to dictionary lookups.
        """
        swapped = np.ascontiguousarray(block.astype(np.uint32).byteswap())
        cuts = [(4 * start, 4 * end) for start, end in self.lsh.hashranges]
        return [[raw[a:b] for a, b in cuts] for raw in map(bytes, swapped)]

    def candidates(self, keys: list[bytes]) -> set[str]:
        """Ids of indexed documents sharing at least one band with these band keys."""
        found: set = set()
        for key, table in zip(keys, self.lsh.hashtables):
            found.update(table.get(key))
        if self.lsh.prepickle:  # Redis storage holds pickled ids
            return {pickle.loads(k) for k in found}
        return found

    def has(self, key: str) -> bool:
        """Whether a document with this id is indexed (kept by this or an earlier run)."""
        if self.redis is not None:
            return bool(self.redis.hexists(self.prefix + ":sig", key))
        return key in self.sigs

    def digest_for(self, key: str) -> bytes | None:
        """The exact digest the indexed document with this id had (None if unknown)."""
        if self.redis is not None:
            return self.redis.hget(self.prefix + ":iddigest", key)
        return self.digest_of.get(key)

    def remove(self, key: str) -> None:
        """Drop an indexed document (its text changed): signature, digest and LSH bands."""
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
            del self.sigs[key]
        self.lsh.remove(key)

    def signature(self, key: str) -> np.ndarray:
        if self.redis is not None:
            return np.frombuffer(self.redis.hget(self.prefix + ":sig", key), dtype=np.uint32)
        return self.sigs[key]

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
        stored = pickle.dumps(key) if self.lsh.prepickle else key
        self.lsh.keys.insert(stored, *bands)
        for band, table in zip(bands, self.lsh.hashtables):
            table.insert(band, stored)

    def close(self, success: bool) -> None:
        """Save a persistent memory index; drop a run-scoped Redis index."""
        if self.redis is not None:
            if not self.persistent:
                keys = list(self.redis.scan_iter(match=self.prefix + "*"))  # ours and datasketch's bands
                for chunk in range(0, len(keys), 1000):
                    self.redis.delete(*keys[chunk : chunk + 1000])
            self.redis.close()
        elif self.persistent and success:
            self._save()

    def _save(self) -> None:
        ids = list(self.sigs)
        inv = self.digest_of
        sigs = np.stack([self.sigs[i] for i in ids]) if ids else np.zeros((0, self.cfg.num_perm), np.uint32)
        table = pa.table({
            "id": ids, "digest": [inv.get(i, b"") for i in ids],
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel(), pa.uint32()), self.cfg.num_perm),
        })
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.file)

    def _load(self) -> None:
        table = pq.read_table(self.file)
        sigs = table.column("signature").combine_chunks().values.to_numpy().reshape(-1, self.cfg.num_perm)
        for key, digest, row, bands in zip(table.column("id").to_pylist(), table.column("digest").to_pylist(),
                                           sigs, self.bands(sigs)):
            self.add(key, digest, row, bands)

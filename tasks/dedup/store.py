"""One set of dedupe index entries, in memory or in Redis, read and written a batch at a time.

An entry is an id with its MinHash signature, its exact digest and its LSH band keys. Redis
entries use datasketch's MinHashLSH storage layout (`<prefix>_keys`, `<prefix>_bucket_<i>`),
so datasketch's own `query()` finds them, but every read and write here goes through one
Redis pipeline per batch of documents: a batch's lookups (seen? indexed? exact digest? band
members?) are one round trip, its candidates' signatures another, its writes a third. The
per-command calls of datasketch's storage made about fifty round trips per document.

A run-scoped store also remembers which ids the run has seen and the url of each document
the run kept, so neither needs a Python structure that grows with the corpus.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from datasketch import MinHashLSH

from tasks.config import DedupeConfig

log = logging.getLogger("forja.dedupe")
# (false-positive, false-negative) weights for choosing bands and rows: candidates are
# verified against the threshold afterwards, so missing a duplicate is the costlier error.
LSH_WEIGHTS = (0.1, 0.9)
SCAN = 1000  # keys per SCAN/HSCAN step and per DEL


@dataclass
class Lookup:
    """What a store holds about each document of a batch, position by position."""

    seen: list[bool]  # the id was already read by this run (run stores only)
    has: list[bool]  # an entry with this id exists
    digest_of_id: list[bytes | None]  # that entry's exact digest
    exact: list[str | None]  # the id of the entry holding this document's exact digest
    candidates: list[set[str]]  # ids sharing at least one band with the document


class Store:
    """Entries in memory (dicts and a dict-backed MinHashLSH) or in Redis under a key prefix."""

    def __init__(self, cfg: DedupeConfig, client=None, prefix: str = ""):
        self.cfg, self.redis, self.prefix = cfg, client, prefix
        if client is not None:
            kw = client.connection_pool.connection_kwargs
            conn = {k: kw[k] for k in ("host", "port", "db", "username", "password", "socket_timeout",
                                       "socket_connect_timeout") if kw.get(k) is not None}
            # datasketch's object only names the keys (and answers its own query() in tests);
            # it opens no connection unless asked to read or write.
            self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS, prepickle=False,
                                  storage_config={"type": "redis", "basename": prefix.encode(), "redis": conn})
            self._keys = self.lsh.keys._name
            self._buckets = [t._name for t in self.lsh.hashtables]
        else:
            self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
            self.sigs: dict[str, np.ndarray] = {}
            self.digests: dict[bytes, str] = {}  # exact digest -> the id kept with it
            self.digest_of: dict[str, bytes] = {}  # id -> its exact digest
            self.seen: set[str] = set()
            self.urls: dict[str, str] = {}

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def __len__(self) -> int:
        return int(self.redis.hlen(self._k("sig"))) if self.redis is not None else len(self.sigs)

    # -- reads ---------------------------------------------------------------------------------

    def lookup(self, ids: Sequence[str], digests: Sequence[bytes], bands: Sequence[list[bytes]]) -> Lookup:
        """Everything the decision needs about a batch except signatures: one round trip."""
        if self.redis is None:
            tables = self.lsh.hashtables
            return Lookup(
                seen=[k in self.seen for k in ids], has=[k in self.sigs for k in ids],
                digest_of_id=[self.digest_of.get(k) for k in ids], exact=[self.digests.get(d) for d in digests],
                candidates=[set().union(*(t.get(b) for b, t in zip(kb, tables))) for kb in bands])
        if not ids:
            return Lookup([], [], [], [], [])
        # Per document: HEXISTS and one SUNION of its band buckets; per batch: the rest.
        pipe = self.redis.pipeline(transaction=False)
        pipe.smismember(self._k("seen"), list(ids))
        pipe.hmget(self._k("iddigest"), list(ids))
        pipe.hmget(self._k("digest"), list(digests))
        for key, kb in zip(ids, bands):
            pipe.hexists(self._k("sig"), key)
            pipe.sunion([bucket + band for band, bucket in zip(kb, self._buckets)])
        seen, digest_of_id, exact, *rest = pipe.execute()
        return Lookup(seen=[bool(x) for x in seen], has=[bool(x) for x in rest[0::2]], digest_of_id=digest_of_id,
                      exact=[e.decode() if e is not None else None for e in exact],
                      candidates=[self._decode(m) for m in rest[1::2]])

    def _decode(self, members: set) -> set[str]:
        """Redis band members are plain UTF-8 ids; anything else (a foreign or planted value) is
        skipped, never decoded further (and never unpickled)."""
        ids = set()
        for k in members:
            try:
                ids.add(k.decode())
            except UnicodeDecodeError:
                log.warning("dedupe index %s: ignored a band member that is not an id (%r...)", self.prefix, k[:16])
        return ids

    def signatures(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The signatures of the ids this store holds (absent ids are left out): one round trip."""
        if self.redis is None:
            return {k: self.sigs[k] for k in ids if k in self.sigs}
        if not ids:
            return {}
        raw = self.redis.hmget(self._k("sig"), list(ids))
        return {k: np.frombuffer(r, dtype=np.uint32) for k, r in zip(ids, raw) if r is not None}

    def digests_of(self, ids: Sequence[str]) -> list[bytes | None]:
        if self.redis is None:
            return [self.digest_of.get(k) for k in ids]
        return self.redis.hmget(self._k("iddigest"), list(ids)) if ids else []

    def urls_of(self, ids: Sequence[str]) -> list[str | None]:
        """The url recorded (note_kept) for each id, None where none was."""
        if self.redis is None:
            return [self.urls.get(k) for k in ids]
        if not ids:
            return []
        return [u.decode() if u is not None else None for u in self.redis.hmget(self._k("url"), list(ids))]

    def id_batches(self, size: int = SCAN) -> Iterator[list[str]]:
        """Every entry's id, a batch at a time."""
        if self.redis is None:
            ids = list(self.sigs)
            yield from (ids[i : i + size] for i in range(0, len(ids), size))
            return
        cursor = None
        while cursor != 0:
            cursor, found = self.redis.hscan(self._k("sig"), cursor or 0, count=size)
            if found:
                yield [k.decode() for k in found]

    # -- writes --------------------------------------------------------------------------------

    def write(self, adds: Sequence[tuple[str, bytes, np.ndarray, list[bytes]]] = (), seen: Sequence[str] = (),
              urls: Sequence[tuple[str, str]] = ()) -> None:
        """Add entries (id, digest, signature, band keys), mark ids seen and record kept documents'
        urls: one round trip. An add overwrites an entry with the same id."""
        if self.redis is None:
            for key, digest, row, bands in adds:
                self.sigs[key] = row
                if digest:
                    self.digests[digest] = key
                    self.digest_of[key] = digest
                self.lsh.keys.insert(key, *bands)
                for band, table in zip(bands, self.lsh.hashtables):
                    table.insert(band, key)
            self.seen.update(seen)
            self.urls.update(urls)
            return
        if not (adds or seen or urls):
            return
        pipe = self.redis.pipeline(transaction=False)
        if adds:
            # One command per hash for the whole batch; per entry, its band list and band sets.
            stored = [key.encode() for key, *_ in adds]
            pipe.hset(self._k("sig"), mapping={k: np.asarray(row, dtype=np.uint32).tobytes()
                                               for k, (_, _, row, _) in zip(stored, adds)})
            with_digest = [(k, digest) for k, (_, digest, _, _) in zip(stored, adds) if digest]
            if with_digest:
                pipe.hset(self._k("digest"), mapping={digest: k for k, digest in with_digest})
                pipe.hset(self._k("iddigest"), mapping=dict(with_digest))
            pipe.hset(self._keys, mapping={k: self._keys + k for k in stored})  # datasketch: key -> band list
            pipe.delete(*[self._keys + k for k in stored])  # an add overwrites
            for k, (_, _, _, bands) in zip(stored, adds):
                pipe.rpush(self._keys + k, *bands)
                for band, bucket in zip(bands, self._buckets):
                    pipe.sadd(bucket + band, k)
            for i, bucket in enumerate(self._buckets):
                pipe.hset(bucket, mapping={bands[i]: bucket + bands[i] for *_, bands in adds})
        if seen:
            pipe.sadd(self._k("seen"), *seen)
        if urls:
            pipe.hset(self._k("url"), mapping=dict(urls))
        pipe.execute()

    def remove(self, ids: Sequence[str]) -> None:
        """Drop these entries (signature, digest, LSH bands); absent ids are skipped. A few round
        trips for the whole batch."""
        if self.redis is None:
            for key in ids:
                digest = self.digest_of.pop(key, None)
                if digest and self.digests.get(digest) == key:
                    del self.digests[digest]
                self.sigs.pop(key, None)
                if key in self.lsh.keys:
                    self.lsh.remove(key)
            return
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key in ids:
            pipe.hget(self._k("iddigest"), key)
            pipe.lrange(self._keys + key.encode(), 0, -1)
        got = pipe.execute()
        digests, bands = got[0::2], got[1::2]
        holders = self.redis.hmget(self._k("digest"), [d for d in digests if d]) if any(digests) else []
        holder = dict(zip([d for d in digests if d], holders))
        pipe = self.redis.pipeline(transaction=False)
        emptied, at = [], []  # (bucket, band) and where its EXISTS reply will be
        for key, digest, kb in zip(ids, digests, bands):
            stored = key.encode()
            if digest and holder.get(digest) == stored:
                pipe.hdel(self._k("digest"), digest)
            pipe.hdel(self._k("iddigest"), key)
            pipe.hdel(self._k("sig"), key)
            pipe.hdel(self._keys, stored)
            pipe.delete(self._keys + stored)
            for band, bucket in zip(kb, self._buckets):
                pipe.srem(bucket + band, stored)
                at.append(len(pipe.command_stack))
                pipe.exists(bucket + band)
                emptied.append((bucket, band))
        results = pipe.execute()
        gone = [pair for pair, i in zip(emptied, at) if not results[i]]
        if gone:  # as datasketch does: an emptied bucket leaves its table's hash too
            pipe = self.redis.pipeline(transaction=False)
            for bucket, band in gone:
                pipe.hdel(bucket, band)
            pipe.execute()

    def drop(self) -> None:
        """Delete a Redis store's keys (ours and the LSH's). The LSH's hashes name every key it
        made (field -> key), so this walks the store itself, never the whole database."""
        if self.redis is None:
            return
        tables = [self._keys, *self._buckets]
        cursors = {name: 0 for name in tables}
        while cursors:  # one page of every table per round trip, their keys deleted in the next
            pipe = self.redis.pipeline(transaction=False)
            for name, cursor in cursors.items():
                pipe.hscan(name, cursor, count=SCAN)
            pages = pipe.execute()
            doomed = [key for _, found in pages for key in found.values()]
            cursors = {name: cursor for name, (cursor, _) in zip(cursors, pages) if cursor != 0}
            for start in range(0, len(doomed), SCAN):
                pipe.delete(*doomed[start : start + SCAN])
            pipe.execute()
        self.redis.delete(*tables, *(self._k(n) for n in ("sig", "digest", "iddigest", "seen", "url")))

"""dedupe as units of work plus a batched decision (issue 13): the signature units may finish in
any order, the Redis index answers exactly as the memory one in a few round trips per batch,
and removed.parquet still names the url of the document each removed one duplicates."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.connection

from tasks import dedupe as d
from tasks import stage
from tasks.config import DedupeConfig
from tasks.dedup.signatures import sign_shard


def crawl(folder: Path, shards: int = 4, per_shard: int = 125, seed: int = 0) -> list[Path]:
    """shards x per_shard documents of random words; about one in eight is an edited copy of an
    earlier one (same shard or an earlier shard), a few are exact copies in other case/spacing,
    and one id repeats."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(4000)]
    texts: list[str] = []
    for _ in range(shards * per_shard):
        r = rng.random()
        if texts and r < 0.12:
            words = texts[int(rng.integers(len(texts)))].split()
            words[int(rng.integers(len(words)))] = "trocada"
            texts.append(" ".join(words))
        elif texts and r < 0.15:
            texts.append("  " + texts[int(rng.integers(len(texts)))].upper())
        else:
            texts.append(" ".join(rng.choice(vocab, 120)))
    ids = [f"doc{i}" for i in range(len(texts))]
    ids[-1] = ids[3]  # the same id twice: "seen"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(shards):
        part = slice(n * per_shard, (n + 1) * per_shard)
        path = folder / stage.shard_name("documents", n)
        pq.write_table(pa.table({"id": ids[part], "url": [f"http://x/{i}" for i in ids[part]], "text": texts[part]}),
                       path)
        paths.append(path)
    return paths


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def outcome(folder: Path) -> tuple[list[list[str]], list[dict]]:
    kept = [pq.read_table(p).column("id").to_pylist() for p in stage.shards(folder)]
    return kept, pq.read_table(folder / "removed.parquet").to_pylist()


def test_signature_units_in_any_order_give_the_same_stage_output(tmp_path):
    cfg = DedupeConfig(threshold=0.7)
    shards = crawl(tmp_path / "crawl")
    normal = tmp_path / "normal"
    normal.mkdir()
    stats = d.build(cfg, shards, normal)
    # The units run by hand, last shard first (as a cluster may finish them), then the decision.
    reverse = tmp_path / "reverse"
    reverse.mkdir()
    for n in reversed(range(len(shards))):
        assert sign_shard.fn(cfg, str(shards[n]), str(reverse), n) == {"shard": n, "documents": 125}
    assert d._decide(cfg, shards, reverse, None, "reverse") == stats
    assert digests(reverse) == digests(normal)
    # Only the stage's outputs remain: the signature files and the pending removed rows are gone.
    assert sorted(digests(normal)) == [stage.shard_name("documents", n) for n in range(4)] + ["removed.parquet"]
    assert stats["removed"]["near"] > 20 and stats["removed"]["exact"] > 3 and stats["removed"]["seen"] == 1


def count_round_trips(monkeypatch) -> list[int]:
    """Count every request the redis client sends (a pipeline is one send, one round trip)."""
    sent = [0]
    original = redis.connection.Connection.send_packed_command

    def counted(self, *args, **kwargs):
        sent[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counted)
    return sent


def test_redis_index_decides_as_the_memory_index_in_few_round_trips(tmp_path, redis_url, monkeypatch):
    """Two incremental runs (the second repeats, edits and adds documents) on each index: the same
    kept and removed documents, and the Redis traffic of the second run (index delta applied,
    lookups, writes, delta written, run store dropped) stays far under one round trip per
    document, where datasketch's per-command storage made about fifty."""
    monkeypatch.setattr(d, "CHUNK", 100)  # several decision batches per shard
    first, second = crawl(tmp_path / "c1", shards=2, seed=1), crawl(tmp_path / "c2", seed=1)
    edited = pq.read_table(second[0]).to_pydict()
    edited["text"][0] = edited["text"][0] + " uma frase nova no fim"  # a changed page
    pq.write_table(pa.table(edited), second[0])
    results, trips = {}, {}
    for storage in ("memory", "redis"):
        extra = {"index": "redis", "redis_url": redis_url} if storage == "redis" else {}
        cfg = DedupeConfig(threshold=0.7, index_name=f"rt-{storage}-{tmp_path.name}", **extra)
        work = tmp_path / storage
        runs = []
        for n, shards in enumerate((first, second)):
            out = work / f"o{n}"
            out.mkdir(parents=True)
            sent = count_round_trips(monkeypatch)
            stats = d.build(cfg, shards, out, str(work))
            d.commit(cfg, out, str(work))
            trips[storage] = sent[0]
            runs.append((outcome(out), stats))
        results[storage] = runs
    assert results["redis"] == results["memory"]
    (_, stats2) = results["redis"][1]
    assert stats2["kept"]["unchanged"] > 100 and stats2["kept"]["changed"] == 1 and stats2["kept"]["new"] > 100
    docs = stats2["documents_in"]
    print(f"redis round trips, second run: {trips['redis']} for {docs} documents ({trips['redis'] / docs:.3f} each)")
    assert trips["redis"] <= 0.2 * docs
    assert not redis.Redis.from_url(redis_url).keys("forja:dedupe:run:*")  # each run's own store was dropped


def test_duplicate_of_url_is_resolved_for_a_target_kept_later_in_the_run(tmp_path):
    """A near copy read before the page it copies (kept by an earlier run, kept again later in
    this one): removed.parquet still names that page's url, found after the decision pass."""
    shards = crawl(tmp_path / "c", shards=1, per_shard=40, seed=3)
    table = pq.read_table(shards[0]).to_pydict()
    original = table["text"][5]
    cfg = DedupeConfig(threshold=0.7, index_name="later")
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"id": ["page"], "url": ["http://x/page"], "text": [original]}), one)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    out1.mkdir()
    out2.mkdir()
    d.build(cfg, [one], out1, str(tmp_path))
    d.commit(cfg, out1, str(tmp_path))
    copy = original.replace(original.split()[7], "trocada", 1)
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"id": ["copy", "other", "page"], "url": ["http://x/copy", "http://x/other", "http://x/page"],
                             "text": [copy, table["text"][0], original]}), two)
    d.build(cfg, [two], out2, str(tmp_path))
    removed = pq.read_table(out2 / "removed.parquet").to_pylist()
    assert [(r["id"], r["kind"], r["duplicate_of"], r["duplicate_of_url"]) for r in removed] == \
        [("copy", "near", "page", "http://x/page")]
    assert pq.read_table(out2 / "documents-00000.parquet").column("id").to_pylist() == ["other", "page"]


def test_a_signature_file_shorter_than_its_shard_is_a_clear_error(tmp_path):
    cfg = DedupeConfig()
    shards = crawl(tmp_path / "c", shards=1, per_shard=30)
    out = tmp_path / "out"
    out.mkdir()
    sign_shard.fn(cfg, str(shards[0]), str(out), 0)
    path = out / stage.shard_name("signatures", 0)
    pq.write_table(pq.read_table(path).slice(0, 10), path)
    with pytest.raises(RuntimeError, match="signatures-00000.parquet has fewer rows than its crawl shard"):
        d._decide(cfg, shards, out, None, "x")

"""The dedupe index under faults (issue 12, items 1, 3 and 10): kill -9 mid-stage, a planted
pickle in Redis, a Redis that accepts connections and never answers."""
from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.faults import fault_point
from tasks import dedupe as d
from tasks import stage
from tasks.config import DedupeConfig
from tests.fixtures.docs import read_docs
from tests.tasks.test_dedupe import corpus

pytestmark = pytest.mark.fault


def dedupe_stage(cfg: DedupeConfig, crawled: stage.Manifest, workdir: Path) -> stage.Manifest:
    """The dedupe task's body without Prefect: run the stage, then apply its index delta."""
    def build(out, key):
        stats = d.build(cfg, stage.shards(crawled.folder), out, str(workdir), key)
        fault_point("test:dedupe-built")
        return stats

    m = stage.run_stage("dedupe", cfg, [crawled], workdir, build, d.CODE)
    d.commit(cfg, m.folder, str(workdir))
    return m


def killed_at(point: str, *args) -> int:
    """Run dedupe_stage in a forked child armed to SIGKILL itself at point; its wait status.
    (A fork, not a new interpreter: importing Prefect again would cost seconds per kill.)"""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of the parent's state, ever
        os.environ["FORJA_FAULT"] = point
        try:
            dedupe_stage(*args)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return status


def crawl_output(tmp_path: Path) -> stage.Manifest:
    ids, texts = corpus()
    # a, b, c are kept; near and exact are removed as duplicates
    folder = tmp_path / "crawl"
    folder.mkdir()
    pq.write_table(pa.table({"id": ids, "url": [f"http://x/{i}" for i in ids], "text": texts}),
                   folder / stage.shard_name("documents", 0))
    return stage.Manifest(stage="crawl", key="c0", folder=str(folder), inputs={}, config={}, code_version="",
                          created_at=0, files=[], stats={})


@pytest.mark.parametrize("storage,point", [("memory", "test:dedupe-built"), ("memory", "stage:dedupe:renamed"),
                                           ("redis", "dedupe:indexed")])
def test_a_run_killed_during_dedupe_loses_no_document(storage, point, tmp_path, request):
    extra = {"index": "redis", "redis_url": request.getfixturevalue("redis_url")} if storage == "redis" else {}
    cfg = DedupeConfig(threshold=0.7, index_name=f"kill-{tmp_path.name}", incremental="new_only", **extra)
    crawled = crawl_output(tmp_path)
    status = killed_at(point, cfg, crawled, tmp_path / "work")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    rerun = dedupe_stage(cfg, crawled, tmp_path / "work")
    assert read_docs(Path(rerun.folder)).column("id").to_pylist() == ["a", "b", "c"]
    assert rerun.stats["kept"] == {"new": 3, "changed": 0, "unchanged": 0}
    # the index holds the three kept documents, applied once: the next run sees them all
    index = d.DedupeIndex(cfg, str(tmp_path / "work"))
    try:
        assert len(index) == 3
    finally:
        index.close()


class Planted:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_redis_index_is_never_unpickled(tmp_path, redis_url):
    import redis

    cfg = DedupeConfig(threshold=0.7, index="redis", redis_url=redis_url, index_name=f"pickle-{tmp_path.name}")
    crawled = crawl_output(tmp_path)
    first = tmp_path / "first"
    first.mkdir()
    d.build(cfg, stage.shards(crawled.folder), first, str(tmp_path))
    d.commit(cfg, first, str(tmp_path))
    client = redis.Redis.from_url(redis_url)
    marker = tmp_path / "pwned"
    buckets = [k for k in client.scan_iter(match=f"forja:dedupe:{cfg.index_name}_bucket_*") if client.type(k) == b"set"]
    assert buckets
    for k in buckets:  # what datasketch's prepickle storage would unpickle on every query
        client.sadd(k, pickle.dumps(Planted(marker)))
    second = tmp_path / "second"
    second.mkdir()
    stats = d.build(cfg, stage.shards(crawled.folder), second, str(tmp_path))
    assert not marker.exists()
    assert stats["kept"]["unchanged"] == 3 and read_docs(second).num_rows == 3


def test_a_stalled_redis_times_out_naming_its_url(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: a clear error within the timeout
    (the default timeouts, shortened here; a URL may set its own with ?socket_timeout=)."""
    from tasks.dedup import dedupe_index

    monkeypatch.setattr(dedupe_index, "REDIS_TIMEOUT_S", 0.5)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    cfg = DedupeConfig(index="redis", redis_url=url, index_name="stalled")
    outcome = []

    def attempt():
        try:
            d.find_duplicates(["a"], ["um dois tres"], cfg, d.DedupeIndex(cfg, str(tmp_path)))
            outcome.append("answered")
        except Exception as e:
            outcome.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    try:
        assert outcome, "a stalled Redis hung the dedupe index"
        (err,) = outcome
        assert isinstance(err, ConnectionError) and url in str(err) and "did not answer" in str(err)
        assert time.monotonic() - t0 < 5
    finally:
        server.close()

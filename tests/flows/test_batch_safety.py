"""Batch inference that cannot mix two jobs in one output: a resume after the alias moved to
another version is refused (or starts fresh on request), and two jobs on one output do not
both write (the second is refused while the first holds the lock; a killed holder frees it).

Runs the flow's body (flows.batch.run_batch) without Prefect, on tiny random models
registered in a SQLite store (tests/model/test_serving_bounds.py builds them).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from tests.model.test_serving_bounds import register_tiny

SAMPLING = {"max_new_tokens": 4, "temperature": 1.0, "seed": 3}  # the two random models differ
PROMPTS = [f"O Linux {i}" for i in range(5)]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    import mlflow

    from tasks.models import tracking

    workdir = tmp_path_factory.mktemp("batch")
    v1, v2 = register_tiny(workdir, "tinyb", seed=0), register_tiny(workdir, "tinyb", seed=1)
    uri = tracking.tracking_uri(workdir)
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias("tinyb", "champion", v1.version)
    src = workdir / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return SimpleNamespace(workdir=workdir, uri=uri, client=client, v1=v1, v2=v2, src=str(src))


def outputs(out):
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    return table.column("row").to_pylist(), table.column("output").to_pylist()


@pytest.mark.fault
def test_a_resume_after_the_alias_moved_is_refused_then_fresh_starts_over(two_versions, tmp_path):
    from flows.batch import BatchMismatch, run_batch, write_shard
    from model.generate import Sampling, generate_text
    from tasks.models import registry

    t = two_versions
    out = tmp_path / "out"

    def dies_after_first(*args):
        write_shard(*args)
        raise Crash("killed after shard 0")

    t.client.set_registered_model_alias("tinyb", "champion", t.v1.version)
    with pytest.raises(Crash):
        run_batch("models:/tinyb@champion", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING,
                  shard=dies_after_first)
    first = (out / "part-00000.parquet").stat().st_mtime_ns
    t.client.set_registered_model_alias("tinyb", "champion", t.v2.version)  # the alias moves meanwhile
    with pytest.raises(BatchMismatch) as e:
        run_batch("models:/tinyb@champion", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING)
    assert "tinyb/1" in str(e.value) and "tinyb/2" in str(e.value) and "--fresh" in str(e.value)
    assert (out / "part-00000.parquet").stat().st_mtime_ns == first and not (out / "part-00001.parquet").exists()
    with pytest.raises(BatchMismatch, match="sampling"):  # other sampling: another job too
        run_batch("models:/tinyb/1", t.src, str(out), t.uri, shard_size=2, sampling={**SAMPLING, "max_new_tokens": 5})

    summary = run_batch("models:/tinyb@champion", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING, fresh=True)
    assert summary["model"] == "tinyb/2" and summary["resumed_shards"] == 0 and summary["shards"] == 3
    assert json.loads((out / "_JOB.json").read_text())["weights_sha256"] == t.v2.tags["weights_sha256"]
    rows, texts = outputs(out)
    made = {v.version: generate_text(*registry.load_version(t.client, v), PROMPTS, Sampling(**SAMPLING))
            for v in (t.v1, t.v2)}
    assert rows == list(range(5)) and texts == made[t.v2.version] != made[t.v1.version]


@pytest.mark.fault
def test_two_jobs_on_one_output_one_is_refused_and_the_output_is_one_consistent_job(two_versions, tmp_path):
    from flows.batch import BatchConflict, run_batch, write_shard

    t = two_versions
    out = tmp_path / "out"
    started, release, result = threading.Event(), threading.Event(), {}

    def slow(*args):
        started.set()
        release.wait(30)
        write_shard(*args)

    def job_a():
        result["a"] = run_batch("models:/tinyb/1", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING, shard=slow)

    a = threading.Thread(target=job_a)
    a.start()
    try:
        assert started.wait(30)
        with pytest.raises(BatchConflict, match="another batch job"):  # B, even with another model, writes nothing
            run_batch("models:/tinyb/2", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING, fresh=True)
    finally:
        release.set()
        a.join(60)
    assert result["a"]["model"] == "tinyb/1" and json.loads((out / "_JOB.json").read_text())["model"] == "tinyb/1"
    rows, _ = outputs(out)
    assert rows == list(range(5)) and not list(out.glob(".part-*"))
    again = run_batch("models:/tinyb/1", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING)
    assert again["resumed_shards"] == 3  # the same job: nothing redone


@pytest.mark.fault
def test_a_killed_job_frees_its_output_for_the_next(two_versions, tmp_path):
    from flows.batch import LOCK, BatchConflict, run_batch

    t = two_versions
    out = tmp_path / "out"
    out.mkdir()
    # another job's processes holding the lock (flock(1) and its child share the locked file)
    holder = subprocess.Popen(["flock", str(out / LOCK), "sleep", "60"], start_new_session=True)
    try:
        deadline = time.time() + 10
        while subprocess.run(["flock", "-n", str(out / LOCK), "true"]).returncode == 0:  # until it holds it
            assert time.time() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        with pytest.raises(BatchConflict):
            run_batch("models:/tinyb/1", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING)
        assert not list(out.glob("part-*"))
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # kill -9: no cleanup, the kernel drops the lock
        holder.wait()
    assert run_batch("models:/tinyb/1", t.src, str(out), t.uri, shard_size=2, sampling=SAMPLING)["shards"] == 3

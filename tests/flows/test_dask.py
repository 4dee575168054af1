"""The data flow on a real Dask cluster on loopback (a `dask scheduler` and `dask worker` processes
from the venv): the same data files as on the local runner, the mapped units visible as task runs of
the flow run in the Prefect API, and a worker killed mid-shard costing nothing but time."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")
# Several shards per stage so units are mapped; a small vocabulary keeps tokenize short.
OVERRIDES = ["crawl.max_pages=16", "crawl.shard_docs=4", "tokenize.vocab_size=300"]
FAULT = "unit:normalize-shard:writing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT), DASK_DISTRIBUTED__WORKER__DAEMON="False")
    env.pop("FORJA_FAULT", None)
    return env | extra


class Cluster:
    """A dask scheduler on a free loopback port and its worker processes (started, then killed)."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.scheduler = self._spawn("scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port",
                                                   self.address.rsplit(":", 1)[1], "--no-dashboard"], worker_env())
        self.workers = []

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}-{len(self.procs)}.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def add_worker(self, nanny: bool = True, **env: str) -> subprocess.Popen:
        cmd = [str(DASK), "worker", self.address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
        p = self._spawn("worker", cmd + ([] if nanny else ["--no-nanny"]), worker_env(**env))
        self.workers.append(p)
        return p

    def wait_for_workers(self, n: int, timeout_s: float = 60) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout_s) as client:
            client.wait_for_workers(n, timeout=timeout_s)

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask-logs"))
    try:
        c.add_worker()
        c.add_worker()
        c.wait_for_workers(2)
        yield c
    finally:
        c.close()


def run_data(workdir: Path, runner: str):
    """The data flow in this process (the test harness's Prefect API); (summary, flow run id)."""
    from flows.pipeline import data

    state = data(config_path=str(ROOT / "configs/demo.yaml"), overrides=OVERRIDES, workdir=str(workdir),
                 runner=runner, return_state=True)
    return state.result(), state.state_details.flow_run_id


def data_digests(summary: dict) -> dict[str, dict[str, str]]:
    """stage -> {file: sha256} of the data files in each stage's manifest (the manifest itself aside)."""
    out = {}
    for stage, s in summary["stages"].items():
        manifest = json.loads((Path(s["folder"]) / "manifest.json").read_text())
        out[stage] = {f["path"]: f["sha256"] for f in manifest["files"]}
    return out


def task_run_names(flow_run_id) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


@pytest.fixture(scope="module")
def local_run(prefect_harness, tmp_path_factory):
    return run_data(tmp_path_factory.mktemp("local"), "local")


def reuse(local: dict, workdir: Path, *stages: str) -> Path:
    """Put the local run's folders of `stages` into workdir (their keys are the same: cache hits).
    The crawl always comes from there: a crawl records when it fetched each page."""
    for stage in stages:
        s = local["stages"][stage]
        shutil.copytree(Path(s["folder"]), workdir / "artifacts" / stage / s["key"])
    return workdir


def test_cluster_run_makes_the_local_runs_files_and_shows_its_units(local_run, cluster, tmp_path_factory):
    local, local_id = local_run
    assert local["runner"] == "local" and local["stages"]["normalize"]["counts"]["shards"] >= 4
    on_dask, dask_id = run_data(reuse(local, tmp_path_factory.mktemp("dask"), "crawl"), cluster.address)
    assert {s: v["key"] for s, v in on_dask["stages"].items()} == {s: v["key"] for s, v in local["stages"].items()}
    assert data_digests(on_dask) == data_digests(local)
    for run_id, summary in ((local_id, local), (dask_id, on_dask)):
        names = task_run_names(run_id)
        shards = [state for name, state in names if name == "normalize-shard"]
        assert len(shards) == summary["stages"]["normalize"]["counts"]["shards"], names
        assert set(shards) == {"Completed"}, names


def test_a_worker_killed_mid_shard_costs_only_its_unfinished_units(local_run, cluster, tmp_path_factory):
    local, _ = local_run
    workdir = tmp_path_factory.mktemp("fault")
    # crawl and dedupe are the local run's folders; normalize and tokenize are built on a cluster
    # where one worker (without a nanny, so it stays dead) is killed inside its first shard.
    reuse(local, workdir, "crawl", "dedupe")
    for worker in cluster.workers:
        cluster.stop(worker)
    # Only the doomed worker at first, so it surely gets a shard; a healthy one joins once it died.
    doomed = cluster.add_worker(nanny=False, FORJA_FAULT=FAULT)
    cluster.wait_for_workers(1)

    def replace_when_dead():
        if doomed.wait(timeout=120) is not None:
            cluster.add_worker()

    threading.Thread(target=replace_when_dead, daemon=True).start()
    started = time.time()
    summary, run_id = run_data(workdir, cluster.address)
    assert doomed.returncode == -9, "the faulty worker was never given a shard"
    assert data_digests(summary) == data_digests(local)
    normalize = Path(summary["stages"]["normalize"]["folder"])
    assert not list(normalize.rglob(".part-*"))
    assert time.time() - started < 90
    shards = [state for name, state in task_run_names(run_id) if name == "normalize-shard"]
    assert len(shards) == summary["stages"]["normalize"]["counts"]["shards"] and set(shards) == {"Completed"}, shards

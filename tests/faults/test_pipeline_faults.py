"""What production does to a pipeline run, done to `forja run` in a real process against a real
Prefect server: kill -9 at each stage boundary, mid-shard, during a manifest write, between a
stage's rename and Prefect's result write, mid-training and at the side effects of register; the
disk filling up during a stage and during register; a second run on the same work directory.

One work directory (on a small filesystem the test mounts) goes through every fault in turn, each
rerun picking up where the last died, then a run with nothing injected must complete. What must
hold after every rerun: only unfinished stages ran; no temp folder, no orphan process; and at the
end, stage outputs equal an uninterrupted run's (token shards by sha256), exactly one model version
per weights sha256, aliases and the champion history consistent.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.flows.test_pipeline import write_config
from tests.fixtures.site import make_site

pytestmark = [pytest.mark.fault, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STAGES = ["crawl", "dedupe", "normalize", "tokenize", "pretrain", "evaluate", "register"]


class Runner:
    """`forja run` in its own process and session, against the stack's Prefect server, with
    FORJA_FAULT and a log per attempt."""

    def __init__(self, stack, config: Path, workdir: Path, logs: Path):
        self.config, self.workdir, self.logs = config, workdir, logs
        env = dict(stack.client_env, PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(workdir / "prefect" / "results"),
                   FORJA_RETRY_DELAY_SCALE="0", OMP_NUM_THREADS="1")
        env.pop("MLFLOW_TRACKING_URI")  # the work directory's own SQLite store: it lives on the small disk
        env.pop("FORJA_WORKDIR")
        self.env = env
        self.attempt = 0

    def start(self, fault: str = "", *args: str) -> subprocess.Popen:
        self.attempt += 1
        log = open(self.logs / f"attempt-{self.attempt}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(self.config), "--workdir",
                                 str(self.workdir), *args], cwd=ROOT, env=dict(self.env, FORJA_FAULT=fault),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, fault: str = "", kill_when=None, timeout: float = 600) -> tuple[int, str]:
        """One attempt; kill_when() true (polled) kills the flow process with SIGKILL. (rc, log)."""
        proc = self.start(fault)
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        rc = proc.wait(max(1.0, deadline - time.time()))
        return rc, self.text()

    def text(self) -> str:
        return (self.logs / f"attempt-{self.attempt}.log").read_text(errors="replace")


def manifests(workdir: Path) -> dict[str, dict]:
    """The committed stage folders: stage -> its manifest (one folder per stage in this test)."""
    found = {}
    for stage in STAGES:
        for m in sorted((workdir / "artifacts" / stage).glob("*/manifest.json")):
            if not m.parent.name.startswith("."):  # .tmp-* (unfinished) and .damaged-* (set aside) are not
                found[stage] = json.loads(m.read_text())
    return found


def temp_folders(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "artifacts").glob("*/.tmp-*"))


def forja_processes(workdir: Path) -> list[psutil.Process]:
    """Processes started for this work directory (the flow, training launcher and ranks)."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(workdir) in " ".join(p.info["cmdline"] or []):
                left.append(p)
        except psutil.Error:
            pass
    return left


def no_orphans(workdir: Path, within: float = 15.0) -> None:
    deadline = time.time() + within
    while (left := forja_processes(workdir)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes outlived the killed run: {[p.info['cmdline'] for p in left]}"


class SmallDisk:
    """A tmpfs the test mounts (root only), to fill and free."""

    def __init__(self, path: Path, size_mb: int):
        self.path = path
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
        self.ballast = path / "ballast.bin"

    def fill(self, leave_bytes: int) -> None:
        """Leave about leave_bytes free."""
        free = shutil.disk_usage(self.path).free
        with open(self.ballast, "wb") as f:
            f.truncate(0)
            chunk = b"\0" * (1 << 20)
            left = max(0, free - leave_bytes)
            while left > 0:
                n = f.write(chunk[: min(len(chunk), left)])
                left -= n

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    disk = SmallDisk(tmp_path / "disk", 256)
    try:
        yield disk
    finally:
        disk.unmount()


def test_kill_disk_full_and_a_second_run_then_the_rerun_completes_as_if_nothing_happened(stack, tmp_path, small_disk):
    site = make_site(tmp_path / "site")
    config = write_config(tmp_path, site)
    logs = tmp_path / "logs"
    logs.mkdir()
    work = small_disk.path / "work"
    runner = Runner(stack, config, work, logs)
    finished: dict[str, float] = {}  # stage -> created_at of its committed folder

    def step(expect_new: set[str], rc_ok, **kw) -> str:
        """One attempt; exactly the stages in expect_new were committed by it, the others untouched."""
        rc, text = runner.run(**kw)
        assert rc_ok(rc), f"attempt {runner.attempt}: exit {rc}\n{text[-3000:]}"
        now = {s: m["created_at"] for s, m in manifests(work).items()}
        for s, t in finished.items():
            assert now.get(s) == t, f"attempt {runner.attempt}: finished stage {s} was rebuilt or lost\n{text[-2000:]}"
        assert set(now) - set(finished) == expect_new, (runner.attempt, sorted(now), text[-3000:])
        finished.update(now)
        no_orphans(work)
        return text

    killed = lambda rc: rc == -signal.SIGKILL  # noqa: E731
    failed = lambda rc: rc not in (0, -signal.SIGKILL)  # noqa: E731

    # Disk full while the first stage writes: a clear error, nothing half-written left behind.
    small_disk.fill(leave_bytes=16 << 10)
    text = step(set(), failed)
    assert "crawl: the disk is full" in text and "Free space on the filesystem" in text, text[-3000:]
    assert not temp_folders(work)
    small_disk.free()

    step({"crawl"}, killed, fault="stage:dedupe:start")                      # at a stage boundary
    step({"dedupe"}, killed, fault="stage:normalize:manifest")               # during a manifest write
    # mid-shard: the unit writing a token shard dies (in the flow process when the stage has one
    # unit, in a worker process of the local runner otherwise: then the stage fails, the run ends)
    step({"normalize"}, lambda rc: rc != 0, fault="tokenize:shard-written")
    step({"tokenize"}, killed, fault="stage:tokenize:renamed")               # after the rename, before Prefect's result
    # Mid-training: once the training child runs, a second `forja run` on the same work directory is
    # refused at once naming the holder (no --wait); then the flow process dies, and the child must
    # not outlive it.
    rival = []

    def training_then_rival() -> bool:
        if not any("model.train" in " ".join(p.info["cmdline"] or []) for p in forja_processes(work)):
            return False
        rival.append(subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--workdir", str(work)],
                                    cwd=ROOT, env=runner.env, capture_output=True, text=True, timeout=300))
        return True

    step(set(), killed, kill_when=training_then_rival)
    assert rival[0].returncode != 0 and "pid" in rival[0].stderr and "--wait" in rival[0].stderr, rival[0].stderr[-2000:]
    step({"pretrain", "evaluate"}, killed, fault="stage:register:start")
    # Disk full during register (MLflow's store and artifacts are on the same small disk).
    small_disk.fill(leave_bytes=8 << 10)
    text = step(set(), failed)
    assert "register: the disk holding the MLflow store or its artifacts is full" in text, text[-3000:]
    assert text.count("Task run 'register") and "Retry" not in text, "a full disk is not retried"
    small_disk.free()

    # The last run, with nothing injected.
    rc, text = runner.run()
    assert rc == 0, text[-3000:]
    now = manifests(work)
    assert set(now) == set(STAGES) and all(now[s]["created_at"] == t for s, t in finished.items())
    assert not temp_folders(work)
    no_orphans(work)

    # Outputs equal an uninterrupted run's (the data stages are deterministic: compare token shards).
    (tmp_path / "reference-logs").mkdir()
    reference = Runner(stack, config, tmp_path / "reference", tmp_path / "reference-logs")
    rc, text = reference.run(fault="stage:pretrain:start")
    assert rc == -signal.SIGKILL, text[-3000:]
    ref = manifests(tmp_path / "reference")
    for s in ("dedupe", "normalize", "tokenize"):
        assert ref[s]["key"] == now[s]["key"]
    digest = lambda m: {f["path"]: f["sha256"] for f in m["files"] if f["path"].endswith(".parquet")}  # noqa: E731
    assert digest(ref["tokenize"]) == digest(now["tokenize"]) and digest(now["tokenize"])

    # The registry: one version for these weights, candidate and champion on it, history consistent.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'forja-test'")
    shas = [v.tags.get("weights_sha256") for v in versions]
    assert len(versions) == 1 and len(set(shas)) == 1, [(v.version, v.tags.get("weights_sha256")) for v in versions]
    aliases = client.get_registered_model("forja-test").aliases
    assert aliases == {"candidate": versions[0].version, "champion": versions[0].version}
    history = json.loads(client.get_registered_model("forja-test").tags["forja.champion_history"])
    assert [e["version"] for e in history] == [str(versions[0].version)]
    assert history[0]["by"].startswith("gate") and "pending" not in history[0]

    # kill -9 at the side effects of register in turn (log the model, create the version, record its
    # metrics, move candidate, move champion), each retry resuming, for another registered model of
    # the same weights (the champion move's two halves: tests/faults/test_registry_faults.py). These
    # run with the file registry lock: a killed holder of the Prefect lock keeps it until its lease
    # expires, at least a minute.
    env = {k: v for k, v in runner.env.items() if not k.startswith("PREFECT_API_")}
    points = ["register:logged", "register:version-created", "register:metrics-recorded",
              "registry:champion-moved", ""]
    for n, point in enumerate(points):
        done = subprocess.run([sys.executable, "-c", REGISTER, str(work), "forja-fault", str(tmp_path / f"reg-{n}")],
                              cwd=ROOT, env=dict(env, FORJA_FAULT=point), capture_output=True, text=True, timeout=300)
        assert done.returncode == (-signal.SIGKILL if point else 0), (point, done.stderr[-3000:])
    versions = client.search_model_versions("name = 'forja-fault'")
    assert [v.tags["weights_sha256"] for v in versions] == shas, "one version for these weights, whatever the crash"
    assert client.get_registered_model("forja-fault").aliases == {"candidate": versions[0].version,
                                                                   "champion": versions[0].version}
    history = json.loads(client.get_registered_model("forja-fault").tags["forja.champion_history"])
    assert [(e["version"], e["by"][:4], "pending" in e) for e in history] == [(str(versions[0].version), "gate", False)]
    assert {k for k in versions[0].tags if k.startswith("metric.")}, "its metrics were recorded"


REGISTER = """
import json, sys
from pathlib import Path
from tasks import stage
from tasks.config import RegisterConfig
from tasks.register import build

work, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def manifest(s):
    return stage.read_manifest(next(p for p in (work / "artifacts" / s).iterdir() if not p.name.startswith(".")))
registered = manifest("register")
cfg = RegisterConfig(**{**registered.config, "model_name": name})
out.mkdir(exist_ok=True)
build(cfg, manifest("pretrain"), manifest("evaluate"), registered.stats.get("lineage", {}), str(work), out)
"""

"""Training under faults the resume tests do not cover: a full disk during a checkpoint, and
the process that runs training killed with SIGKILL (its training processes must not outlive it).

Both run real DeepSpeed on the CPU and share the uninterrupted reference run of test_resume.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from model import checkpoint, monitor
from tests.model.test_resume import ROOT, make_spec, reference_run, run, run_env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (the test runs as root), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.fault
def test_disk_full_during_a_checkpoint_is_a_clear_error_and_a_rerun_resumes(reference, small_disk, tmp_path):
    tmp, expected = reference
    ckpt = small_disk / "ckpt"
    ckpt.mkdir()
    # the run so far: the reference's checkpoint at step 6 and its curve
    shutil.copytree(tmp / "ref" / "ckpt" / "step-6", ckpt / "step-6")
    shutil.copy(tmp / "ref" / "ckpt" / "metrics.jsonl", ckpt / "metrics.jsonl")
    spec = make_spec(tmp, "full", checkpoint_dir=str(ckpt))
    ballast = small_disk / "ballast"  # leaves room for the metrics lines, not for a checkpoint (~390 KB)
    ballast.write_bytes(bytes(shutil.disk_usage(small_disk).free - 64 * 1024))

    full = run(spec)  # resumes at 6; the checkpoint at 9 does not fit
    out = full.stdout + full.stderr
    assert full.returncode != 0, full.stdout[-3000:]
    assert "disk is full" in out and str(ckpt / "step-9") in out, out[-3000:]
    assert not (ckpt / "step-9").exists() or checkpoint.problem(ckpt / "step-9") is not None  # never taken as valid
    assert checkpoint.problem(ckpt / "step-6") is None

    ballast.unlink()
    again = run(spec)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed from" in again.stdout and "at step 6" in again.stdout
    rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["train_loss"] for r in rows} == expected  # as if the disk had never filled


def test_restarting_from_step_0_keeps_the_old_curve_beside_the_new(tmp_path):
    """No committed checkpoint but a curve (say the checkpoints were deleted to start over): the
    old metrics are kept under another name, not overwritten."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "train_loss": 4.0}\n')
    kept = monitor.restart_metrics(metrics, start=0)
    assert kept == [] and metrics.read_text() == ""
    (old,) = tmp_path.glob("metrics-before-restart-*.jsonl")
    assert old.read_text().count("\n") == 2
    metrics.write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "train_loss": 4.0}\n{"step": 3, "train_')
    assert [r["step"] for r in monitor.restart_metrics(metrics, start=1)] == [1]
    assert metrics.read_text() == '{"step": 1, "train_loss": 5.0}\n'


HELPER = """
import sys
from pathlib import Path
from tasks.config import PretrainConfig
from tasks.pretrain import child_env, launch_command, run_training
cfg = PretrainConfig(num_gpus=1)
run_training(launch_command(cfg, Path(sys.argv[1])), child_env(None, cfg), 10**6)
"""


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes among procs that still run (a zombie waiting for its reaper does not)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.fault
def test_training_dies_with_the_process_that_runs_it(tmp_path):
    """SIGKILL the process running the pretrain task's run_training (no cleanup runs): the
    rank (and a launcher, where one is used) is gone within seconds, not training on unattended."""
    # Silent once training: a rank that printed would die of the broken pipe, watchdog or not.
    spec = make_spec(tmp_path, "orphan", max_steps=10**6, checkpoint_every=2, log_every=10**6, eval_every=10**6)
    ckpt = tmp_path / "orphan" / "ckpt"
    log = tmp_path / "parent.log"
    parent = subprocess.Popen([sys.executable, "-c", HELPER, str(spec)], env=run_env(), cwd=ROOT,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not list(ckpt.glob("step-*/COMMIT.json")):  # training is under way
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        children = psutil.Process(parent.pid).children(recursive=True)
        assert any(c.cmdline()[1:3] in (["-m", "model.train"], ["-u", "-m"]) and "model.train" in c.cmdline()
                   for c in children), [c.cmdline() for c in children]  # the rank (alone, or the launcher's)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while (alive := still_running(children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if parent.poll() is None:
            parent.kill()
        for child in children:  # leave nothing behind even when the test fails
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

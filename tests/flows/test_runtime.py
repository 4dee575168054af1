"""What flows do around their stages: the work directory lock, retries and timeouts, links."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import runtime

ROOT = Path(__file__).parents[2]
HOLD = """
import sys, time
from flows.runtime import workdir_lock
with workdir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the work directory's lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path, holder):
    t0 = time.monotonic()
    with pytest.raises(runtime.WorkdirBusy) as e:
        with runtime.workdir_lock(tmp_path, "fail"):
            pytest.fail("entered a work directory another process holds")
    assert time.monotonic() - t0 < 2
    assert f"pid {holder.pid}" in str(e.value) and str(tmp_path) in str(e.value)
    assert json.loads((tmp_path / "run.lock.json").read_text())["pid"] == holder.pid


def test_a_waiting_run_enters_when_the_holder_dies_even_by_sigkill(tmp_path, holder):
    entered = threading.Event()

    def second():
        with runtime.workdir_lock(tmp_path, "wait", poll_s=0.1):
            entered.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(1.0)
    assert not entered.is_set()  # still held: the second run waits, it does not barge in
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel releases the lock
    t.join(10)
    assert entered.is_set()
    assert not (tmp_path / "run.lock.json").exists()  # the second run released it in turn


def test_waiting_gives_up_after_max_wait(tmp_path, holder):
    with pytest.raises(runtime.WorkdirBusy, match="in use by"):
        with runtime.workdir_lock(tmp_path, "wait", poll_s=0.05, max_wait_s=0.3):
            pass


def test_stage_policy_retries_where_it_helps_and_bounds_every_stage(monkeypatch):
    from tasks.crawl import crawl
    from tasks.normalize import normalize
    from tasks.register import register

    monkeypatch.setenv("FORJA_RETRY_DELAY_SCALE", "1")
    reg = runtime.with_policy(register)
    assert reg.retries == 3 and reg.retry_delay_seconds == [20, 40, 80] and reg.timeout_seconds == 7200
    assert reg.cache_policy == register.cache_policy and reg.fn is register.fn
    assert runtime.with_policy(crawl).retries == 2
    assert runtime.with_policy(normalize).retries == 0 and runtime.with_policy(normalize).timeout_seconds > 0
    monkeypatch.setenv("FORJA_RETRY_DELAY_SCALE", "0.5")
    assert runtime.with_policy(register).retry_delay_seconds == [10, 20, 40]
    monkeypatch.setenv("FORJA_RETRY_DELAY_SCALE", "soon")
    with pytest.raises(ValueError, match="FORJA_RETRY_DELAY_SCALE"):
        runtime.with_policy(register)


def test_every_stage_task_of_the_flows_has_a_policy():
    from flows import finetune, pipeline

    for module in (pipeline, finetune):
        for name in dir(module):
            obj = getattr(module, name)
            if type(obj).__name__ == "Task":
                assert obj.name in runtime.POLICY, obj.name


def test_mlflow_run_url_only_for_a_server():
    assert runtime.mlflow_run_url("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert runtime.mlflow_run_url("sqlite:///w/mlflow.db", "3", "abc") is None


def test_bad_input_is_not_retried_but_a_lost_connection_is(prefect_harness, monkeypatch, tmp_path):
    from prefect import flow, task

    monkeypatch.setenv("FORJA_RETRY_DELAY_SCALE", "0")
    attempts = []

    @task(name="register")
    def flaky(error: str):
        attempts.append(error)
        if error == "disk full":
            from tasks.stage import StageDiskFull

            raise StageDiskFull(28, "register: the disk is full", "/w")
        raise {"value": ValueError, "connection": ConnectionError}[error]("boom")

    @flow
    def once(error: str):
        return runtime.with_policy(flaky)(error)

    assert once("value", return_state=True).is_failed() and attempts == ["value"]
    attempts.clear()
    assert once("disk full", return_state=True).is_failed() and attempts == ["disk full"]
    attempts.clear()
    assert once("connection", return_state=True).is_failed() and attempts == ["connection"] * 4

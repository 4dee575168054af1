"""Choosing a runner: spellings, a scheduler that does not answer (refused fast, before any stage),
and map_units outside a flow."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import runners
from tasks.mapping import map_units

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runner_defaults_to_local_then_env_and_checks_spelling(monkeypatch):
    monkeypatch.delenv(runners.ENV, raising=False)
    assert runners.resolve(None) == "local"
    monkeypatch.setenv(runners.ENV, "dask")
    assert runners.resolve(None) == "dask"
    assert runners.resolve("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    with pytest.raises(runners.RunnerError, match=r"'dsak'.*local.*dask.*tcp://HOST:PORT"):
        runners.resolve("dsak")
    monkeypatch.setenv(runners.ENV, "ray")
    with pytest.raises(runners.RunnerError, match=r"'ray' \(from \$FORJA_RUNNER\)"):
        runners.resolve(None)
    with pytest.raises(runners.RunnerError, match=r"tcp://HOST:PORT"):
        runners.resolve("tcp://scheduler")  # no port


def test_a_scheduler_that_does_not_answer_is_named_fast():
    address = f"tcp://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(runners.RunnerError) as e:
        runners.check_scheduler(address)
    assert time.monotonic() - started < 5
    assert address in str(e.value) and "dask scheduler" in str(e.value) and "--runner local" in str(e.value)


def test_a_port_that_is_not_a_scheduler_is_refused():
    with socket.socket() as server:  # accepts connections, never speaks Dask
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(runners.RunnerError, match="not a Dask scheduler"):
            runners.check_scheduler(address, timeout_s=1)


def test_cli_refuses_a_silent_scheduler_before_any_stage(tmp_path):
    address = f"tcp://127.0.0.1:{closed_port()}"
    env = dict(os.environ, FORJA_WORKDIR=str(tmp_path / "w"))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "data", "configs/demo.yaml", "--runner", address],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert address in done.stderr and "dask worker" in done.stderr
    assert time.monotonic() - started < 20  # no Prefect server, no crawl
    assert not (tmp_path / "w" / "artifacts").exists()


def test_cli_names_the_runners_for_a_bad_spelling(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "configs/demo.yaml", "--runner", "processes",
                           "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "'processes'" in done.stderr and "`local`" in done.stderr and "tcp://HOST:PORT" in done.stderr


def test_map_units_outside_a_flow_runs_in_order_here():
    from prefect import task

    calls = []

    @task(name="test-unit")
    def unit(i: int, word: str) -> str:
        calls.append(i)
        return f"{i}:{word}"

    assert map_units(unit, [(0, "a"), (1, "b"), (2, "c")]) == ["0:a", "1:b", "2:c"]
    assert calls == [0, 1, 2] and map_units(unit, []) == []

"""Processes for benchmarks/data.py: a command timed with the peak memory of its process tree,
and a real Dask cluster (`dask scheduler` + N `dask worker --nthreads 1`) on loopback."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

BIN = Path(sys.executable).parent


@dataclass
class Measured:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float
    peak_breakdown: dict  # at the peak sample: "pid name/argv" -> RSS MB


def tree_rss(proc: psutil.Process) -> dict:
    """Resident bytes of a process and each of its descendants (a vanished child is left out)."""
    out = {}
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss = p.memory_info().rss
            argv = " ".join(a.rsplit("/", 1)[-1] for a in p.cmdline()[:4])[:80]
            out[f"{p.pid} {argv}"] = rss
    return out


def run_measured(cmd: list[str], env: dict | None = None, every_s: float = 0.05, log: Path | None = None) -> Measured:
    """Run cmd, sampling the summed RSS of its process tree every `every_s`; the wall time and the peak."""
    peak, at_peak = 0, {}
    err = open(log, "w+") if log else subprocess.PIPE
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        nonlocal peak, at_peak
        while not done.is_set():
            members = tree_rss(ps)
            if sum(members.values()) > peak:
                peak, at_peak = sum(members.values()), members
            done.wait(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, errs = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if log:
        err.seek(0)
        errs = err.read()
        err.close()
    breakdown = {k: round(v / 2**20, 1) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])}
    return Measured(proc.returncode, out, errs or "", seconds, peak / 2**20, breakdown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_cluster(workers: int, env: dict, logs: Path) -> Iterator[str]:
    """A `dask scheduler` and `workers` single-threaded `dask worker` processes on 127.0.0.1;
    yields the scheduler address once every worker has joined; stops them all at the end."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs.mkdir(parents=True, exist_ok=True)
    # no dashboard, so no use for the workers' sampling profiler (which takes the GIL from the
    # running task every 10 ms to feed the dashboard's profile page): off, as in forja's `dask` runner
    env = {**env, "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
    # the scheduler unpickles each submitted task, so it imports forja's stage code too: at start
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard", "--preload", "flows.pipeline"], env=env, cwd=os.getcwd(),
                              stdout=subprocess.DEVNULL,
                              stderr=open(logs / "scheduler.log", "w"))]
    try:
        for i in range(workers):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1",
                                           "--nworkers", "1", "--no-dashboard", "--name", f"w{i}",
                                           # forja's stage code imported at start, as long-lived workers do
                                           "--preload", "flows.pipeline"],
                                          env=env, cwd=os.getcwd(), stdout=subprocess.DEVNULL,
                                          stderr=open(logs / f"worker-{i}.log", "w")))
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                with Client(address, timeout=5) as c:
                    c.wait_for_workers(workers, timeout=max(1, deadline - time.time()))
                    break
            if time.time() > deadline:
                raise RuntimeError(f"the Dask cluster at {address} did not get {workers} workers in 120 s; see {logs}")
            time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

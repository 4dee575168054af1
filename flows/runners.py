"""Where a run's units of work execute: processes on this machine, or a Dask cluster.

The user picks one per run (`forja run/data --runner R`, the flows' `runner` parameter, or
$FORJA_RUNNER):

- `local` (the default): a Prefect ProcessPoolTaskRunner, one process per core of this machine;
- `dask`: a dask.distributed LocalCluster started for this run (one single-threaded worker
  process per core), closed at its end;
- `tcp://HOST:PORT`: an existing Dask scheduler (`dask scheduler` + `dask worker`s), through
  prefect-dask's DaskTaskRunner.

The stage tasks stay in the flow process (their keys, caches and folders do not depend on the
runner); open_runner() starts the runner once for the run and installs it for
tasks.mapping.map_units, so each stage's units (one shard, one input file) become task runs of
this flow run on it. Worker processes report to the same Prefect API as the flow: an ephemeral
API is given a URL the workers can reach before the runner starts.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator
from urllib.parse import urlsplit

from tasks.mapping import use_runner

log = logging.getLogger("forja.runners")

ENV = "FORJA_RUNNER"
CHOICES = "`local` (processes on this machine), `dask` (a Dask cluster on this machine for the run) or " \
          "`tcp://HOST:PORT` (an existing Dask scheduler)"
CONNECT_TIMEOUT_S = 5.0


class RunnerError(ValueError):
    """A runner that cannot be used: a bad spelling, or a scheduler that does not answer."""


def resolve(spec: str | None) -> str:
    """The runner to use: `spec`, else $FORJA_RUNNER, else `local`; checked for spelling."""
    raw = (spec or os.environ.get(ENV) or "local").strip()
    if raw in ("local", "dask"):
        return raw
    if raw.startswith("tcp://"):
        scheduler_address(raw)
        return raw
    where = "" if spec else f" (from ${ENV})"
    raise RunnerError(f"unknown runner {raw!r}{where}: use {CHOICES}")


def scheduler_address(spec: str) -> tuple[str, int]:
    """(host, port) of a `tcp://HOST:PORT` runner."""
    parts = urlsplit(spec)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise RunnerError(f"runner {spec!r} is not a scheduler address: write it as tcp://HOST:PORT "
                          f"(e.g. tcp://127.0.0.1:8786), or use {CHOICES}")
    return parts.hostname, port


def check_scheduler(spec: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when no Dask scheduler answers there (before any stage runs)."""
    host, port = scheduler_address(spec)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RunnerError(
            f"no Dask scheduler answers at {spec} ({e.strerror or e}); start one there "
            f"(`dask scheduler --port {port}` and `dask worker {spec}` on each machine), fix the address, "
            f"or run with --runner local") from None
    try:  # something listens: make sure it speaks Dask (a wrong port may be another service)
        identity = _ask_identity(spec, timeout_s)
    except Exception as e:  # a timeout, a refused handshake, garbage: all mean "not a scheduler"
        identity = {"error": repr(e)}
    if identity.get("type") != "Scheduler":
        raise RunnerError(f"{spec} answers but is not a Dask scheduler ({identity.get('error') or identity.get('type')}); "
                          "fix the address or run with --runner local")
    if not identity.get("workers"):
        log.warning("the Dask scheduler at %s has no workers yet: units wait until one joins "
                    "(`dask worker %s`)", spec, spec)


def _ask_identity(spec: str, timeout_s: float) -> dict:
    """The scheduler's identity reply, asked over Dask's own protocol with a hard deadline (in a
    thread of its own: the caller may be inside a running event loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def ask() -> dict:
        from distributed.comm import connect

        comm = await connect(spec, timeout=timeout_s)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(lambda: asyncio.run(asyncio.wait_for(ask(), timeout_s))).result(timeout_s + 2)
    finally:
        pool.shutdown(wait=False)


def local_workers() -> int:
    """Processes for `local` and `dask`: $FORJA_WORKERS, else the cores this process may use."""
    raw = os.environ.get("FORJA_WORKERS")
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise RunnerError(f"FORJA_WORKERS={raw!r} must be a whole number of worker processes") from None
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_runner(spec: str):
    """A not yet started Prefect TaskRunner for a resolved runner spec."""
    if spec == "local":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=local_workers())
    from prefect_dask import DaskTaskRunner

    if spec == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": local_workers(), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return DaskTaskRunner(address=spec, client_kwargs={"timeout": CONNECT_TIMEOUT_S})


@contextlib.contextmanager
def reachable_api() -> Iterator[None]:
    """Make sure worker processes report to this run's Prefect API. A run on the ephemeral API
    (no PREFECT_API_URL) talks to a server process started for it; its URL is put in the settings
    and the environment for the runner's workers, which otherwise would each start an API of
    their own and record their task runs where nobody looks."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process already uses (a singleton)
    server.start()
    url = server.api_url
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


@contextlib.contextmanager
def open_runner(spec: str | None) -> Iterator[str]:
    """Start the run's runner (checked first: a scheduler that does not answer fails here, before
    any stage), send map_units to it, and close it (a `dask` cluster is shut down) at the end."""
    resolved = resolve(spec)
    if resolved.startswith("tcp://"):
        check_scheduler(resolved)
    quiet = _without_profiler() if resolved == "dask" else contextlib.nullcontext()
    with reachable_api(), quiet, make_runner(resolved) as runner, use_runner(runner):
        if resolved != "local":
            _ = runner.client  # connect (or start the cluster) now, not at the first unit
        log.info("units of work run on %s", describe(resolved))
        yield resolved


def _without_profiler():
    """Dask config for the `dask` runner's own cluster: it has no dashboard, so its workers skip the
    sampling profiler that feeds the dashboard's profile page (every 10 ms it takes the GIL from the
    running unit to walk its stack)."""
    import dask

    return dask.config.set({"distributed.worker.profile.enabled": False})


def describe(spec: str) -> str:
    if spec == "local":
        return f"local processes ({local_workers()})"
    if spec == "dask":
        return f"a Dask cluster on this machine ({local_workers()} workers)"
    return f"the Dask scheduler at {spec}"

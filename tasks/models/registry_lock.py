"""The lock that serialises forja's writes to one registered model: registering a version,
the promotion gate, promote, rollback and recorded evaluations.

With a Prefect API (PREFECT_API_URL, a profile, or a flow run against a server) it is a
Prefect global concurrency limit of one slot, `forja-registry-<model>`, created on first
use: every machine that reaches the server shares it. The slot is held under a lease that
Prefect renews in the background while the body runs (a gate may re-score a champion for
minutes) and that expires if the holder dies, so a crash cannot wedge the registry. Losing
the lease while holding it stops the body rather than let two gates run at once.

Without a Prefect API (a bare command line, or Prefect's ephemeral API, which is private to
one machine) it is a file lock in the work directory, as before.

Whoever holds the lock writes who they are beside it (a Prefect Variable of the same name, or
the lock file itself), so a waiter that gives up can name the holder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("forja.registry")

LEASE_S = 120.0  # Prefect renews at 3/4 of this; a dead holder's slot frees within it
DEFAULT_TIMEOUT_S = float(os.environ.get("FORJA_REGISTRY_LOCK_TIMEOUT_S", "3600"))


class RegistryLockTimeout(TimeoutError):
    """The registry lock was not free within the timeout; the message names it and its holder."""


class RegistryLockError(RuntimeError):
    """The lock could not be taken at all (the Prefect API did not answer, or refused)."""


def lock_name(model: str | None) -> str:
    """`forja-registry-<model>`, made a valid Prefect name (lowercase letters, digits, - and _);
    a model name that had to change keeps a short hash so two models never share a lock."""
    if not model:
        return "forja-registry"
    slug = re.sub(r"[^a-z0-9_-]+", "-", model.lower()).strip("-") or "model"
    if slug != model:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"forja-registry-{slug}"


def prefect_api_url() -> str | None:
    """The Prefect API a lock can live on, or None for the ephemeral per-machine API."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def holder_text() -> str:
    """Who is taking the lock: process, host, Prefect flow run when there is one, and since when."""
    text = f"pid {os.getpid()} on {socket.gethostname()}"
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            text += f", flow run {flow_run.name} ({flow_run.id})"
    except Exception:  # no Prefect context: the process is enough
        pass
    return text + f", since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


@contextlib.contextmanager
def registry_lock(workdir: str | Path, model: str | None = None, timeout_s: float | None = None):
    """Hold the registry lock of model (one lock for all models when None) for the body."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    api = prefect_api_url()
    lock = _prefect_lock(lock_name(model), api, timeout_s) if api else _file_lock(workdir, model, timeout_s)
    with lock:
        yield


@contextlib.contextmanager
def _file_lock(workdir: str | Path, model: str | None, timeout_s: float):
    path = Path(workdir) / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise RegistryLockTimeout(
                        f"the registry lock {path} was not free after {timeout_s:.0f} s; held by {holder}. "
                        "Wait for that registration to finish, or raise FORJA_REGISTRY_LOCK_TIMEOUT_S") from None
                time.sleep(0.05)
        try:
            f.seek(0)
            f.truncate()
            f.write(holder_text() + (f" (model {model})" if model else "") + "\n")
            f.flush()
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _prefect_lock(name: str, api: str, timeout_s: float):
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    _ensure_limit(name, api)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S,
                                            strict=True, holder=_lease_holder(), raise_on_lease_renewal_failure=True))
        except TimeoutError:
            holder = _read_holder(name) or "unknown (no holder recorded)"
            raise RegistryLockTimeout(
                f"the registry lock {name!r} (a Prefect global concurrency limit at {api}) was not free after "
                f"{timeout_s:.0f} s; held by {holder}. Wait for that registration to finish, or raise "
                "FORJA_REGISTRY_LOCK_TIMEOUT_S") from None
        except ConcurrencySlotAcquisitionError as e:
            raise RegistryLockError(f"could not take the registry lock {name!r} on the Prefect API at {api}: {e}. "
                                    "Check that the Prefect server is up (or unset PREFECT_API_URL on a single "
                                    "machine to use a file lock)") from e
        _write_holder(name, holder_text())
        try:
            yield
        finally:
            _write_holder(name, None)  # before the slot is released, so the next holder's text survives


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _ensure_limit(name: str, api: str) -> None:
    """Create the one-slot limit if it is missing (two creators at once: the loser finds it exists)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        with _client() as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                    log.info("created the Prefect global concurrency limit %s (1 slot)", name)
                except ObjectAlreadyExists:
                    pass
                return
    except Exception as e:  # connection refused, timeouts, a server error
        raise RegistryLockError(f"could not reach the Prefect API at {api} to take the registry lock {name!r}: "
                                f"{type(e).__name__}: {e}. Start the Prefect server, or unset PREFECT_API_URL on "
                                "a single machine to use a file lock") from e
    if limit.limit != 1 or not limit.active:
        log.warning("the Prefect concurrency limit %s is %s with %d slots: registry writes are not serialised "
                    "unless it is active with 1 slot", name, "active" if limit.active else "inactive", limit.limit)


def _lease_holder():
    """The flow or task run holding the lease, for Prefect's own records; None outside a run."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    if task_ctx is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task_ctx.task_run.id)
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow_ctx.flow_run.id)
    return None


def _read_holder(name: str) -> str | None:
    try:
        with _client() as client:
            var = client.read_variable_by_name(name)
        return str(var.value) if var is not None and var.value else None
    except Exception:  # naming the holder is a courtesy; the timeout is the error
        return None


def _write_holder(name: str, text: str | None) -> None:
    """Record (or, with None, clear) who holds the lock; failures only lose the courtesy."""
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        with _client() as client:
            if text is None:
                with contextlib.suppress(ObjectNotFound):
                    client.delete_variable_by_name(name)
                return
            try:
                client.create_variable(VariableCreate(name=name, value=text))
            except ObjectAlreadyExists:
                client.update_variable(VariableUpdate(name=name, value=text))
    except Exception as e:
        log.warning("could not record the holder of the registry lock %s: %s", name, e)

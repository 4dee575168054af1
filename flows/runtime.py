"""What every forja flow does around its stages when it runs as a service.

- forja's own loggers ("forja.*": crawl progress, training steps, gate decisions) are sent
  to the flow run's log in the Prefect UI, whoever started the run (the CLI, a worker).
- One run at a time per work directory: a lock file held for the whole flow run (released
  by the kernel if the process dies), whose holder is written beside it so a second run can
  name it, then wait or fail at once.
- Retries where retrying helps (the network, the tracking server, the registry), with a
  delay, and a timeout on every stage.
- The MLflow run is linked from the Prefect flow run's artifacts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Literal

log = logging.getLogger("forja.flows")

HOUR = 3600
# stage -> (retries, first delay in seconds, timeout in seconds). Training resumes from its
# last committed checkpoint on a retry; the data stages are deterministic, so their retry
# only helps with the network (crawl) or a full disk that was cleared.
POLICY: dict[str, tuple[int, float, float]] = {
    "crawl": (2, 60, 24 * HOUR),
    "dedupe": (0, 0, 12 * HOUR),
    "normalize": (0, 0, 12 * HOUR),
    "tokenize": (0, 0, 12 * HOUR),
    "pretrain": (1, 30, 14 * 24 * HOUR),
    "evaluate": (1, 30, 12 * HOUR),
    "register": (3, 20, 2 * HOUR),
    "sft-data": (2, 20, 2 * HOUR),
    "finetune": (1, 30, 7 * 24 * HOUR),
    "finetune-compare": (1, 30, 12 * HOUR),
}


def retry_delay_scale() -> float:
    """FORJA_RETRY_DELAY_SCALE multiplies every retry delay (tests use 0.01; 0 retries at once)."""
    raw = os.environ.get("FORJA_RETRY_DELAY_SCALE", "1")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"FORJA_RETRY_DELAY_SCALE={raw!r} must be a number (1 = the default delays)") from None


def worth_retrying(task, task_run, state) -> bool:
    """False for errors a retry cannot mend: bad input or config (ValueError, a missing file)
    and a full disk fail at once with their message; the network, a tracking server or a crashed process retry."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # the failure's own exception
            exc = e
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return False  # a full disk stays full: retrying rebuilds into it again (stage.StageDiskFull says what to free)
    return not isinstance(exc, (ValueError, FileNotFoundError))


def with_policy(task):
    """The task with its stage's retries (delays doubling, only for errors worth retrying),
    retry delay and timeout."""
    retries, delay, timeout = POLICY[task.name]
    scale = retry_delay_scale()
    delays = [delay * scale * 2**i for i in range(retries)] or 0
    return task.with_options(retries=retries, retry_delay_seconds=delays, timeout_seconds=timeout,
                             retry_condition_fn=worth_retrying)


def forward_logs() -> None:
    """Send the "forja" loggers to this flow run's log, as PREFECT_LOGGING_EXTRA_LOGGERS=forja
    does, also when the process that runs the flow (a worker's) was started without it."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("forja")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())


class WorkdirBusy(RuntimeError):
    """Another flow run holds the work directory."""


def current_run() -> dict:
    """This flow run's id, name and deployment (empty strings outside one)."""
    from prefect.runtime import deployment, flow_run

    return {"flow_run_id": str(flow_run.id or ""), "flow_run_name": str(flow_run.name or ""),
            "deployment": str(deployment.name or "")}


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another run (it has not recorded who it is)"
    who = f"flow run {holder.get('flow_run_name') or '?'} ({holder.get('flow_run_id') or 'no id'})"
    if holder.get("deployment"):
        who += f" of deployment {holder['deployment']}"
    return f"{who}, pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, if_busy: Literal["wait", "fail"] = "wait",
                 poll_s: float = 5.0, max_wait_s: float | None = None) -> Iterator[None]:
    """Hold <workdir>/run.lock for a whole flow run.

    A second run on the same work directory waits for the first (if_busy="wait", logging who
    holds it) or fails at once naming it (if_busy="fail"). The lock is an flock: the kernel
    releases it when the holding process dies, so a crash never leaves the directory locked.
    """
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    path, info = wd / "run.lock", wd / "run.lock.json"
    f = open(path, "a")
    try:
        started, last_note = time.monotonic(), 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(info)
                for _ in range(20):  # the holder writes who it is just after taking the lock
                    if holder.get("pid"):
                        break
                    time.sleep(0.1)
                    holder = read_holder(info)
                waited = time.monotonic() - started
                if if_busy == "fail" or (max_wait_s is not None and waited >= max_wait_s):
                    raise WorkdirBusy(f"work directory {wd} is in use by {describe_holder(holder)}; wait for it "
                                      "to finish or use another work directory") from None
                if waited - last_note >= 60 or last_note == 0.0:
                    log.info("waiting for the work directory %s: held by %s", wd, describe_holder(holder))
                    last_note = waited or 1e-9
                time.sleep(poll_s)
        holder = {**current_run(), "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        info.write_text(json.dumps(holder))
        try:
            yield
        finally:
            info.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def read_holder(info: Path) -> dict:
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return {}


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is a server, else None."""
    from tasks.models.tracking import is_remote

    if not is_remote(tracking_uri):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def link_mlflow_run(run_id: str, workdir: str, label: str = "MLflow run") -> None:
    """A link artifact on the flow run pointing at its MLflow run (or, with a local store, a
    markdown note saying how to open it)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from tasks.models import tracking

    try:
        client = tracking.client(workdir)
        run = client.get_run(run_id)
        uri = tracking.tracking_uri(workdir)
        url = mlflow_run_url(uri, run.info.experiment_id, run_id)
        if url:
            create_link_artifact(key="mlflow-run", link=url, link_text=f"{label} {run.info.run_name or run_id}",
                                 description=f"{label} {run_id} in experiment {run.info.experiment_id}")
        else:
            create_markdown_artifact(
                key="mlflow-run", description=f"{label} {run_id}",
                markdown=f"# {label}\n\nRun `{run_id}` (experiment {run.info.experiment_id}) in `{uri}`.\n\n"
                         f"Open it with `mlflow server --backend-store-uri {uri} --workers 1 --port 5000`.\n")
    except Exception as e:  # a link is a convenience: never fail a run over it
        log.warning("could not link the MLflow run %s: %s", run_id, e)

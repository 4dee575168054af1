"""A stage's units of work (one input file, one shard) as Prefect tasks mapped on the run's runner.

A stage task calls map_units(unit_task, jobs) with one tuple of arguments per unit; each unit
writes its own files into the stage's temp folder (atomically, through stage.partial) and
returns small counts. Inside a flow run every unit is a task run of its own, so the Prefect UI
shows them; outside one (plain function calls, tests) the units run here one after another.

Which runner executes them (processes on this machine, or a Dask cluster) is chosen per run:
the flow opens it once (flows.runners.open_runner) and installs it here with use_runner(), so
the stage tasks themselves stay in the flow process and only their units travel. Without an
installed runner the flow's own task runner is used.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

def unit_options() -> dict:
    """The keyword arguments of every unit's @task: `@task(name="normalize-shard", **unit_options())`.

    A unit is never a cache hit (it must write its files into this build's temp folder) and its
    result, a few counts, travels back with the task run, so nothing is hashed or persisted for
    it: less work per unit on every worker."""
    from prefect.cache_policies import NO_CACHE

    return {"cache_policy": NO_CACHE, "persist_result": False}


_RUNNER: contextvars.ContextVar = contextvars.ContextVar("forja_unit_runner", default=None)


@contextlib.contextmanager
def use_runner(runner) -> Iterator[None]:
    """Send every map_units call made inside this block to `runner` (a started Prefect TaskRunner)."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def current_runner():
    """The runner installed by use_runner, or None."""
    return _RUNNER.get()


def map_units(unit, jobs: Sequence[tuple]) -> list[Any]:
    """Run the Prefect task `unit` once per job (a tuple of its positional arguments) and return
    the results in job order; the first failed unit's error is raised."""
    if not jobs:
        return []
    from prefect.context import FlowRunContext, TaskRunContext

    flow_ctx = FlowRunContext.get()
    if flow_ctx is None and TaskRunContext.get() is None:
        return [unit.fn(*job) for job in jobs]
    runner = _RUNNER.get() or getattr(flow_ctx, "task_runner", None)
    if runner is None:  # inside a task run that has no flow (e.g. a background task): in place
        return [unit.fn(*job) for job in jobs]
    if len(jobs) == 1 and _local(runner):  # a pool process would only add its start-up: a task run here
        return [unit(*jobs[0])]
    parameters = {name: list(column) for name, column in zip(_positional_names(unit), zip(*jobs))}
    futures = runner.map(unit, parameters)
    return [f.result() for f in futures]


def _local(runner) -> bool:
    """Whether the runner's workers are this machine's threads or processes (not a cluster)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    return isinstance(runner, (ProcessPoolTaskRunner, ThreadPoolTaskRunner))


def _positional_names(unit) -> list[str]:
    import inspect

    return list(inspect.signature(unit.fn).parameters)

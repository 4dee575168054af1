"""A stage's units of work (one input file, one shard) as Prefect tasks mapped on the run's runner.

A stage task calls map_units(unit_task, jobs) with one tuple of arguments per unit; each unit
writes its own files into the stage's temp folder (atomically, through stage.partial) and
returns small counts. Inside a flow run every unit is a task run of its own, so the Prefect UI
shows them; outside one (plain function calls, tests) the units run here one after another.
Which runner executes them (processes on this machine, or a Dask cluster) is chosen per run.
"""
from __future__ import annotations

from typing import Any, Sequence


def map_units(unit, jobs: Sequence[tuple]) -> list[Any]:
    """Run the Prefect task `unit` once per job (a tuple of its positional arguments) and return
    the results in job order; the first failed unit's error is raised."""
    if not jobs:
        return []
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return [unit.fn(*job) for job in jobs]
    futures = unit.map(*[list(column) for column in zip(*jobs)])
    return [f.result() for f in futures]

"""Fault points: places where the fault-injection tests kill forja as production would.

`FORJA_FAULT=<point>` (several: comma-separated) makes the process that reaches that point
SIGKILL itself there: no cleanup, no `finally`, exactly what a power cut or the OOM killer does.
Unset (always, outside tests), a fault point is one dictionary lookup. The points are named
`<where>:<what>`, e.g. `stage:tokenize:renamed` or `register:version-created`; the tests in
tests/faults/ list the ones they use.
"""
from __future__ import annotations

import os
import signal

ENV = "FORJA_FAULT"


def armed(point: str) -> bool:
    """Whether FORJA_FAULT names this point."""
    spec = os.environ.get(ENV)
    return bool(spec) and point in spec.split(",")


def fault_point(point: str) -> None:
    """Kill this process with SIGKILL when FORJA_FAULT names `point`."""
    if armed(point):
        os.kill(os.getpid(), signal.SIGKILL)

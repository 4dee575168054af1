"""tasks.mapping: the threads a unit may use, and the run context serialized once per map."""
from __future__ import annotations

import os
import threading

from prefect import flow, tags, task
from prefect.task_runners import ProcessPoolTaskRunner

from tasks.mapping import _context_once, map_units, unit_threads

CORES = len(os.sched_getaffinity(0))


@task(name="threads-unit")
def threads_unit(i: int) -> int:
    return unit_threads()


@flow(task_runner=ProcessPoolTaskRunner(max_workers=2))
def pooled(n: int) -> list[int]:
    return map_units(threads_unit, [(i,) for i in range(n)])


def test_a_unit_in_a_pool_gets_one_thread_and_alone_every_core(prefect_harness):
    # outside a flow the units run here, one after another: each may use the whole machine
    assert map_units(threads_unit, [(0,), (1,)]) == [CORES, CORES]
    # in a pool of processes side by side, the pool is the parallelism: one thread each
    assert pooled(3) == [1, 1, 1]
    # a single unit on the local runner runs in the flow process, alone
    assert pooled(1) == [CORES]
    assert unit_threads() == 1  # outside map_units nothing claims the machine


def test_the_context_is_serialized_once_per_map_and_only_inside_it(prefect_harness):
    from uuid import uuid4

    import prefect_dask.client as dask_client

    @task
    def stage_like():
        with tags("inside"):
            with _context_once():
                serialize = dask_client.serialize_context
                a = serialize({"task": threads_unit, "task_run_id": uuid4()})
                b = serialize({"task": threads_unit, "task_run_id": uuid4()})
                elsewhere = []  # a thread of its own has none of this map's context
                t = threading.Thread(target=lambda: elsewhere.append(dask_client.serialize_context()))
                t.start()
                t.join()
        with tags("after"):
            later = dask_client.serialize_context()
        return a, b, elsewhere[0], later

    @flow
    def run():
        return stage_like()

    a, b, elsewhere, later = run()
    # the shared parts are the very same objects: computed once for the map
    for key in ("flow_run_context", "task_run_context", "settings_context", "tags_context"):
        assert a[key] is b[key]
    assert "inside" in a["tags_context"]["current_tags"]
    # each unit still gets its own asset context (keyed by its own task run id)
    assert a["asset_context"] != b["asset_context"]
    # outside the map (or in another thread) prefect-dask serializes afresh
    assert "after" in later["tags_context"]["current_tags"] and "inside" not in later["tags_context"]["current_tags"]
    assert elsewhere["task_run_context"] == {} and elsewhere["flow_run_context"] == {}

"""Prefect's cache against a damaged, moved or hostile work directory (issue 12, items 2 and 3).

Two stage tasks defined here use stage.task_options, as every stage task does: a cache hit
must never return a manifest whose folder is damaged, must survive a moved work directory,
and must never unpickle a record planted in the result store.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from tasks import stage

pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("prefect_harness")]
BUILDS: list[str] = []


def _build(name: str, upstream: stage.Manifest | None):
    def build(out: Path, key: str) -> dict:
        BUILDS.append(name)
        body = (Path(upstream.folder) / "data.txt").read_text() if upstream else "seed"
        (out / "data.txt").write_text(f"{name}({body})")
        return {"name": name}
    return build


@task(name="shard")
def shard(n: int) -> dict:
    return {"rows": n}


@task(name="alpha", **stage.task_options("tasks.stage"))
def alpha(cfg: dict, workdir: str) -> stage.Manifest:
    # a task a stage task calls inherits its result serializer: plain JSON results persist too
    state = shard(3, return_state=True)
    if state.name != "Completed" or state.result() != {"rows": 3}:
        raise RuntimeError(f"a nested task ended {state.name}")
    return stage.run_stage("alpha", cfg, [], workdir, _build("alpha", None), ["tasks.stage"])


@task(name="beta", **stage.task_options("tasks.stage"))
def beta(cfg: dict, up: stage.Manifest, workdir: str) -> stage.Manifest:
    return stage.run_stage("beta", cfg, [up], workdir, _build("beta", up), ["tasks.stage"])


@flow
def two_stages(workdir: str) -> dict:
    a = alpha({"n": 1}, workdir, return_state=True)
    b = beta({"n": 2}, a.result(), workdir, return_state=True)
    return {"alpha": (a.name, a.result()), "beta": (b.name, b.result())}


def run(workdir: Path) -> dict:
    BUILDS.clear()
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: workdir / "prefect-results"}):
        return two_stages(str(workdir))


def damage_folder(folder: Path, how: str) -> None:
    if how == "delete folder":
        shutil.rmtree(folder)
    elif how == "truncate data":
        with open(folder / "data.txt", "r+b") as f:
            f.truncate(3)
    elif how == "empty manifest":
        (folder / "manifest.json").write_text("")
    elif how == "edit data":  # same size, written after the manifest
        data = (folder / "data.txt").read_bytes()
        os.utime(folder / "data.txt", ns=(os.stat(folder / "manifest.json").st_mtime_ns + 10**9,) * 2)
        (folder / "data.txt").write_bytes(data.upper())


def test_a_damaged_stage_folder_is_no_cache_hit(tmp_path):
    first = run(tmp_path)
    assert BUILDS == ["alpha", "beta"] and first["alpha"][0] == "Completed"
    folder = Path(first["alpha"][1].folder)
    for how in ("delete folder", "truncate data", "empty manifest", "edit data"):
        damage_folder(folder, how)
        again = run(tmp_path)
        assert BUILDS == ["alpha"], how  # alpha rebuilt; beta's inputs did not change: a true hit
        assert again["alpha"][0] == "Completed" and again["beta"][0] == "Cached", how
        assert stage.verify(folder) == [] and (folder / "data.txt").read_text() == "alpha(seed)", how
    third = run(tmp_path)
    assert BUILDS == [] and [s for s, _ in third.values()] == ["Cached", "Cached"]


def test_a_moved_work_directory_keeps_every_hit_and_points_at_the_new_place(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    first = run(old)
    os.rename(old, new)
    moved = run(new)
    assert BUILDS == [] and [s for s, _ in moved.values()] == ["Cached", "Cached"]
    for name, (_, m) in moved.items():
        assert Path(m.folder) == (new / "artifacts" / name / first[name][1].key).resolve()
        assert m.path("data.txt").read_text().startswith(name)


class Planted:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_record_is_never_unpickled(tmp_path):
    """Prefect loads a result with the serializer its stored record names: plant records that
    name pickle, with a payload that creates a file when unpickled, where Prefect looks."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    first = run(tmp_path)
    results = tmp_path / "prefect-results"
    alpha_result = next(p for p in results.iterdir() if p.is_file() and b'"stage": "alpha"' in p.read_bytes())
    marker = tmp_path / "pwned"
    pickled = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(picklelib="pickle"),
                                                         storage_key=str(alpha_result)), result=Planted(marker))
    for record in [alpha_result, *(results / stage.RECORDS).iterdir()]:  # every record, and alpha's result
        record.write_bytes(pickled.serialize_metadata() if record.parent.name == stage.RECORDS else pickled.serialize())
    (results / stage.RECORDS / "orphan").write_bytes(pickled.serialize_metadata())
    alpha_result.write_bytes(pickled.serialize_result())
    again = run(tmp_path)
    assert not marker.exists()
    assert again["alpha"][1] == first["alpha"][1] and BUILDS == []  # the folders were intact: reused
    assert [s for s, _ in again.values()] == ["Completed", "Completed"]  # no Prefect hit on a planted record
    third = run(tmp_path)  # the records were rewritten as forja's
    assert [s for s, _ in third.values()] == ["Cached", "Cached"] and not marker.exists()

"""The stage contract: a folder per (stage, key) with a manifest.json written last.

The key hashes the stage name, its config slice, the keys of its inputs and the code
version, so the folder is the cache. Work happens in a hidden temp folder that is
renamed into place only when complete, so a crash never leaves a folder a rerun
would take for finished.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from dataclasses import dataclass

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel, Field

# One file digest for stage manifests and checkpoints (model.checkpoint imports no torch at load).
from model.checkpoint import file_sha256 as sha256_file
from model.faults import fault_point
from tasks.cost import Meter

log = logging.getLogger("forja.stage")
MANIFEST = "manifest.json"


class FileEntry(BaseModel):
    path: str  # relative to the stage folder
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """What a stage made: small, typed, and what Prefect persists as the task result."""

    stage: str
    key: str
    folder: str
    inputs: dict[str, str]  # upstream stage -> key, the lineage
    config: dict[str, Any]
    code_version: str
    created_at: float
    files: list[FileEntry]
    stats: dict[str, Any]
    # What building it took (tasks.cost: wall_s, cpu_s, peak_rss_mb, and a stage's own figures such as
    # training's tokens and MFU); kept with the folder, so a cache hit still says what it cost. Empty in
    # folders made before forja measured.
    cost: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        return Path(self.folder) / name

    def portable(self) -> dict:
        """This manifest as JSON with its folder relative to the work directory
        (artifacts/<stage>/<key>), so a moved work directory still finds it."""
        data = self.model_dump(mode="json")
        parts = Path(self.folder).parts
        if parts[-3:] == ("artifacts", self.stage, self.key):
            data["folder"] = str(Path(*parts[-3:]))
        return data

    def files_matching(self, prefix: str) -> list[Path]:
        return [self.path(f.path) for f in self.files if f.path.startswith(prefix)]


def shards(folder: str | Path, prefix: str = "documents") -> list[Path]:
    """A stage folder's data shards, in order: <prefix>-00000.parquet, <prefix>-00001.parquet, ..."""
    return sorted(Path(folder).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9].parquet"))


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.parquet"


def code_version(modules: list[ModuleType | str | Path]) -> str:
    """A hash of the source of the modules (objects or dotted names) that implement a stage, and
    of other source files it runs (Paths: the C++ of the fused kernels)."""
    h = hashlib.sha256()
    for m in modules:
        if isinstance(m, Path):
            h.update(m.read_bytes())
        else:
            h.update(inspect.getsource(importlib.import_module(m) if isinstance(m, str) else m).encode())
    return h.hexdigest()[:12]


def stage_key(stage: str, config: dict, inputs: dict[str, str], code: str) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


PART = ".part-"  # the prefix of a unit's file while it is being written (see partial())


@contextlib.contextmanager
def partial(path: Path) -> Iterator[Path]:
    """Write one output file atomically: yield a hidden temp name beside path, rename it to path
    when the block ends without error. A unit of work killed mid-write (a lost worker) leaves
    only a `.part-*` file, which run_stage removes before listing the folder: no reader ever
    sees half a shard, and a rerun of the unit simply writes it again."""
    tmp = path.with_name(f"{PART}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _drop_partials(folder: Path) -> None:
    for p in folder.rglob(f"{PART}*"):
        log.info("removing %s, left by a unit of work that did not finish", p)
        p.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class StageDiskFull(OSError):
    """The disk filled up while a stage was building: retrying cannot help until space is freed."""


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of a stage folder, its `folder` set to where the folder lies now; None
    (with a warning) when the file is missing, empty or not a manifest: an unfinished folder."""
    folder = Path(folder)
    try:
        m = Manifest.model_validate_json((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable %s (%s): the stage is not finished and will be rebuilt",
                    folder, MANIFEST, str(e).splitlines()[0])
        return None
    m.folder = str(folder.resolve())
    return m


def damage(m: Manifest, folder: str | Path | None = None, full: bool = False) -> list[str]:
    """What is wrong with a stage folder against its manifest ([] when intact).

    The cheap check (every cache hit): each listed file exists with its size and was not
    modified after the manifest was written. full=True also compares every sha256
    (`forja verify`, tests): it reads all the data.
    """
    folder = Path(folder or m.folder)
    try:
        written = (folder / MANIFEST).stat().st_mtime_ns
    except OSError:
        return [f"{folder / MANIFEST} is missing"]
    problems = []
    for f in m.files:
        p = folder / f.path
        try:
            st = p.stat()
        except OSError:
            problems.append(f"{f.path} is missing")
            continue
        if st.st_size != f.bytes:
            problems.append(f"{f.path} has {st.st_size} bytes, the manifest says {f.bytes}")
        elif st.st_mtime_ns > written:
            problems.append(f"{f.path} was modified after the manifest was written")
        elif full and sha256_file(p) != f.sha256:
            problems.append(f"{f.path} does not match its sha256")
    return problems


def verify(folder: str | Path) -> list[str]:
    """Full check of a finished stage folder, every file's sha256 included ([] when intact)."""
    m = read_manifest(folder)
    return [f"{Path(folder) / MANIFEST} is missing or unreadable"] if m is None else damage(m, folder, full=True)


def _set_aside(folder: Path, why: str) -> None:
    """Move a damaged or unfinished stage folder out of the cache's way (kept for a look)."""
    aside = folder.parent / f".damaged-{folder.name}-{uuid.uuid4().hex[:8]}"
    log.warning("%s: %s; moved to %s and rebuilding", folder, why, aside)
    os.rename(folder, aside)


def _remove_stale_temps(parent: Path, key: str) -> None:
    """Remove the temp folders of this key left by a process of this host that is gone (a
    kill -9 skips every cleanup); a live builder's folder is left alone."""
    host = socket.gethostname()
    for tmp in parent.glob(f".tmp-{key}-*") if parent.is_dir() else []:
        rest = tmp.name[len(f".tmp-{key}-"):]
        owner, _, pid = rest.rpartition("-")[0].rpartition("-")
        if owner != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a process that died", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    return Path(workdir) / "artifacts" / stage / key


def run_stage(
    stage: str,
    config: BaseModel | dict,
    inputs: list[Manifest],
    workdir: str | Path,
    build: Callable[[Path, str], dict],
    code: list[ModuleType | str | Path],
) -> Manifest:
    """Return the finished folder's manifest, or build it in a temp folder and rename it.

    build(tmp_folder, key) writes the stage's files and returns its stats (a "cost" entry in them
    joins the measured cost: see tasks.cost). A finished folder
    is trusted only when its files still match its manifest (damage()); a damaged one, or
    one with an empty or corrupt manifest, is moved aside and rebuilt.
    """
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    lineage = {m.stage: m.key for m in inputs}
    version = code_version(code)
    key = stage_key(stage, cfg, lineage, version)
    final = stage_dir(workdir, stage, key)
    if final.exists():
        found = read_manifest(final)
        problems = ["no readable manifest"] if found is None else damage(found, final)
        if not problems:
            log.info("%s: cache hit, %s", stage, final)
            return found
        if found is None and not (final / MANIFEST).exists():
            shutil.rmtree(final)  # no manifest: not ours to trust (a hand-made or foreign folder)
        else:
            _set_aside(final, "; ".join(problems[:3]))
    fault_point(f"stage:{stage}:start")
    _remove_stale_temps(final.parent, key)
    tmp = final.parent / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        with Meter() as meter:
            stats = build(tmp, key)
        cost = {**meter.result(), **(stats.pop("cost", None) or {})}  # a build may add its own figures
        fault_point(f"stage:{stage}:built")
        _drop_partials(tmp)
        files = [
            FileEntry(path=str(p.relative_to(tmp)), bytes=p.stat().st_size, sha256=sha256_file(p))
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        ]
        manifest = Manifest(
            stage=stage, key=key, folder=str(final.resolve()), inputs=lineage, config=cfg,
            code_version=version, created_at=time.time(), files=files, stats=stats, cost=cost,
        )
        # The folder is written absolute for readers that parse manifest.json themselves; every
        # stage reader (read_manifest) takes it from where the file lies, and Prefect's record of
        # the result stores it relative (portable()), so a moved work directory keeps its cache.
        write_json_atomic(tmp / MANIFEST, manifest.model_dump(mode="json"))
        fault_point(f"stage:{stage}:manifest")
        try:
            os.rename(tmp, final)
        except OSError:
            if read_manifest(final) is None:  # lost a race to a concurrent run: theirs is as good
                raise
            shutil.rmtree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StageDiskFull(
                e.errno, f"{stage}: the disk is full ({e.strerror}) while building {final}; the partial "
                f"folder was removed. Free space on the filesystem holding {Path(workdir).resolve()} (old "
                f"folders under artifacts/, checkpoints) or use a work directory on a larger disk, then rerun",
                str(final)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point(f"stage:{stage}:renamed")
    log.info("%s: wrote %s", stage, final)
    return manifest


def cache_policy(*modules: str | Path):
    """Prefect's cache for a stage task: the same inputs, task source and stage code (the
    named modules, as in the stage key) give a Cached state without running the body.
    TASK_SOURCE alone would miss a change in the plain functions a task calls.

    Inputs are hashed portably: an upstream manifest by its (stage, key), which already
    hashes its whole lineage, and no absolute work directory, so a moved work directory
    keeps its cache."""
    return StageInputs() + TASK_SOURCE + StageCode(modules=tuple(modules))


def task_options(*code: str | Path, extra: CachePolicy | None = None) -> dict:
    """The keyword arguments of every stage's @task: `@task(name="dedupe", **stage.task_options(*CODE))`.

    The cache above (plus `extra`, a stage's own cache component, e.g. crawl's source
    fingerprint), and results persisted as JSON manifests whose records live in StageRecords:
    a record forja did not write is never deserialized (no pickle is ever loaded), and a hit
    whose stage folder is damaged reads as a miss, so the task runs and rebuilds it."""
    policy = cache_policy(*code) if extra is None else cache_policy(*code) + extra
    return {"persist_result": True, "cache_policy": policy.configure(key_storage=StageRecords()),
            "result_serializer": ManifestSerializer()}


# -- Prefect's side of the stage contract: portable cache keys, JSON-only results ---------------

def _portable(value: Any, workdir: str) -> Any:
    """A task input as the cache key sees it: manifests by (stage, key), models as JSON, and
    paths under the work directory relative to it."""
    if isinstance(value, Manifest):
        return {"stage": value.stage, "key": value.key}
    if isinstance(value, BaseModel):
        return _portable(value.model_dump(mode="json"), workdir)
    if isinstance(value, dict):
        return {str(k): _portable(v, workdir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v, workdir) for v in value]
    if isinstance(value, str) and workdir and (value == workdir or value.startswith(workdir + os.sep)):
        return "$WORKDIR" + value[len(workdir):]
    return value


NOT_KEYED = ("workdir", "device", "run_started")  # task inputs that never enter a cache key


@dataclass
class StageInputs(CachePolicy):
    """The task's inputs, hashed without the absolute work directory (see _portable)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        workdir = str(inputs.get("workdir") or "")
        # where and when it ran (the work directory, the device, the flow's start) is never part of
        # what a stage computes
        kept = {k: _portable(v, workdir) for k, v in (inputs or {}).items() if k not in NOT_KEYED}
        return hash_objects(kept, raise_on_failure=True)


@dataclass
class StageCode(CachePolicy):
    """The source of the modules (and files) that implement a stage, as in its stage key."""

    modules: tuple = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return code_version(list(self.modules))


class ManifestSerializer(Serializer):
    """Stage results as JSON manifests with the folder relative to the work directory. Tasks
    a stage task calls inherit its serializer: their results are plain JSON. loads builds
    nothing but a Manifest (its folder resolved against the task's work directory) or plain
    JSON values: never a pickle."""

    type: str = Field(default="forja-manifest", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj.portable() if isinstance(obj, Manifest) else obj).encode()

    def loads(self, blob: bytes) -> Any:
        data = json.loads(blob)
        if not _is_manifest(data):
            return data
        m = Manifest.model_validate(data)
        if not Path(m.folder).is_absolute() and (wd := _task_workdir()):
            m.folder = str((Path(wd) / m.folder).resolve())
        return m


def _is_manifest(data: Any) -> bool:
    return isinstance(data, dict) and {"stage", "key", "folder", "files"} <= data.keys()


SERIALIZER_RECORD = {"type": "forja-manifest"}
RECORDS = "forja-stage-records"  # beside Prefect's results: the records of stage results


class StageRecords(LocalFileSystem):
    """Where Prefect keeps the metadata of stage results (the cache policy's key_storage):
    the one door through which a cached stage result comes back, so it vets each record.

    Prefect takes the serializer from the stored record itself: a planted record saying
    "pickle" would be unpickled (by ResultStore.exists() already). With this metadata storage
    Prefect reads the record here first, then the result bytes, and loads them with the
    record's serializer. A record is returned only if that serializer is exactly forja's JSON
    manifest serializer and the manifest's folder (resolved against the task's current work
    directory) is intact; anything else reads as absent, so the task runs, run_stage rebuilds
    what is damaged and the record is rewritten. Paths are resolved at read time under
    Prefect's local results path (PREFECT_RESULTS_LOCAL_STORAGE_PATH), so a results folder
    moved with its work directory keeps its hits.
    """

    _block_type_name = "Forja Stage Records"

    def _resolve_path(self, path: str) -> Path:
        if not self.basepath:
            return LocalFileSystem(basepath=str(_results_root() / RECORDS))._resolve_path(path)
        return super()._resolve_path(path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes | None:
        return vet_record(self._resolve_path(path), _task_workdir())

    async def aread_path(self, path: str) -> bytes | None:
        return vet_record(self._resolve_path(path), _task_workdir())


def _results_root() -> Path:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    return Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).expanduser().resolve()


def _task_workdir() -> str | None:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    wd = (ctx.parameters or {}).get("workdir") if ctx is not None else None
    return str(wd) if wd else None


def vet_record(path: Path, workdir: str | None) -> bytes | None:
    """The stage result record (metadata) at path, its storage_key pointing at the result file
    where it lies now; None when it is absent, not forja's (any other serializer: its result
    is never deserialized), or the stage folder it names is damaged."""
    try:
        meta = json.loads(path.read_bytes())
        if meta.get("serializer") != SERIALIZER_RECORD:
            log.warning("%s: a result record forja did not write (serializer %r): ignored, the stage reruns",
                        path, meta.get("serializer"))
            return None
        result = Path(meta["storage_key"])
        if not result.is_file():  # the results folder moved (with its work directory)
            result = path.parent.parent / result.name
        data = json.loads(result.read_bytes())
        if not _is_manifest(data):  # a plain JSON result (a task a stage calls): nothing to check
            meta["storage_key"] = str(result.resolve())
            return json.dumps(meta).encode()
        m = Manifest.model_validate(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable stage result record (%s): ignored, the stage reruns", path, e)
        return None
    folder = Path(m.folder)
    if not folder.is_absolute():
        if workdir is None:
            return None
        folder = Path(workdir) / folder
    on_disk = read_manifest(folder)
    problems = (["no readable manifest"] if on_disk is None else
                ["the manifest names other files"] if (on_disk.key, on_disk.files) != (m.key, m.files) else
                damage(on_disk, folder))
    if problems:
        log.warning("cached %s result %s: its folder %s is damaged (%s): the stage reruns",
                    m.stage, m.key, folder, "; ".join(problems[:3]))
        return None
    meta["storage_key"] = str(result.resolve())
    return json.dumps(meta).encode()

"""The stage contract: a folder per (stage, key) with a manifest.json written last.

The key hashes the stage name, its config slice, the keys of its inputs and the code
version, so the folder is the cache. Work happens in a hidden temp folder that is
renamed into place only when complete, so a crash never leaves a folder a rerun
would take for finished.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from pydantic import BaseModel

# One file digest for stage manifests and checkpoints (model.checkpoint imports no torch at load).
from model.checkpoint import file_sha256 as sha256_file

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

    def path(self, name: str) -> Path:
        return Path(self.folder) / name

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


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


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

    build(tmp_folder, key) writes the stage's files and returns its stats.
    """
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    lineage = {m.stage: m.key for m in inputs}
    version = code_version(code)
    key = stage_key(stage, cfg, lineage, version)
    final = stage_dir(workdir, stage, key)
    if (final / MANIFEST).is_file():
        log.info("%s: cache hit, %s", stage, final)
        return Manifest.model_validate_json((final / MANIFEST).read_text())
    if final.exists():  # no manifest: not ours to trust (a hand-made or foreign folder)
        shutil.rmtree(final)
    tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        stats = build(tmp, key)
        files = [
            FileEntry(path=str(p.relative_to(tmp)), bytes=p.stat().st_size, sha256=sha256_file(p))
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        ]
        manifest = Manifest(
            stage=stage, key=key, folder=str(final.resolve()), inputs=lineage, config=cfg,
            code_version=version, created_at=time.time(), files=files, stats=stats,
        )
        write_json_atomic(tmp / MANIFEST, manifest.model_dump(mode="json"))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # lost a race to a concurrent run: theirs is as good
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: wrote %s", stage, final)
    return manifest


def cache_policy(*modules: str | Path):
    """Prefect's cache for a stage task: the same inputs (config slice, upstream manifests,
    workdir), task source and stage code (the named modules, as in the stage key) give a
    Cached state without running the body. TASK_SOURCE alone would miss a change in the
    plain functions a task calls."""
    from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

    class StageCode(CachePolicy):
        def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
            return code_version(list(modules))

    return INPUTS + TASK_SOURCE + StageCode()

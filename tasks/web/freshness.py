"""What a crawl's key follows besides its config, so a scheduled run sees a changed world.

- Local sources (serve_dir, folders, warc, jsonl (.jsonl.gz too), parquet (each file a glob
  matches, by its path), seed_files) count by a fingerprint of
  their content: file paths relative to each source and the sha256 of every file, never
  mtimes (a git checkout rewrites those without changing anything).
- Web seeds with `crawl.refresh` count by a refresh window: a small record under
  <workdir>/crawl-refresh/ says when the current window started and which crawl it
  produced. Within the window Prefect's cache key (and the stage folder) stay the same;
  once it has run out a new window starts, the key changes, and the crawl revalidates
  every page with conditional requests (tasks/web/httpcache.py).

`CrawlSources` adds both to the crawl task's Prefect cache key.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from tasks.config import CrawlConfig

log = logging.getLogger("forja.crawl")
STATE_DIR = "crawl-refresh"

# In-process memo of file digests keyed by what changes whenever the content can have
# changed (size, mtime, ctime, inode): the cache policy and the task body hash the same
# files moments apart. A new process always hashes again, so the fingerprint stays a
# digest of content.
_memo: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if (hit := _memo.get(memo_key)) is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    _memo[memo_key] = digest = h.hexdigest()
    return digest


def tree_digest(root: Path) -> str:
    """Digest of every file under root: relative paths and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def local_sources(cfg: CrawlConfig) -> list[tuple[str, str]]:
    """(kind, path) of every local source of a crawl, in config order."""
    out = [("serve_dir", cfg.serve_dir)] if cfg.serve_dir else []
    out += [("folders", p) for p in cfg.folders] + [("warc", p) for p in cfg.warc]
    out += [("jsonl", j.path) for j in cfg.jsonl]
    for src in cfg.parquet:  # a glob counts by the files it matches now (a new file changes the key)
        found = sorted(glob.glob(src.path, recursive=True)) if set("*?[") & set(src.path) else [src.path]
        out += [("parquet", f) for f in found] or [("parquet", src.path)]
    return out + [("seed_files", p) for p in cfg.seed_files]


def local_fingerprint(cfg: CrawlConfig) -> str | None:
    """A digest of what the crawl's local sources hold, or None when it has none.

    A missing source digests as "missing" (the crawl itself then fails naming it), so
    computing a cache key never fails on bad input.
    """
    sources = local_sources(cfg)
    if not sources:
        return None
    h = hashlib.sha256()
    for kind, p in sources:
        path = Path(p)
        digest = tree_digest(path) if path.is_dir() else file_digest(path) if path.is_file() else "missing"
        named = f"{p}\0" if kind == "parquet" else ""  # which file of a glob
        h.update(f"{kind}\0{named}{digest}\n".encode())
    return h.hexdigest()[:16]


def has_web_seeds(cfg: CrawlConfig) -> bool:
    return bool(cfg.seeds or cfg.seed_files)


def refreshes(cfg: CrawlConfig) -> bool:
    """Whether this crawl runs under a refresh window (crawl.refresh set and web seeds present)."""
    return cfg.refresh is not None and has_web_seeds(cfg)


def request_id(cfg: CrawlConfig, fingerprint: str | None, code: str) -> str:
    """What a crawl asks for before it touches the network: config, local content and code."""
    blob = json.dumps({"config": cfg.model_dump(mode="json"), "sources": fingerprint, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Window:
    """One refresh period of one crawl request, as recorded under the work directory."""

    path: Path
    started: float
    due: bool  # this call started the window: the pages are to be revalidated
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def output_key(self) -> str | None:
        return self.state.get("output_key")

    def record(self, output_key: str, counts: dict[str, int]) -> None:
        """Remember the crawl this window produced and what the run that made it counted."""
        self.state.update(output_key=output_key, last_run={"at": time.time(), "counts": counts})
        _write(self.path, self.state)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def open_window(workdir: str | Path, request: str, period_s: float, now: float | None = None) -> Window:
    """The current refresh window of this request, starting a new one when none is open.

    The Prefect cache policy and the task body both call this; the first to run after the
    last window ran out starts the next, and the other finds it open, so both see the
    same start time.
    """
    path = Path(workdir) / STATE_DIR / f"{request}.json"
    now = time.time() if now is None else now
    try:
        state = json.loads(path.read_text())
        started = float(state["started"])
    except (OSError, ValueError, KeyError, TypeError):
        state, started = {}, None
    if started is not None and 0 <= now - started < period_s:
        return Window(path, started, False, state)
    state = {"started": now, "period_s": period_s, "output_key": None}
    _write(path, state)
    log.info("crawl: refresh due, a new %g s window starts (%s)", period_s, path.name)
    return Window(path, now, True, state)


@dataclass
class CrawlSources(CachePolicy):
    """The crawl task's cache key part from outside its config: the local sources'
    fingerprint and, with crawl.refresh, the start of the current refresh window."""

    code: str = ""  # the stage's code version, part of the window's request id

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str | None:
        cfg, workdir = inputs.get("cfg"), inputs.get("workdir")
        if not isinstance(cfg, CrawlConfig):
            return None
        fingerprint = local_fingerprint(cfg)
        parts: list[Any] = [fingerprint]
        if refreshes(cfg) and workdir:
            parts.append(open_window(workdir, request_id(cfg, fingerprint, self.code), cfg.refresh_seconds).started)
        return hash_objects(parts, raise_on_failure=True)

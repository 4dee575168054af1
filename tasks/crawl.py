"""crawl: gather documents from the web (many hosts at once, politely, safely), WARC files,
folders, JSONL and Parquet files.

The stage door: build() walks the web seeds (tasks/web/walk.py; HTTP rules in
tasks/web/fetch.py, revalidation in tasks/web/httpcache.py) into the first shards, then maps
the file sources as units of work, one input file (or folder) each: the Prefect task
"crawl-file" (tasks/ingest/units.py; readers in tasks/ingest/sources.py and warc.py) writes a
unit's shards into the stage's temp folder, and the stage names them documents-NNNNN.parquet
in source order. Rows, extraction and the shard writer are in tasks/ingest/documents.py.

The key: config + code + a fingerprint of the local sources' content (tasks/web/freshness.py).
With crawl.refresh and web seeds, the pages are walked first (revalidated when the refresh is
due) and the key also holds a digest of the documents produced, so an unchanged site gives the
key it had and one changed page gives a new one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from prefect import task

from tasks import stage
from tasks.config import CrawlConfig
from tasks.ingest import units
from tasks.ingest.documents import (DOC_SCHEMA, HTML_TYPES, MAX_HTML_CHARS, DocumentSink, doc_id,  # noqa: F401
                                    extract, links, sniff_encoding, to_document)
from tasks.mapping import map_units, unit_options
from tasks.reports import publish_counts
from tasks.web import freshness, sites
from tasks.web.fetch import CrawlError, Fetcher, Refused  # noqa: F401
from tasks.web.httpcache import HttpCache
from tasks.web.walk import SERVED, crawl_web, in_scope  # noqa: F401

log = logging.getLogger("forja.crawl")
FRESHNESS = ("new", "changed", "unchanged", "not_modified", "reused")
crawl_site = crawl_web  # the web walk, by its former name


def read_seed_files(paths: list[str]) -> list[str]:
    urls = []
    for p in paths:
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(line)
    return urls


@task(name="crawl-file", **unit_options())
def crawl_file(cfg: CrawlConfig, kind: str, path: str, text_field: str | None, id_field: str | None,
               index: int, folder: str) -> dict:
    """One file source (a WARC, JSONL or Parquet file, or a folder) into shards in folder."""
    return units.read_unit(cfg, kind, path, text_field, id_field, index, folder)


def build(cfg: CrawlConfig, out: Path, cache: HttpCache | None = None, fresh_since: float = math.inf) -> dict:
    """Gather every configured source (serving cfg.serve_dir on loopback first, when set).

    Returns the stats, with content_digest: a digest of the documents, in order, without
    their fetch times."""
    if any("{serve}" in s for s in cfg.seeds) and not cfg.serve_dir:
        raise CrawlError("crawl.seeds use {serve} but crawl.serve_dir is not set")
    counts: Counter = Counter()
    docs = DocumentSink(out, cfg.shard_docs)
    try:
        with sites.serve_folder(cfg.serve_dir) if cfg.serve_dir else contextlib.nullcontext("") as base:
            seeds = [s.replace("{serve}", base) for s in cfg.seeds] + read_seed_files(cfg.seed_files)
            if seeds:
                crawl_web(cfg, seeds, counts, docs, cache, fresh_since, base)
        docs.close()
    except BaseException:
        docs.abort()
        raise
    jobs = [(cfg, kind, path, tf, idf, i, str(Path(out).resolve())) for i, (kind, path, tf, idf) in enumerate(units.plan(cfg))]
    stats = units.assemble(Path(out), docs, map_units(crawl_file, jobs), counts)
    if not stats["documents"]:
        hint = ("; the SSRF guard refused a non-public address: set crawl.allow_loopback: true for a server on "
                "this machine" if counts["refused_non_public_address"] else
                "; DNS lookups gave no answer within crawl.timeout_s: check this machine's resolver"
                if counts["refused_dns_timeout"] else "; check crawl.seeds and the other sources")
        raise CrawlError(f"the crawl produced no documents ({dict(counts)}){hint}")
    return stats | {"counts": dict(counts)}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.crawl", "tasks.web.fetch", "tasks.web.walk", "tasks.web.sites", "tasks.ingest.sources",
        "tasks.ingest.warc", "tasks.ingest.limits", "tasks.ingest.documents", "tasks.ingest.units",
        "tasks.web.httpcache", "tasks.web.freshness")


class CrawlRun(NamedTuple):
    manifest: stage.Manifest
    counts: dict[str, int]  # what this run did; {} when it reused a finished crawl without crawling


def http_cache(workdir: str | Path) -> HttpCache:
    return HttpCache(Path(workdir) / "http-cache")


def crawl_stage(cfg: CrawlConfig, workdir: str | Path, now: float | None = None) -> CrawlRun:
    """The crawl's stage folder: keyed by config, code and the local sources' fingerprint;
    with crawl.refresh and web seeds, also by the documents the (re)validated walk produced."""
    fingerprint = freshness.local_fingerprint(cfg)
    config = cfg.model_dump(mode="json") | {"sources_fingerprint": fingerprint}
    ran: dict[str, int] = {}

    def run(out: Path, key: str) -> dict:
        stats = build(cfg, out, http_cache(workdir))
        ran.update(stats["counts"])
        return stats

    if not freshness.refreshes(cfg):
        return CrawlRun(stage.run_stage("crawl", config, [], workdir, run, CODE), ran)

    window = freshness.open_window(workdir, freshness.request_id(cfg, fingerprint, stage.code_version(list(CODE))),
                                   cfg.refresh_seconds, now)
    folder = stage.stage_dir(workdir, "crawl", window.output_key) if window.output_key else None
    reused = stage.read_manifest(folder) if folder is not None else None
    if reused is not None and not stage.damage(reused, folder):
        log.info("crawl: within the refresh period (since %s), reusing crawl %s", window.started, window.output_key)
        return CrawlRun(reused, ran)
    walk = stage.stage_dir(workdir, "crawl", f".walk-{uuid.uuid4().hex[:8]}")
    walk.mkdir(parents=True)
    try:
        stats = build(cfg, walk, http_cache(workdir), fresh_since=window.started)

        def adopt(out: Path, key: str) -> dict:  # the walk's documents become the new folder
            for f in walk.iterdir():
                os.replace(f, out / f.name)
            ran["adopted"] = 1
            return stats

        m = stage.run_stage("crawl", config | {"content_digest": stats["content_digest"]}, [], workdir, adopt, CODE)
    finally:
        shutil.rmtree(walk, ignore_errors=True)
    counts = {k: stats["counts"].get(k, 0) for k in FRESHNESS}
    window.record(m.key, stats["counts"])
    log.info("crawl: %s %s after revalidation: %s", "new crawl" if ran else "same documents, crawl", m.key,
             ", ".join(f"{v} {k}" for k, v in counts.items()))
    return CrawlRun(m, stats["counts"])


def _publish_run(run: CrawlRun) -> None:
    """This run's revalidation counts, when it reused a folder whose manifest holds another run's."""
    if not run.counts or run.counts == run.manifest.stats.get("counts"):
        return
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key="crawl-refresh", table=[{"metric": k, "value": v} for k, v in run.counts.items()],
                              description=f"crawl {run.manifest.key}: what this run's revalidation found")
    except Exception as e:  # a view only
        log.warning("could not publish the crawl-refresh artifact: %s", e)


@task(name="crawl", **stage.task_options(*CODE, extra=freshness.CrawlSources(code=stage.code_version(list(CODE)))))
def crawl(cfg: CrawlConfig, workdir: str) -> stage.Manifest:
    """Gather the configured sources into a documents folder (see crawl_stage for its key)."""
    run = crawl_stage(cfg, workdir)
    publish_counts("crawl", run.manifest)
    _publish_run(run)
    return run.manifest

"""crawl: gather documents from the web (politely, safely), WARC files, folders and JSONL.

Plain functions (decoding, extraction, the breadth-first walk, the sources) and, at the
bottom, the Prefect task that wraps them into a stage folder. HTTP rules live in
tasks/web/fetch.py, file sources in tasks/ingest/sources.py, what the key follows besides the config
(local content, the refresh window) in tasks/web/freshness.py, revalidation in tasks/web/httpcache.py.

The key: config + code + a fingerprint of the local sources' content. With crawl.refresh
and web seeds, the pages are walked first (revalidated when the refresh is due) and the key
also holds a digest of the documents produced, so an unchanged site gives the key it had
and one changed page gives a new one.
"""
from __future__ import annotations

import codecs
import contextlib
import email.message
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urldefrag, urljoin, urlsplit

import lxml.html
import pyarrow as pa
import pyarrow.parquet as pq
import trafilatura
from prefect import task

from tasks import stage
from tasks.ingest import sources
from tasks.web import fetch, freshness, sites
from tasks.config import CrawlConfig
from tasks.web.fetch import CrawlError, Fetcher, Refused
from tasks.web.httpcache import HttpCache
from tasks.reports import publish_counts

log = logging.getLogger("forja.crawl")

DOC_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("source", pa.string()), ("fetched_at", pa.string()),
    ("status", pa.int32()), ("content_type", pa.string()), ("encoding", pa.string()),
    ("title", pa.string()), ("text", pa.string()), ("depth", pa.int32()), ("licence", pa.string()),
])
HTML_TYPES = fetch.HTML_TYPES
MAX_HTML_CHARS = 2_000_000  # bigger pages are set aside: parsing one costs ~50x its size in memory
# Pages of crawl.serve_dir are named with this in place of the loopback address, whose port
# changes every run: a page keeps its url and id across runs (incremental dedupe, content keys).
SERVED = "{serve}"
FRESHNESS = ("new", "changed", "unchanged", "not_modified", "reused")


def doc_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def _charset(content_type: str) -> str | None:
    msg = email.message.Message()
    msg["content-type"] = content_type
    return msg.get_param("charset")


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def sniff_encoding(body: bytes, content_type: str = "") -> str:
    """The page's encoding: BOM, then HTTP header, then <meta>, then UTF-8 if valid, else cp1252."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            return enc
    candidate = _charset(content_type)
    if not candidate:
        m = _META_CHARSET.search(body[:4096])
        candidate = m.group(1).decode("ascii") if m else None
    if candidate:
        try:
            name = codecs.lookup(candidate).name
        except LookupError:
            name = None
        if name:
            # As browsers do (WHATWG): latin-1 and ascii labels mean windows-1252.
            return "cp1252" if name in ("latin-1", "iso8859-1", "ascii") else name
    try:
        body.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "cp1252"


def extract(html: str, url: str) -> tuple[str, str]:
    """Main text (trafilatura) and title of an HTML page."""
    text = trafilatura.extract(
        html, url=url, favor_recall=True, include_comments=False, include_tables=True, deduplicate=False
    ) or ""
    title = ""
    with contextlib.suppress(Exception):
        title = (lxml.html.fromstring(html).findtext(".//title") or "").strip()
    return text, title


def links(html: str, base: str) -> list[str]:
    """Absolute http(s) targets of <a href> links, fragments removed, in page order."""
    try:
        doc = lxml.html.fromstring(html)
    except Exception:
        return []
    out = []
    for a in doc.iter("a"):
        href = a.get("href")
        if not href or href.startswith(("mailto:", "javascript:")):
            continue
        url = urldefrag(urljoin(base, href.strip())).url
        if urlsplit(url).scheme in ("http", "https"):
            out.append(url)
    return out


def to_document(raw: dict, source: str, depth: int, cfg: CrawlConfig, counts: Counter) -> tuple[dict | None, str]:
    """A document row from a raw page (body bytes) or text record; (None, "") if set aside."""
    ctype = raw.get("content_type", "")
    html, encoding, title = "", "", ""
    if "text" in raw:
        text, encoding = raw["text"], "utf-8"
    else:
        encoding = sniff_encoding(raw["body"], ctype)
        decoded = raw["body"].decode(encoding, errors="replace")
        if fetch.media_type(ctype) in HTML_TYPES:
            if len(decoded) > MAX_HTML_CHARS:
                counts["set_aside_html_too_large"] += 1
                return None, ""
            try:
                text, title = extract(decoded, raw["url"])
            except Exception as e:  # pathological markup must not stop the crawl
                counts["set_aside_extract_error"] += 1
                log.warning("crawl: could not extract %s (%s)", raw["url"], e)
                return None, ""
            html = decoded
        else:
            text = decoded
    doc = {
        "id": doc_id(raw["url"]), "url": raw["url"], "source": source, "fetched_at": raw.get("fetched_at") or sources.now(),
        "status": raw.get("status", 200), "content_type": ctype, "encoding": encoding, "title": title,
        "text": text, "depth": depth, "licence": cfg.licence,
    }
    return doc, html


def in_scope(url: str, scopes: list[tuple[str, str]]) -> bool:
    parts = urlsplit(url)
    return any(parts.netloc == host and parts.path.startswith(prefix) for host, prefix in scopes)


def read_seed_files(paths: list[str]) -> list[str]:
    urls = []
    for p in paths:
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(line)
    return urls


class DocumentSink:
    """Writes documents to Parquet shards in batches as they come, so a crawl's memory stays
    flat; a new shard starts every shard_docs documents. The same URL from two sources is
    kept once (the first)."""

    def __init__(self, folder: Path, shard_docs: int, batch: int = 256):
        self.folder, self.shard_docs = folder, shard_docs
        self.writer: pq.ParquetWriter | None = None
        self.rows: list[dict] = []
        self.ids: set[str] = set()
        self.batch, self.count, self.chars, self.in_shard, self.shard = batch, 0, 0, 0, 0
        self._digest = hashlib.sha256()

    def __len__(self) -> int:
        return self.count

    def append(self, doc: dict) -> bool:
        if doc["id"] in self.ids:
            return False
        self.ids.add(doc["id"])
        self.rows.append(doc)
        self.count += 1
        self.in_shard += 1
        self.chars += len(doc["text"])
        # Everything but fetched_at: the same content fetched again gives the same digest.
        self._digest.update(json.dumps({k: v for k, v in doc.items() if k != "fetched_at"}, sort_keys=True).encode())
        if len(self.rows) >= self.batch or self.in_shard >= self.shard_docs:
            self.flush()
        if self.in_shard >= self.shard_docs:
            self._roll()
        return True

    @property
    def digest(self) -> str:
        """A digest of the documents appended so far, in order, without their fetch times."""
        return self._digest.hexdigest()[:16]

    def flush(self) -> None:
        if self.rows:
            if self.writer is None:
                path = self.folder / stage.shard_name("documents", self.shard)
                self.writer = pq.ParquetWriter(path, DOC_SCHEMA, compression="zstd")
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=DOC_SCHEMA))
            self.rows = []

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.shard, self.in_shard = self.shard + 1, 0

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def crawl_site(cfg: CrawlConfig, seeds: list[str], counts: Counter, docs: DocumentSink,
               cache: HttpCache | None = None, fresh_since: float = math.inf, served: str = "") -> None:
    """Breadth-first walk from seeds within scope, appending documents and counting outcomes.

    With a cache, pages are revalidated (see tasks/web/fetch.py) and counted by freshness.
    served is the base URL of serve_dir: its pages are named {serve}/... and never cached
    (the folder's fingerprint already says whether they changed).
    """
    scopes = [(urlsplit(s).netloc, p) for s in seeds for p in (cfg.path_prefixes or [urlsplit(s).path.rsplit("/", 1)[0] + "/"])]

    def is_served(url: str) -> bool:
        return bool(served) and (url == served or url.startswith(served + "/"))

    def name(url: str) -> str:
        return SERVED + url[len(served):] if is_served(url) else url

    fetcher = Fetcher(cfg, cache=cache, fresh_since=fresh_since, cache_key=lambda url: None if is_served(url) else url)
    queue = deque((s, 0) for s in dict.fromkeys(seeds))
    seen, start = set(seeds), len(docs)
    try:
        while queue and len(docs) - start < cfg.max_pages:
            url, depth = queue.popleft()
            is_seed = depth == 0
            try:
                if not fetcher.allowed(url):
                    why = fetcher.why_host_skipped(url)
                    if is_seed and why:
                        raise CrawlError(f"seed {url} cannot be crawled: {why}")
                    counts["skipped_host_down" if why else "skipped_robots"] += 1
                    if is_seed:
                        log.warning("crawl: seed %s is disallowed by robots.txt", url)
                    continue
                page = fetcher.get(url)
            except Refused as e:
                counts[f"refused_{e.reason}"] += 1
                (log.warning if e.reason == "dns_timeout" else log.info)("crawl: refused %s", e)
                continue
            except CrawlError:
                if is_seed:
                    raise
                counts["failed"] += 1
                log.warning("crawl: giving up on %s", url)
                continue
            if page.status >= 400:
                if is_seed:
                    raise CrawlError(f"seed {url} answered HTTP {page.status}")
                counts[f"http_{page.status}"] += 1
                continue
            if page.freshness:
                counts[page.freshness] += 1
            doc, html = to_document({"url": name(page.url), "status": page.status, "content_type": page.content_type,
                                     "body": page.body, "fetched_at": page.fetched_at}, "http", depth, cfg, counts)
            if doc is None:
                continue
            if not docs.append(doc):  # a redirect landed on a page already crawled
                counts["duplicate_url"] += 1
                continue
            counts["fetched"] += 1
            if counts["fetched"] % 10 == 0:
                log.info("crawl: %d pages fetched, %d queued", counts["fetched"], len(queue))
            if cfg.follow_links and depth < cfg.max_depth and html:
                for link in links(html, page.url):
                    if link not in seen and in_scope(link, scopes):
                        seen.add(link)
                        queue.append((link, depth + 1))
    finally:
        fetcher.close()
    counts["left_in_queue"] += len(queue)


def read_files(cfg: CrawlConfig, counts: Counter, docs: DocumentSink) -> None:
    """Documents from the WARC, folder and JSONL sources."""
    cap = cfg.max_body_bytes  # one size limit for every document, fetched or read from disk
    feeds = [("warc", sources.read_warc(Path(p), counts, cap)) for p in cfg.warc]
    feeds += [("folder", sources.read_folder(Path(p), counts, cap)) for p in cfg.folders]
    feeds += [("jsonl", sources.read_jsonl(Path(j.path), j.text_field, j.id_field, counts, cap)) for j in cfg.jsonl]
    for source, rows in feeds:
        for raw in rows:
            doc, _ = to_document(raw, source, 0, cfg, counts)
            if doc is not None and docs.append(doc):
                counts[f"{source}_documents"] += 1


def build(cfg: CrawlConfig, out: Path, cache: HttpCache | None = None, fresh_since: float = math.inf) -> dict:
    """Gather every configured source (serving cfg.serve_dir on loopback first, when set).

    Returns the stats, with content_digest: a digest of the documents (see DocumentSink)."""
    if any("{serve}" in s for s in cfg.seeds) and not cfg.serve_dir:
        raise CrawlError("crawl.seeds use {serve} but crawl.serve_dir is not set")
    counts: Counter = Counter()
    docs = DocumentSink(out, cfg.shard_docs)
    try:
        with sites.serve_folder(cfg.serve_dir) if cfg.serve_dir else contextlib.nullcontext("") as base:
            seeds = [s.replace("{serve}", base) for s in cfg.seeds] + read_seed_files(cfg.seed_files)
            if seeds:
                crawl_site(cfg, seeds, counts, docs, cache, fresh_since, base)
        read_files(cfg, counts, docs)
    finally:
        docs.close()
    if not len(docs):
        hint = ("; the SSRF guard refused a non-public address: set crawl.allow_loopback: true for a server on "
                "this machine" if counts["refused_non_public_address"] else
                "; DNS lookups gave no answer within crawl.timeout_s: check this machine's resolver"
                if counts["refused_dns_timeout"] else "; check crawl.seeds and the other sources")
        raise CrawlError(f"the crawl produced no documents ({dict(counts)}){hint}")
    return {"documents": len(docs), "counts": dict(counts), "text_chars": docs.chars, "content_digest": docs.digest}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.crawl", "tasks.web.fetch", "tasks.web.sites", "tasks.ingest.sources", "tasks.web.httpcache", "tasks.web.freshness")


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

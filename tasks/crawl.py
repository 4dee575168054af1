"""crawl: gather documents from the web (politely, safely), WARC files, folders and JSONL.

Plain functions (decoding, extraction, the breadth-first walk, the sources) and, at the
bottom, the Prefect task that wraps them into a stage folder. HTTP rules live in
tasks/fetch.py, file sources in tasks/sources.py.
"""
from __future__ import annotations

import codecs
import contextlib
import email.message
import hashlib
import logging
import re
from collections import Counter, deque
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import lxml.html
import pyarrow as pa
import pyarrow.parquet as pq
import trafilatura
from prefect import task

from tasks import fetch, sites, sources, stage
from tasks.config import CrawlConfig
from tasks.fetch import CrawlError, Fetcher, Refused
from tasks.reports import publish_counts

log = logging.getLogger("forja.crawl")

DOC_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("source", pa.string()), ("fetched_at", pa.string()),
    ("status", pa.int32()), ("content_type", pa.string()), ("encoding", pa.string()),
    ("title", pa.string()), ("text", pa.string()), ("depth", pa.int32()), ("licence", pa.string()),
])
HTML_TYPES = fetch.HTML_TYPES
MAX_HTML_CHARS = 2_000_000  # bigger pages are set aside: parsing one costs ~50x its size in memory


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
        if len(self.rows) >= self.batch or self.in_shard >= self.shard_docs:
            self.flush()
        if self.in_shard >= self.shard_docs:
            self._roll()
        return True

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


def crawl_site(cfg: CrawlConfig, seeds: list[str], counts: Counter, docs: DocumentSink) -> None:
    """Breadth-first walk from seeds within scope, appending documents and counting outcomes."""
    scopes = [(urlsplit(s).netloc, p) for s in seeds for p in (cfg.path_prefixes or [urlsplit(s).path.rsplit("/", 1)[0] + "/"])]
    fetcher = Fetcher(cfg)
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
                log.info("crawl: refused %s", e)
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
            doc, html = to_document({"url": page.url, "status": page.status, "content_type": page.content_type,
                                     "body": page.body}, "http", depth, cfg, counts)
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
    feeds = [("warc", sources.read_warc(Path(p), counts)) for p in cfg.warc]
    feeds += [("folder", sources.read_folder(Path(p), counts)) for p in cfg.folders]
    feeds += [("jsonl", sources.read_jsonl(Path(j.path), j.text_field, j.id_field, counts)) for j in cfg.jsonl]
    for source, rows in feeds:
        for raw in rows:
            doc, _ = to_document(raw, source, 0, cfg, counts)
            if doc is not None and docs.append(doc):
                counts[f"{source}_documents"] += 1


def build(cfg: CrawlConfig, out: Path) -> dict:
    """Gather every configured source (serving cfg.serve_dir on loopback first, when set)."""
    if any("{serve}" in s for s in cfg.seeds) and not cfg.serve_dir:
        raise CrawlError("crawl.seeds use {serve} but crawl.serve_dir is not set")
    counts: Counter = Counter()
    docs = DocumentSink(out, cfg.shard_docs)
    try:
        with sites.serve_folder(cfg.serve_dir) if cfg.serve_dir else contextlib.nullcontext("") as base:
            seeds = [s.replace("{serve}", base) for s in cfg.seeds] + read_seed_files(cfg.seed_files)
            if seeds:
                crawl_site(cfg, seeds, counts, docs)
        read_files(cfg, counts, docs)
    finally:
        docs.close()
    if not len(docs):
        hint = ("; the SSRF guard refused a non-public address: set crawl.allow_loopback: true for a server on "
                "this machine" if counts["refused_non_public_address"] else "; check crawl.seeds and the other sources")
        raise CrawlError(f"the crawl produced no documents ({dict(counts)}){hint}")
    return {"documents": len(docs), "counts": dict(counts), "text_chars": docs.chars}


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.crawl", "tasks.fetch", "tasks.sites", "tasks.sources")


@task(name="crawl", persist_result=True, cache_policy=stage.cache_policy(*CODE))
def crawl(cfg: CrawlConfig, workdir: str) -> stage.Manifest:
    """Gather the configured sources into a documents folder."""
    m = stage.run_stage("crawl", cfg, [], workdir, lambda out, key: build(cfg, out), CODE)
    publish_counts("crawl", m)
    return m

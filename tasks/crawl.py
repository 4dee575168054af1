"""crawl: fetch pages from seed URLs within scope, politely, and extract their text.

Plain functions (fetching, robots.txt, decoding, extraction, the breadth-first walk)
and, at the bottom, the Prefect task that wraps them into a stage folder.
"""
from __future__ import annotations

import contextlib
import codecs
import email.message
import hashlib
import logging
import re
import time
import urllib.robotparser
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import httpx
import lxml.html
import pyarrow as pa
import pyarrow.parquet as pq
import trafilatura
from prefect import task

from tasks import sites, stage
from tasks.config import CrawlConfig
from tasks.reports import publish_counts

log = logging.getLogger("forja.crawl")

DOC_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("source", pa.string()), ("fetched_at", pa.string()),
    ("status", pa.int32()), ("content_type", pa.string()), ("encoding", pa.string()),
    ("title", pa.string()), ("text", pa.string()), ("depth", pa.int32()), ("licence", pa.string()),
])
RETRY_STATUS = {429, 500, 502, 503, 504}
HTML_TYPES = ("text/html", "application/xhtml+xml")


class CrawlError(RuntimeError):
    """A crawl that cannot go on; the message names the URL."""


@dataclass
class Page:
    url: str
    status: int
    content_type: str
    body: bytes


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


@dataclass
class Fetcher:
    """HTTP GET with retries, back-off, a per-host delay and robots.txt."""

    cfg: CrawlConfig
    client: httpx.Client = field(init=False)
    robots: dict[str, urllib.robotparser.RobotFileParser | None] = field(default_factory=dict)
    last_hit: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.client = httpx.Client(
            timeout=self.cfg.timeout_s, follow_redirects=True, max_redirects=5,
            headers={"User-Agent": self.cfg.user_agent},
        )

    def close(self):
        self.client.close()

    def _wait(self, host: str, delay: float) -> None:
        wait = self.last_hit.get(host, 0) + delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_hit[host] = time.monotonic()

    def get(self, url: str, delay: float | None = None) -> Page:
        """Fetch url, retrying transient failures; raises CrawlError naming url when out of tries."""
        host = urlsplit(url).netloc
        delay = self.cfg.delay_s if delay is None else delay
        reason = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            self._wait(host, delay)
            try:
                with self.client.stream("GET", url) as r:
                    ctype = r.headers.get("content-type", "")
                    if r.status_code in RETRY_STATUS:
                        reason = f"HTTP {r.status_code}"
                        retry_after = r.headers.get("retry-after", "")
                        if retry_after.isdigit():
                            time.sleep(min(float(retry_after), 60.0))
                        continue
                    body = b""
                    if r.status_code < 400 and ctype.split(";")[0].strip().lower() in HTML_TYPES + ("text/plain",):
                        chunks, size = [], 0
                        for chunk in r.iter_bytes():
                            size += len(chunk)
                            if size > self.cfg.max_body_bytes:
                                raise CrawlError(f"{url}: body larger than crawl.max_body_bytes")
                            chunks.append(chunk)
                        body = b"".join(chunks)
                    return Page(str(r.url), r.status_code, ctype, body)
            except (httpx.TransportError, httpx.TooManyRedirects) as e:
                reason = f"{type(e).__name__}: {e}"
        raise CrawlError(f"could not fetch {url} after {self.cfg.retries + 1} attempts ({reason})")

    def allowed(self, url: str) -> bool:
        """robots.txt: 4xx allows all, 5xx or unreachable disallows the host."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self.robots:
            rp = urllib.robotparser.RobotFileParser()
            try:
                page = self.get(origin + "/robots.txt")
                if page.status >= 400:
                    rp.allow_all = True
                else:
                    rp.parse(page.body.decode("utf-8", "replace").splitlines())
            except CrawlError:
                rp.disallow_all = True
            self.robots[origin] = rp
        return self.robots[origin].can_fetch(self.cfg.user_agent, url)

    def delay_for(self, url: str) -> float:
        parts = urlsplit(url)
        rp = self.robots.get(f"{parts.scheme}://{parts.netloc}")
        crawl_delay = rp.crawl_delay(self.cfg.user_agent) if rp else None
        return max(self.cfg.delay_s, float(crawl_delay or 0))


def in_scope(url: str, scopes: list[tuple[str, str]]) -> bool:
    parts = urlsplit(url)
    return any(parts.netloc == host and parts.path.startswith(prefix) for host, prefix in scopes)


def crawl_site(cfg: CrawlConfig, seeds: list[str]) -> tuple[list[dict], Counter]:
    """Breadth-first walk from seeds within scope; returns documents and counts by outcome."""
    scopes = [(urlsplit(s).netloc, p) for s in seeds for p in (cfg.path_prefixes or [urlsplit(s).path.rsplit("/", 1)[0] + "/"])]
    fetcher = Fetcher(cfg)
    queue = deque((s, 0) for s in seeds)
    seen, docs, counts = set(seeds), [], Counter()
    try:
        while queue and len(docs) < cfg.max_pages:
            url, depth = queue.popleft()
            is_seed = depth == 0
            if not fetcher.allowed(url):
                if is_seed:
                    raise CrawlError(f"seed {url} is disallowed by robots.txt (or robots.txt is unreachable)")
                counts["skipped_robots"] += 1
                continue
            try:
                page = fetcher.get(url, fetcher.delay_for(url))
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
            if page.content_type.split(";")[0].strip().lower() not in HTML_TYPES:
                counts["skipped_content_type"] += 1
                continue
            encoding = sniff_encoding(page.body, page.content_type)
            html = page.body.decode(encoding, errors="replace")
            text, title = extract(html, page.url)
            docs.append({
                "id": doc_id(page.url), "url": page.url, "source": "http",
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "status": page.status, "content_type": page.content_type, "encoding": encoding,
                "title": title, "text": text, "depth": depth, "licence": cfg.licence,
            })
            counts["fetched"] += 1
            if len(docs) % 10 == 0:
                log.info("crawl: %d pages fetched, %d queued", len(docs), len(queue))
            if depth < cfg.max_depth:
                for link in links(html, page.url):
                    if link not in seen and in_scope(link, scopes):
                        seen.add(link)
                        queue.append((link, depth + 1))
    finally:
        fetcher.close()
    counts["left_in_queue"] = len(queue)
    return docs, counts


def write_documents(rows: list[dict], path: Path, schema: pa.Schema | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    pq.write_table(table, path, compression="zstd")


def build(cfg: CrawlConfig, out: Path) -> dict:
    """Crawl (serving cfg.serve_dir on loopback first, when set) into out/documents.parquet."""
    with sites.serve_folder(cfg.serve_dir) if cfg.serve_dir else contextlib.nullcontext("") as base:
        seeds = [s.replace("{serve}", base) for s in cfg.seeds]
        if any("{serve}" in s for s in cfg.seeds) and not cfg.serve_dir:
            raise CrawlError("crawl.seeds use {serve} but crawl.serve_dir is not set")
        docs, counts = crawl_site(cfg, seeds)
    if not docs:
        raise CrawlError(f"crawl of {', '.join(seeds)} produced no documents ({dict(counts)})")
    write_documents(docs, out / "documents.parquet", DOC_SCHEMA)
    return {"documents": len(docs), "counts": dict(counts), "text_chars": sum(len(d["text"]) for d in docs)}


@task(name="crawl", persist_result=True, cache_policy=stage.CACHE_POLICY)
def crawl(cfg: CrawlConfig, workdir: str) -> stage.Manifest:
    """Crawl the configured sources into a documents folder."""
    import tasks.crawl as me

    m = stage.run_stage("crawl", cfg, [], workdir, lambda out, key: build(cfg, out), [me, sites])
    publish_counts("crawl", m)
    return m

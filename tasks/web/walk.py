"""The web part of a crawl: many hosts at once, each walked breadth-first and politely.

Up to crawl.concurrency hosts are walked at a time, one thread each; a host's walk has at
most crawl.host_connections requests in flight (a small pool of its own), and every request
goes through the crawl's HostGate (per host: the connection limit and crawl.delay_s or its
robots Crawl-delay between request starts) and the Fetcher's rules (robots, SSRF guard,
redirects, revalidation).

The output does not depend on timing. A host's walk makes every decision in its frontier's
order (results are taken in the order they were asked for), and writes its documents to a
spill file of its own; links to another in-scope host are handed over after the round, in
host order. The documents are then appended to the sink round by round, hosts in first-seen
order, so the same responses give the same documents in the same order and shards. Memory:
each host's frontier holds at most crawl.max_frontier URLs (links past it are counted as
frontier_full, never queued), its seen set at most max_pages + max_frontier URLs (past it,
links count as frontier_full too), and documents wait on disk, not in memory. Each host
stops at max_pages documents, and the crawl keeps the first max_pages in that order.
"""
from __future__ import annotations

import contextvars
import logging
import math
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from tasks import stage
from tasks.config import CrawlConfig
from tasks.ingest.documents import DocumentSink, links, to_document
from tasks.web.fetch import CrawlError, Fetcher, HostGate, Refused
from tasks.web.httpcache import HttpCache

log = logging.getLogger("forja.crawl")
SERVED = "{serve}"


@dataclass
class HostWalk:
    """One host's breadth-first walk, kept across rounds."""

    index: int  # first-seen order
    host: str  # host:port, as the politeness is keyed
    queue: deque = field(default_factory=deque)  # (url, depth) waiting, in discovery order
    seen: set = field(default_factory=set)
    kept: int = 0  # documents written
    handed: list = field(default_factory=list)  # (url, depth) found here for other hosts, this round
    fetcher: Fetcher | None = None  # kept across rounds: robots.txt is asked for once


@dataclass
class Walker:
    """What every host walk of one crawl shares."""

    cfg: CrawlConfig
    folder: Path
    scopes: list[tuple[str, str]]
    gate: HostGate
    cache: HttpCache | None
    fresh_since: float
    served: str
    # One page parsed at a time across hosts: parsing costs ~50x a page's size in memory, and the
    # GIL runs one parse at a time anyway, so this bounds memory without costing throughput.
    parsing: threading.Lock = field(default_factory=threading.Lock)

    def is_served(self, url: str) -> bool:
        return bool(self.served) and (url == self.served or url.startswith(self.served + "/"))

    def name(self, url: str) -> str:
        return SERVED + url[len(self.served):] if self.is_served(url) else url

    def fetcher(self) -> Fetcher:
        return Fetcher(self.cfg, cache=self.cache, fresh_since=self.fresh_since, gate=self.gate,
                       cache_key=lambda url: None if self.is_served(url) else url)


def in_scope(url: str, scopes: list[tuple[str, str]]) -> bool:
    parts = urlsplit(url)
    return any(parts.netloc == host and parts.path.startswith(prefix) for host, prefix in scopes)


def crawl_web(cfg: CrawlConfig, seeds: list[str], counts: Counter, docs: DocumentSink,
              cache: HttpCache | None = None, fresh_since: float = math.inf, served: str = "") -> None:
    """Walk from seeds within scope, many hosts at once, appending at most cfg.max_pages
    documents to docs and counting outcomes.

    With a cache, pages are revalidated (see tasks/web/fetch.py) and counted by freshness.
    served is the base URL of serve_dir: its pages are named {serve}/... and never cached."""
    scopes = [(urlsplit(s).netloc, p) for s in seeds for p in (cfg.path_prefixes or [urlsplit(s).path.rsplit("/", 1)[0] + "/"])]
    walker = Walker(cfg, Path(docs.folder), scopes, HostGate(cfg.host_connections), cache, fresh_since, served)
    hosts: dict[str, HostWalk] = {}
    for s in dict.fromkeys(seeds):
        h = hosts.setdefault(urlsplit(s).netloc, HostWalk(len(hosts), urlsplit(s).netloc))
        h.queue.append((s, 0))
        h.seen.add(s)
    spills: list[Path] = []
    try:
        for round_ in range(cfg.max_depth + 2):  # a hand-over adds a level: never more rounds than levels
            active = [h for h in hosts.values() if h.queue and h.kept < cfg.max_pages]
            if not active:
                break
            with ThreadPoolExecutor(min(cfg.concurrency, len(active)), thread_name_prefix="crawl-host") as pool:
                # each thread runs in a copy of this context, so its log lines reach the Prefect run's log
                futures = [pool.submit(contextvars.copy_context().run, _walk_host, walker, h, round_) for h in active]
                done = [f.result() for f in futures]  # the first error, in host order
            for h, (files, host_counts) in zip(active, done):
                counts.update(host_counts)
                spills += [walker.folder / f["name"] for f in files]
            _hand_over(active, hosts, cfg, counts)
        _append(spills, docs, cfg, counts)
    finally:
        for p in spills:
            p.unlink(missing_ok=True)
        for h in hosts.values():
            if h.fetcher is not None:
                h.fetcher.close()
    counts["left_in_queue"] += sum(len(h.queue) for h in hosts.values())


def _hand_over(active: list[HostWalk], hosts: dict[str, HostWalk], cfg: CrawlConfig, counts: Counter) -> None:
    """Queue the links each host found for other hosts, in host and discovery order."""
    for h in active:
        for url, depth in h.handed:
            target = hosts[urlsplit(url).netloc]  # in scope: a seed's host
            if url in target.seen:
                continue
            if len(target.queue) >= cfg.max_frontier:
                counts["frontier_full"] += 1
                continue
            target.seen.add(url)
            target.queue.append((url, depth))
        h.handed = []


def _append(spills: list[Path], docs: DocumentSink, cfg: CrawlConfig, counts: Counter) -> None:
    """The host walks' documents into docs, in spill order, up to cfg.max_pages."""
    start = len(docs)
    for path in spills:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=32):
            for doc in batch.to_pylist():
                if len(docs) - start >= cfg.max_pages:
                    counts["over_max_pages"] += 1
                elif docs.append(doc):
                    continue
                else:  # another host redirected to a page already kept
                    counts["duplicate_url"] += 1
                counts["fetched"] -= 1


def _walk_host(w: Walker, h: HostWalk, round_: int) -> tuple[list[dict], Counter]:
    """Walk one host's frontier (this round) into a spill file; return its files and counts."""
    cfg, counts = w.cfg, Counter()
    fetcher = h.fetcher = h.fetcher or w.fetcher()
    sink = DocumentSink(w.folder, cfg.max_pages + 1, batch=32, prefix=f"{stage.PART}walk-r{round_:03d}-h{h.index:05d}")
    pool = ThreadPoolExecutor(cfg.host_connections) if cfg.host_connections > 1 else None
    window: deque = deque()  # (url, depth, future or None), in frontier order
    try:
        while (h.queue or window) and h.kept < cfg.max_pages:
            while h.queue and len(window) < cfg.host_connections and h.kept + len(window) < cfg.max_pages:
                url, depth = h.queue.popleft()
                if _robots_allow(fetcher, url, depth == 0, counts):
                    window.append((url, depth, pool.submit(contextvars.copy_context().run, fetcher.get, url) if pool else None))
            if not window:
                continue
            url, depth, future = window.popleft()
            page = _result(fetcher, url, depth == 0, future, counts)
            if page is not None:
                _keep(w, h, page, depth, sink, counts)
            page = future = None  # not held while the next page is fetched
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return sink.files, counts


def _robots_allow(fetcher: Fetcher, url: str, is_seed: bool, counts: Counter) -> bool:
    try:
        if fetcher.allowed(url):
            return True
        why = fetcher.why_host_skipped(url)
        if is_seed and why:
            raise CrawlError(f"seed {url} cannot be crawled: {why}")
        counts["skipped_host_down" if why else "skipped_robots"] += 1
        if is_seed:
            log.warning("crawl: seed %s is disallowed by robots.txt", url)
    except Refused as e:
        counts[f"refused_{e.reason}"] += 1
        (log.warning if e.reason == "dns_timeout" else log.info)("crawl: refused %s", e)
    return False


def _result(fetcher: Fetcher, url: str, is_seed: bool, future, counts: Counter):
    """The fetched page of url, or None (counted) when it gave none."""
    try:
        page = future.result() if future is not None else fetcher.get(url)
    except Refused as e:
        counts[f"refused_{e.reason}"] += 1
        (log.warning if e.reason == "dns_timeout" else log.info)("crawl: refused %s", e)
        return None
    except CrawlError:
        if is_seed:
            raise
        counts["failed"] += 1
        log.warning("crawl: giving up on %s", url)
        return None
    if page.status >= 400:
        if is_seed:
            raise CrawlError(f"seed {url} answered HTTP {page.status}")
        counts[f"http_{page.status}"] += 1
        return None
    return page


def _keep(w: Walker, h: HostWalk, page, depth: int, sink: DocumentSink, counts: Counter) -> None:
    """Write a fetched page's document and queue its in-scope links (or hand them over)."""
    cfg = w.cfg
    if page.freshness:
        counts[page.freshness] += 1
    with w.parsing:
        doc, html = to_document({"url": w.name(page.url), "status": page.status, "content_type": page.content_type,
                                 "body": page.body, "fetched_at": page.fetched_at}, "http", depth, cfg, counts)
        found = links(html, page.url) if doc is not None and cfg.follow_links and depth < cfg.max_depth and html else []
        html = ""
    if doc is None:
        return
    if not sink.append(doc):  # a redirect landed on a page already crawled
        counts["duplicate_url"] += 1
        return
    h.kept += 1
    counts["fetched"] += 1
    if counts["fetched"] % 10 == 0:
        log.info("crawl: %s: %d pages fetched, %d queued", h.host, counts["fetched"], len(h.queue))
    for link in found:
        if link in h.seen or not in_scope(link, w.scopes):
            continue
        if len(h.queue) + len(h.handed) >= cfg.max_frontier or len(h.seen) >= cfg.max_pages + cfg.max_frontier:
            counts["frontier_full"] += 1
            continue
        h.seen.add(link)
        (h.queue if urlsplit(link).netloc == h.host else h.handed).append((link, depth + 1))

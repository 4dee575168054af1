from http.server import BaseHTTPRequestHandler

import pyarrow.parquet as pq
import pytest

from tasks import crawl as c
from tasks.config import CrawlConfig
from tasks.web.sites import serve_folder
from tests.fixtures.docs import read_docs
from tests.fixtures.loopback import loopback_server


def cfg(**kw):
    base = dict(seeds=["{serve}/docs/index.html"], delay_s=0, retries=1, backoff_s=0.01, timeout_s=5,
                allow_loopback=True)
    return CrawlConfig(**(base | kw))


def test_crawls_in_scope_pages_over_http_and_honours_robots(site, tmp_path):
    stats = c.build(cfg(serve_dir=str(site)), tmp_path)
    docs = read_docs(tmp_path).to_pylist()
    # Served pages are named {serve}/path, not by the loopback port that changes every run.
    assert all(d["url"].startswith("{serve}/") and d["id"] == c.doc_id(d["url"]) for d in docs)
    paths = {d["url"].removeprefix("{serve}/") for d in docs}
    assert "docs/p3.html" in paths and "docs/english.html" in paths
    assert "docs/privado/segredo.html" not in paths  # robots.txt disallows it
    assert not any(p.startswith("outside/") for p in paths)  # outside the seed's folder
    assert stats["counts"]["skipped_robots"] == 1
    assert {"id", "url", "text"} <= set(docs[0])


def test_iso_8859_1_declared_in_meta_is_decoded(site, tmp_path):
    c.build(cfg(serve_dir=str(site)), tmp_path)
    docs = {d["url"].rsplit("/", 1)[1]: d for d in read_docs(tmp_path).to_pylist()}
    assert docs["p1.html"]["encoding"] == "cp1252"
    assert "sistema operacional" in docs["p1.html"]["text"]
    assert "é" in docs["p1.html"]["text"] and "Ã" not in docs["p1.html"]["text"]
    assert docs["p1.html"]["title"] == "Capítulo 1"


def test_depth_and_page_limits(site, tmp_path):
    c.build(cfg(serve_dir=str(site), max_depth=0), tmp_path)
    assert read_docs(tmp_path).num_rows == 1
    c.build(cfg(serve_dir=str(site), max_pages=3), tmp_path)
    assert read_docs(tmp_path).num_rows == 3


def test_unreachable_seed_fails_naming_the_url(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/docs/index.html"
    with pytest.raises(c.CrawlError, match=f"127.0.0.1:{port}"):
        c.build(cfg(seeds=[url]), tmp_path)


def test_transient_server_errors_are_retried():
    hits = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            code = 500 if hits.count(self.path) <= 2 else 200
            self.send_response(code)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body><p>ok</p></body></html>")

        def log_message(self, *a):
            pass

    with loopback_server(Flaky) as port:
        f = c.Fetcher(cfg(retries=3))
        page = f.get(f"http://127.0.0.1:{port}/a.html")
        assert page.status == 200 and hits.count("/a.html") == 3
        f.close()


def test_sniff_encoding_prefers_header_then_meta():
    body = '<meta charset="iso-8859-1"><p>ação</p>'.encode("latin-1")
    assert c.sniff_encoding(body, "text/html") == "cp1252"
    assert c.sniff_encoding("<p>ação</p>".encode(), "text/html") == "utf-8"
    assert c.sniff_encoding(body, "text/html; charset=utf-8") == "utf-8"


def test_serve_folder_sends_html_without_charset(site):
    import httpx

    with serve_folder(site) as base:
        r = httpx.get(base + "/docs/index.html")
    assert r.headers["content-type"] == "text/html"


def test_documents_are_written_in_shards(site, tmp_path):
    stats = c.build(cfg(serve_dir=str(site), shard_docs=4), tmp_path)
    files = sorted(p.name for p in tmp_path.glob("documents-*.parquet"))
    assert files == [f"documents-0000{i}.parquet" for i in range(len(files))] and len(files) >= 3
    assert sum(pq.read_table(tmp_path / f).num_rows for f in files) == stats["documents"]


# --- many hosts at once -------------------------------------------------------------------------

class Hosts:
    """Four loopback sites (host:port each), recording every request server-side: when it
    arrived and how many were in flight to that site. Page /s/p1 of each site links to a page
    of the next site that only it links to (a hand-over between hosts)."""

    def __init__(self, pages: int = 4, slow_s: float = 0.0):
        self.pages, self.slow_s, self.jitter = pages, slow_s, 0.0
        self.log: dict[int, list[float]] = {}
        self.paths: dict[int, list[str]] = {}
        self.inflight: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.lock = __import__("threading").Lock()
        self.ports: list[int] = []

    def handler(self, site: int):
        hosts = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                import random
                import time

                with hosts.lock:
                    hosts.log.setdefault(site, []).append(time.monotonic())
                    hosts.paths.setdefault(site, []).append(self.path)
                    hosts.inflight[site] = hosts.inflight.get(site, 0) + 1
                    hosts.peak[site] = max(hosts.peak.get(site, 0), hosts.inflight[site])
                try:
                    time.sleep(hosts.slow_s + random.uniform(0, hosts.jitter))
                    if self.path == "/robots.txt":
                        self.send_response(404)
                        self.end_headers()
                        return
                    nxt = hosts.ports[(site + 1) % len(hosts.ports)]
                    links = "".join(f'<a href="/s/p{i}.html">p{i}</a>' for i in range(1, hosts.pages))
                    if self.path == "/s/p1.html":
                        links += f'<a href="http://127.0.0.1:{nxt}/s/extra.html">next</a>'
                    body = (f"<html><head><title>{site}{self.path}</title></head><body><p>Página {self.path} do "
                            f"sítio {site}, com texto suficiente para ser extraído.</p>{links}</body></html>").encode()
                    self.send_response(200)
                    self.send_header("content-type", "text/html; charset=utf-8")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with hosts.lock:
                        hosts.inflight[site] -= 1

        return Handler


def serve_hosts(hosts: Hosts, n: int = 4):
    import contextlib

    stack = contextlib.ExitStack()
    hosts.ports = [stack.enter_context(loopback_server(hosts.handler(i))) for i in range(n)]
    return stack


def rows_without_fetch_time(folder):
    return [{k: v for k, v in r.items() if k != "fetched_at"} for r in read_docs(folder).to_pylist()]


def test_many_hosts_are_crawled_at_once_each_politely_and_the_output_does_not_depend_on_timing(tmp_path):
    import time

    hosts = Hosts()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serve_hosts(hosts):
        seeds = [f"http://127.0.0.1:{p}/s/index.html" for p in hosts.ports]
        t0 = time.monotonic()
        first = c.build(cfg(seeds=seeds, delay_s=0.5, concurrency=4), tmp_path / "a")
        wall = time.monotonic() - t0
        # each site: robots.txt, index, p1..p3, extra = 6 requests, 5 delays of 0.5 s
        per_site = [len(hosts.log[i]) for i in range(4)]
        assert per_site == [6, 6, 6, 6], hosts.paths
        sequential = sum(0.5 * (n - 1) for n in per_site)  # 10 s one host after another
        # every site was being crawled while every other was: each one's first request came
        # before any one's last, and the whole took well under one host after another
        assert max(t[0] for t in hosts.log.values()) < min(t[-1] for t in hosts.log.values())
        assert wall < 0.75 * sequential, f"{wall:.1f} s: hosts were not crawled at once"
        for i, times in hosts.log.items():  # never closer than the delay to one host, one at a time
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert min(gaps) > 0.45, f"site {i}: requests {min(gaps):.2f} s apart"
            assert hosts.peak[i] == 1

        hosts.jitter = 0.05  # other timings, one host at a time: the same documents, order and shards
        second = c.build(cfg(seeds=seeds, delay_s=0, concurrency=3), tmp_path / "b")
    assert rows_without_fetch_time(tmp_path / "a") == rows_without_fetch_time(tmp_path / "b")
    assert first["content_digest"] == second["content_digest"] and first["documents"] == 20
    urls = [r["url"] for r in rows_without_fetch_time(tmp_path / "a")]
    assert urls[0] == seeds[0] and urls.index(f"{seeds[1].rsplit('/', 1)[0]}/extra.html") > urls.index(seeds[3])


def test_host_connections_bound_the_requests_in_flight_to_one_host(tmp_path):
    hosts = Hosts(pages=7, slow_s=0.15)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serve_hosts(hosts, 1):
        seed = f"http://127.0.0.1:{hosts.ports[0]}/s/index.html"
        c.build(cfg(seeds=[seed], host_connections=2), tmp_path / "a")
        assert hosts.peak[0] == 2  # two at once, never three
        hosts.slow_s, hosts.jitter = 0, 0.05
        c.build(cfg(seeds=[seed], host_connections=1), tmp_path / "b")
    assert rows_without_fetch_time(tmp_path / "a") == rows_without_fetch_time(tmp_path / "b")  # same order


def test_the_frontier_is_bounded_and_links_past_it_are_counted(tmp_path):
    hosts = Hosts(pages=400)
    with serve_hosts(hosts, 1):
        stats = c.build(cfg(seeds=[f"http://127.0.0.1:{hosts.ports[0]}/s/index.html"], max_frontier=20,
                            max_pages=1), tmp_path)
    counts = stats["counts"]  # the index links to 399 pages: 20 wait, the rest are counted, not queued
    assert stats["documents"] == 1 and counts["frontier_full"] == 399 - 20 and counts["left_in_queue"] == 20

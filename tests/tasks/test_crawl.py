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

"""The fetcher against a hostile server on 127.0.0.1: limits, bombs, drips, redirects, SSRF."""
import gzip
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest

from tasks.config import CrawlConfig
from tasks.web.fetch import CrawlError, Fetcher, Refused, public_address_check
from tests.fixtures.loopback import loopback_server

HITS: Counter = Counter()
ROBOTS = {"body": b"User-agent: *\nDisallow: /private/\nCrawl-delay: 2\n", "status": 200}


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, status, body=b"", ctype="text/html", headers=()):
        self.send_response(status)
        self.send_header("content-type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream_mb(self, mb, headers):
        self.send_response(200)
        self.send_header("content-type", "text/html")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        try:
            for _ in range(mb):
                self.wfile.write(b"a" * 2**20)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        HITS[self.path] += 1
        p = self.path
        if p == "/robots.txt":
            self.send(ROBOTS["status"], ROBOTS["body"], "text/plain")
        elif p == "/links.html":
            self.send(200, b'<html><body><p>links</p><a href="/ok.html">ok</a> <a href="/private/x.html">x</a></body></html>')
        elif p == "/ok.html" or p.startswith("/private/"):
            self.send(200, b"<html><body><p>ok</p></body></html>")
        elif p == "/flaky.html":
            if HITS[p] <= 2:
                self.send(500, b"")
            else:
                self.send(200, b"<p>finally</p>")
        elif p == "/busy.html":
            self.send(429, b"", headers=[("retry-after", "1")]) if HITS[p] == 1 else self.send(200, b"<p>ok</p>")
        elif p == "/missing.html":
            self.send(404, b"nope")
        elif p.startswith("/loop"):
            n = int(p[5:] or 0)
            self.send(302, headers=[("location", f"/loop{n + 1}")])
        elif p == "/to-private":
            self.send(302, headers=[("location", "http://10.0.0.1/admin")])
        elif p == "/to-metadata":
            self.send(302, headers=[("location", "http://169.254.169.254/latest/meta-data/")])
        elif p == "/huge.html":  # 50 MB, declared honestly
            self.stream_mb(50, [("content-length", str(50 * 2**20))])
        elif p == "/huge-chunked.html":  # 50 MB with no length announced
            self.stream_mb(50, [("connection", "close")])
        elif p == "/bomb.html":  # 10 KB of gzip that inflates to 1 GB
            self.send(200, BOMB, headers=[("content-encoding", "gzip")])
        elif p == "/drip.html":
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif p == "/doc.pdf":
            self.send(200, b"%PDF-1.4 " + b"x" * 1000, "application/pdf")
        else:
            self.send(404)


BOMB = gzip.compress(b"\0" * (2**30), compresslevel=9)


@pytest.fixture(scope="module")
def base():
    with loopback_server(Hostile) as port:
        yield f"http://127.0.0.1:{port}"


def fetcher(**kw):
    cfg = dict(seeds=["http://x/"], allow_loopback=True, delay_s=0, retries=2, backoff_s=0.01, timeout_s=5,
               max_body_bytes=2**20, deadline_s=2)
    return Fetcher(CrawlConfig(**(cfg | kw)))


def test_500_500_200_succeeds_and_429_honours_retry_after(base):
    f = fetcher()
    assert f.get(base + "/flaky.html").body == b"<p>finally</p>"
    t = time.monotonic()
    assert f.get(base + "/busy.html").status == 200
    assert time.monotonic() - t >= 0.9  # waited for Retry-After: 1


def test_other_4xx_is_not_retried(base):
    f = fetcher()
    before = HITS["/missing.html"]
    assert f.get(base + "/missing.html").status == 404
    assert HITS["/missing.html"] == before + 1


def test_redirect_loop_stops_after_five(base):
    with pytest.raises(Refused) as e:
        fetcher().get(base + "/loop")
    assert e.value.reason == "too_many_redirects"


@pytest.mark.parametrize("path", ["/to-private", "/to-metadata"])
def test_redirect_to_a_private_address_is_refused_after_the_redirect(base, path):
    with pytest.raises(Refused) as e:
        fetcher().get(base + path)
    assert e.value.reason == "non_public_address"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://2130706433/", "http://0x7f.0.0.1/", "http://0177.0.0.1/", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://10.1.2.3/", "http://192.168.0.1/", "http://169.254.169.254/",
    "http://[fe80::1]/", "http://0.0.0.0/", "http://localhost/", "file:///etc/passwd",
])
def test_ssrf_guard_refuses_non_public_addresses(url):
    with pytest.raises(Refused):
        public_address_check(url, allow_loopback=False)


def test_loopback_only_when_allowed():
    public_address_check("http://127.0.0.1:8000/", allow_loopback=True)
    with pytest.raises(Refused):
        public_address_check("http://10.0.0.1/", allow_loopback=True)


@pytest.mark.parametrize("path", ["/huge.html", "/huge-chunked.html"])
def test_body_over_the_limit_is_refused(base, path):
    with pytest.raises(Refused) as e:
        fetcher().get(base + path)
    assert e.value.reason == "body_too_large"


def test_gzip_bomb_is_stopped_by_decompressed_size(base):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Refused) as e:
        fetcher().get(base + "/bomb.html")
    assert e.value.reason == "body_too_large"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # inflating it would take 1 GB


def test_slow_drip_hits_the_deadline(base):
    t = time.monotonic()
    with pytest.raises(Refused) as e:
        fetcher(deadline_s=1).get(base + "/drip.html")
    assert e.value.reason == "deadline" and time.monotonic() - t < 5


def test_pdf_is_refused_from_its_headers(base):
    with pytest.raises(Refused) as e:
        fetcher().get(base + "/doc.pdf")
    assert e.value.reason == "content_type"


def test_robots_rules_and_crawl_delay(base):
    f = fetcher()
    assert f.allowed(base + "/ok.html") and not f.allowed(base + "/private/x.html")
    assert f.delay_for(base + "/ok.html") == 2  # the larger of Crawl-delay and crawl.delay_s


def test_a_crawl_never_requests_what_robots_disallows(base, tmp_path):
    from collections import Counter as C

    from tasks.crawl import DocumentSink, crawl_site

    ROBOTS.update(body=b"User-agent: *\nDisallow: /private/\n")
    try:
        sink = DocumentSink(tmp_path, 100)
        counts = C()
        crawl_site(fetcher().cfg, [base + "/links.html"], counts, sink)
        sink.close()
    finally:
        ROBOTS.update(body=b"User-agent: *\nDisallow: /private/\nCrawl-delay: 2\n")
    assert HITS["/private/x.html"] == 0 and HITS["/ok.html"] >= 1
    assert counts["skipped_robots"] == 1 and counts["fetched"] == 2


def test_robots_is_cached_at_most_a_day(base):
    f = fetcher()
    before = HITS["/robots.txt"]
    f.allowed(base + "/ok.html")
    f.allowed(base + "/ok.html")
    assert HITS["/robots.txt"] == before + 1  # cached
    origin = next(iter(f.robots))
    fetched_at, rp = f.robots[origin]
    f.robots[origin] = (fetched_at - 24 * 3600 - 1, rp)  # a day later
    f.allowed(base + "/ok.html")
    assert HITS["/robots.txt"] == before + 2


def test_robots_5xx_skips_the_host_and_404_allows_all(base):
    try:
        ROBOTS.update(status=503)
        f = fetcher(retries=1)
        assert not f.allowed(base + "/ok.html") and f.why_host_skipped(base + "/ok.html")
        ROBOTS.update(status=404)
        assert fetcher().allowed(base + "/private/x.html")
    finally:
        ROBOTS.update(status=200)


def test_unreachable_host_fails_after_retries_naming_the_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CrawlError, match=f"127.0.0.1:{port}/x.html after 3 attempts"):
        fetcher().get(f"http://127.0.0.1:{port}/x.html")

"""robots.txt per RFC 9309 against a real server on 127.0.0.1: longest match, wildcards, ties,
redirects into disallowed paths, decimal and huge Crawl-delay."""
import logging
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest

from tasks.config import CrawlConfig
from tasks.web.fetch import MAX_CRAWL_DELAY_S, Fetcher, Refused
from tests.fixtures.loopback import loopback_server

pytestmark = pytest.mark.fault
HITS: Counter = Counter()
RULES = """User-agent: *
Disallow: /shop/
Allow: /shop/public/
Disallow: /*.pdf$
Disallow: /tmp*/secret
Disallow: /tie
Allow: /tie
Disallow: /blocked/

User-agent: otherbot
Disallow: /
"""
ROBOTS = {"body": RULES}


class Site(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        HITS[self.path] += 1
        if self.path == "/robots.txt":
            self.reply(200, ROBOTS["body"].encode(), "text/plain")
        elif self.path.startswith("/go-"):  # /go-blocked -> /blocked/page.html, /go-ok -> /ok.html
            target = "/blocked/page.html" if self.path == "/go-blocked" else "/ok.html"
            self.send_response(302)
            self.send_header("location", target)
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            self.reply(200, b"<html><body><p>page</p></body></html>", "text/html")

    def reply(self, status, body, ctype):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def base():
    with loopback_server(Site) as port:
        yield f"http://127.0.0.1:{port}"


def fetcher():
    return Fetcher(CrawlConfig(seeds=["http://x/"], allow_loopback=True, delay_s=0, retries=0, timeout_s=5))


@pytest.mark.parametrize("path,allowed", [
    ("/shop/public/item.html", True),   # longest match: Allow /shop/public/ beats Disallow /shop/
    ("/shop/cart.html", False),
    ("/manual.pdf", False),             # * and $: ends in .pdf
    ("/manual.pdf?page=2", True),       # $ anchors the end: this does not end in .pdf
    ("/tmp42/secret", False),           # * in the middle
    ("/tmp42/public", True),
    ("/tie", True),                     # Allow and Disallow of equal length: allow wins
    ("/index.html", True),
])
def test_longest_match_wildcards_and_ties(base, path, allowed):
    assert fetcher().allowed(base + path) is allowed


def test_a_redirect_into_a_disallowed_path_is_not_followed(base):
    f = fetcher()
    assert f.allowed(base + "/go-blocked")  # the first hop itself is allowed
    with pytest.raises(Refused) as e:
        f.get(base + "/go-blocked")
    assert e.value.reason == "robots_redirect" and "/blocked/page.html" in str(e.value)
    assert HITS["/blocked/page.html"] == 0
    assert f.get(base + "/go-ok").url == base + "/ok.html"  # an allowed redirect is followed


@pytest.fixture
def robots_body():
    """Serve another robots.txt for one test."""
    yield lambda body: ROBOTS.update(body=body)
    ROBOTS["body"] = RULES


def test_decimal_crawl_delay_is_honoured(base, robots_body):
    robots_body("User-agent: forja\nCrawl-delay: 2.5\n\nUser-agent: *\nCrawl-delay: 9\n")
    f = fetcher()
    f.allowed(base + "/index.html")
    assert f.delay_for(base + "/index.html") == 2.5  # the pause the fetcher waits between two requests


def test_a_huge_crawl_delay_is_capped_and_logged(base, robots_body, caplog):
    robots_body("User-agent: *\nCrawl-delay: 100000\n")
    f = fetcher()
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        f.allowed(base + "/index.html")
    assert f.delay_for(base + "/index.html") == MAX_CRAWL_DELAY_S == 60
    host = base.removeprefix("http://")
    assert any(host in r.getMessage() and "100000" in r.getMessage() for r in caplog.records)

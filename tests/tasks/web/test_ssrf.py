"""The SSRF guard against a hostile resolver: rebinding, odd IPv6 spellings, a stalled lookup.

The fault is injected where it happens in production: socket.getaddrinfo answers what an
attacker's (or a broken) DNS server would. Every other host passes through untouched.
"""
import errno
import ipaddress
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.config import CrawlConfig
from tasks.crawl import DocumentSink, crawl_site
from tasks.web.fetch import CrawlError, Fetcher, Refused, public_address_check
from tests.fixtures.loopback import loopback_server

pytestmark = pytest.mark.fault
PUBLIC = "93.184.215.14"  # a public address; the test's firewall keeps any connection to it on this machine


class Hits(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def do_GET(self):
        Hits.hits[self.path] += 1
        body = b"User-agent: *\nAllow: /\n" if self.path == "/robots.txt" else b"<p>internal secret</p>"
        self.send_response(200)
        self.send_header("content-type", "text/plain" if self.path == "/robots.txt" else "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def internal():
    """A real 'internal' HTTP server on loopback that the attacker wants the crawler to reach."""
    Hits.hits.clear()
    with loopback_server(Hits) as port:
        yield port


def fake_dns(monkeypatch, host: str, answer):
    """Make getaddrinfo(host) call answer(n) (n = how many times host was asked before)."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(name, port, *a, **kw):
        if name != host:
            return real(name, port, *a, **kw)
        asked.append(name)
        return answer(len(asked) - 1, port)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def firewall(monkeypatch):
    """Keep the test on this machine: a connection to any non-loopback address is recorded and
    fails as an unreachable network would (names still go through getaddrinfo, as in production)."""
    real, attempts = socket.create_connection, []

    def create_connection(address, *a, **kw):
        try:
            outside = not ipaddress.ip_address(address[0]).is_loopback
        except ValueError:  # a name: resolved by the real function through getaddrinfo
            outside = False
        if outside:
            attempts.append(address[0])
            raise OSError(errno.ENETUNREACH, "unreachable (test firewall)")
        return real(address, *a, **kw)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def infos(port, *addresses):
    return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
             (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]


def fetcher(**kw):
    cfg = dict(seeds=["http://x/"], delay_s=0, retries=0, backoff_s=0.01, timeout_s=0.5, deadline_s=2)
    return Fetcher(CrawlConfig(**(cfg | kw)))


def test_a_rebinding_resolver_never_reaches_the_internal_server(monkeypatch, internal):
    # First answer public (passes the check), every later one 127.0.0.1: a guard that resolves
    # again to connect is led to the internal server.
    asked = fake_dns(monkeypatch, "rebind.test", lambda n, port: infos(port, PUBLIC if n == 0 else "127.0.0.1"))
    outside = firewall(monkeypatch)
    f = fetcher()
    try:
        with pytest.raises(CrawlError):
            f.get(f"http://rebind.test:{internal}/secret.html")
    finally:
        f.close()
    assert Hits.hits["/secret.html"] == 0 and sum(Hits.hits.values()) == 0
    assert len(asked) == 1 and outside == [PUBLIC]  # resolved once, connected to the address checked


@pytest.mark.parametrize("address", [
    "64:ff9b::7f00:1",       # NAT64 of 127.0.0.1
    "64:ff9b::a00:1",        # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",    # NAT64 of 169.254.169.254 (cloud metadata)
    "64:ff9b:1::a00:1",      # local-use NAT64 prefix (RFC 8215)
    "2002:7f00:1::1",        # 6to4 of 127.0.0.1
    "2002:c0a8:1::1",        # 6to4 of 192.168.0.1
    "::7f00:1",              # IPv4-compatible 127.0.0.1
    "::a00:1",               # IPv4-compatible 10.0.0.1
    "::ffff:a00:1",          # IPv4-mapped 10.0.0.1
    "::ffff:0:a00:1",        # IPv4-translated (SIIT) 10.0.0.1
    "fec0::1",               # deprecated site-local
    "ff02::1",               # multicast
])
def test_odd_ipv6_spellings_of_private_addresses_are_refused(address):
    with pytest.raises(Refused) as e:
        public_address_check(f"http://[{address}]/", allow_loopback=True)
    assert e.value.reason == "non_public_address"


@pytest.mark.parametrize("address", [
    "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "64:ff9b::808:808", "2002:808:808::1",
    "::ffff:8.8.8.8", "8.8.8.8",
])
def test_ordinary_public_addresses_are_allowed(address):
    public_address_check(f"http://[{address}]/" if ":" in address else f"http://{address}/", allow_loopback=False)


def test_every_resolved_address_is_checked(monkeypatch):
    fake_dns(monkeypatch, "mixed.test", lambda n, port: infos(port, PUBLIC, "64:ff9b::a00:1"))
    with pytest.raises(Refused, match="mixed.test"):
        public_address_check("http://mixed.test/", allow_loopback=False)


def test_a_stalled_dns_lookup_gives_up_within_the_timeout(monkeypatch, tmp_path):
    def stall(n, port):
        time.sleep(3)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    fake_dns(monkeypatch, "stall.test", stall)
    f = fetcher(timeout_s=0.3)
    t = time.monotonic()
    with pytest.raises(Refused) as e:
        f.get("http://stall.test/a.html")
    assert time.monotonic() - t < 1.5
    assert e.value.reason == "dns_timeout" and "stall.test" in str(e.value) and "0.3 s" in str(e.value)

    counts, sink = Counter(), DocumentSink(tmp_path, 10)  # in a crawl: counted, the crawl goes on
    t = time.monotonic()
    crawl_site(f.cfg, ["http://stall.test/a.html", "http://stall.test/b.html"], counts, sink)
    sink.close()
    assert time.monotonic() - t < 1.5  # the host is not asked again after it stalled once
    assert counts["refused_dns_timeout"] == 2


def test_a_pinned_connection_keeps_the_host_name_for_host_header_sni_and_certificate(monkeypatch, tmp_path):
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-subj", "/CN=pinned.test", "-addext", "subjectAltName=DNS:pinned.test", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    seen = {}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, _: seen.update(sni=name)  # None: go on

    class Tls(Hits):
        def do_GET(self):
            seen["host"] = self.headers["host"]
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Tls)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    asked = fake_dns(monkeypatch, "pinned.test", lambda n, p: infos(p, "127.0.0.1"))
    fake_dns(monkeypatch, "other.test", lambda n, p: infos(p, "127.0.0.1"))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test's own certificate
    f = fetcher(allow_loopback=True)
    try:
        assert f.get(f"https://pinned.test:{port}/page.html").status == 200
        assert seen == {"sni": "pinned.test", "host": f"pinned.test:{port}"}
        with pytest.raises(CrawlError, match="other.test"):  # the certificate is checked against the name
            f.get(f"https://other.test:{port}/page.html")
    finally:
        f.close()
        server.shutdown()
        server.server_close()
    assert len(asked) == 1  # one lookup, then the pinned address

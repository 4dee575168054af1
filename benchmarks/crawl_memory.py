"""Peak memory of a crawl against servers that send the worst they can, many at once.

    .venv/bin/python benchmarks/crawl_memory.py [--hosts 4]

Serves on 127.0.0.1, once per host (a port each), an index linking to: 4 HTML pages of
~1.9 MB (just under the parser's limit), 2 of 4 MB (set aside), 3 pages of 60 MB (over the
20 MB body limit), a gzip bomb (1 GB inflated), and 200 ordinary pages; crawls all hosts at
once (crawl.concurrency = hosts, host_connections 2) with the default limits in a fresh
process, plus a WARC file holding a 150 MB decompression bomb record, and prints the peak
RSS. The last line is one JSON object. CONNS=1 sets host_connections; WARC=0 leaves the WARC out.

Memory grows with the work in flight, not the corpus: up to concurrency x host_connections
bodies of up to crawl.max_body_bytes are being received at once (pages are parsed one at a
time). Measured here: 1 host, 1 connection ~340 MB; 4 hosts x 2 connections ~710-840 MB.
"""
from __future__ import annotations

import zlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BOMB = b""  # built in main(): the crawling child process must not hold it
PARA = "<p>" + "Texto de exemplo em português com várias palavras diferentes. " * 20 + "</p>\n"


class Worst(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def head(self, n: int | None, extra=()):
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("content-length", str(n)) if n is not None else self.send_header("connection", "close")
        self.end_headers()

    def do_GET(self):
        p = self.path
        try:
            if p == "/robots.txt":
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
            elif p == "/index.html":
                links = [f"/big{i}.html" for i in range(4)] + [f"/over{i}.html" for i in range(2)] + [f"/huge{i}.html" for i in range(3)] + ["/bomb.html"]
                links += [f"/page{i}.html" for i in range(200)]
                body = ("<html><body>" + "".join(f'<a href="{u}">{u}</a>' for u in links) + "</body></html>").encode()
                self.head(len(body))
                self.wfile.write(body)
            elif p.startswith(("/big", "/over")):
                size = 1_900_000 if p.startswith("/big") else 4_000_000
                body = ("<html><body>" + PARA * (size // len(PARA)) + "</body></html>").encode()
                self.head(len(body))
                self.wfile.write(body)
            elif p.startswith("/huge"):
                self.head(None)
                for _ in range(60):
                    self.wfile.write(b"a" * 2**20)
            elif p == "/bomb.html":
                self.head(len(BOMB), [("content-encoding", "gzip")])
                self.wfile.write(BOMB)
            else:
                body = ("<html><body>" + PARA * 5 + f"<p>{p}</p></body></html>").encode()
                self.head(len(body))
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def warc_bomb(path: Path) -> None:
    """A WARC whose second record's HTTP body (gzip) inflates to 150 MB; a few KB on disk."""
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(z.compress(b"\0" * 2**24) for _ in range(9)) + z.flush()
    buf = BytesIO()
    w = WARCWriter(buf, gzip=True)
    for url, body, extra in (("http://a.example/1.html", b"<html><body><p>" + PARA.encode() + b"</p></body></html>", []),
                             ("http://a.example/bomb.html", bomb, [("Content-Encoding", "gzip")])):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), *extra], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(url, "response", payload=BytesIO(body), http_headers=http))
    path.write_bytes(buf.getvalue())


def child(bases: list[str], out: str) -> None:
    from tasks.config import CrawlConfig
    from tasks.crawl import build

    warc = Path(out) / "bomb.warc.gz"
    warc_bomb(warc)
    docs = Path(out) / "docs"
    docs.mkdir()
    stats = build(CrawlConfig(seeds=[b + "/index.html" for b in bases], warc=[str(warc)] if os.environ.get("WARC", "1") == "1" else [], allow_loopback=True,
                              delay_s=0, max_pages=300 * len(bases), path_prefixes=["/"], concurrency=len(bases),
                              host_connections=int(os.environ.get("CONNS", "2"))), docs)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "hosts": len(bases),
                      "documents": stats["documents"], **stats["counts"]}))


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(sys.argv[3:], sys.argv[2])
        return
    hosts = int(sys.argv[sys.argv.index("--hosts") + 1]) if "--hosts" in sys.argv else 4
    global BOMB
    zero = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing; 1 GB of zeros compressed piecewise
    BOMB = b"".join(zero.compress(b"\0" * 2**24) for _ in range(64)) + zero.flush()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Worst) for _ in range(hosts)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as out:
        bases = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
        r = subprocess.run([sys.executable, __file__, "--child", out, *bases], capture_output=True, text=True,
                           check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"crawl of {hosts} hosts at once, peak RSS {result['peak_rss_mb']:.0f} MB (target < 300 MB); outcomes: "
          + ", ".join(f"{k}={v}" for k, v in result.items() if k != "peak_rss_mb"))
    print(json.dumps(result))
    for server in servers:
        server.shutdown()


if __name__ == "__main__":
    main()

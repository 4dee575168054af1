"""Hostile local inputs (WARC, folders, JSONL): every record is read up to a cap, never whole.

Each test plants one oversized input between good ones and checks that it is skipped with a
counted, logged reason naming the file and where in it, that the rest is still read, and that
the reader's memory peak stays far below the oversized input's size.
"""
import gzip
import json
import logging
import os
import struct
import tracemalloc
import zlib
from collections import Counter
from io import BytesIO

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks import crawl as c
from tasks.ingest import sources
from tasks.config import CrawlConfig
from tests.tasks.ingest.test_sources import write_warc

pytestmark = pytest.mark.fault
CAP = CrawlConfig.model_fields["max_body_bytes"].default  # the crawl's cap on one fetched body
BOMB = 100 * 2**20  # what the hostile record expands to: five times the cap


def zeros_gzip(n: int, prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """One gzip member of prefix, n zero bytes (a whole number of MiB) and suffix: about n/1000 bytes.

    Each MiB of zeros is deflated once after a full flush (no back-references), so the same
    compressed block can be repeated: building a 100 MiB bomb costs no 100 MiB of deflating."""
    block = bytes(1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = z.compress(prefix) + z.flush(zlib.Z_FULL_FLUSH)
    one = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    body = head + one * (n >> 20) + z.compress(suffix) + z.flush()
    crc = zlib.crc32(prefix)
    for _ in range(n >> 20):
        crc = zlib.crc32(block, crc)
    size = len(prefix) + n + len(suffix)
    return b"\x1f\x8b\x08\0\0\0\0\0\0\xff" + body + struct.pack("<II", zlib.crc32(suffix, crc), size & 0xFFFFFFFF)


def response(w: WARCWriter, url: str, body: bytes, extra=()):
    http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), *extra], protocol="HTTP/1.1")
    w.write_record(w.create_warc_record(url, "response", payload=BytesIO(body), http_headers=http))


def html(text: str) -> bytes:
    return f"<html><body><p>{text}</p></body></html>".encode()


def peak_while(fn):
    """fn()'s result and the most memory Python allocated while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_warc_bombs_are_stopped_at_the_cap_and_the_rest_is_read(tmp_path, caplog):
    bomb = zeros_gzip(BOMB)
    buf = BytesIO()
    w = WARCWriter(buf, gzip=True)
    response(w, "http://a.example/1.html", html("Primeiro documento."))
    # a gzip member whose record declares (and holds) 100 MB: small on disk
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
    head = (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:0bomb>\r\n"
            b"WARC-Target-URI: http://a.example/bomb.html\r\nContent-Type: application/http; msgtype=response\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(http) + BOMB))
    buf.write(zeros_gzip(BOMB, head + http, b"\r\n\r\n"))
    # an HTTP body sent with Content-Encoding: gzip that decodes to 100 MB
    response(w, "http://a.example/encoded.html", bomb, [("Content-Encoding", "gzip")])
    response(w, "http://a.example/2.html", html("Segundo documento."))
    path = tmp_path / "bomb.warc.gz"
    path.write_bytes(buf.getvalue())
    assert path.stat().st_size < 2 * 2**20

    counts = Counter()
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        rows, peak = peak_while(lambda: list(sources.read_warc(path, counts)))
    assert [r["url"] for r in rows] == ["http://a.example/1.html", "http://a.example/2.html"]
    assert counts["warc_too_large"] == 2 and counts["warc_corrupt"] == 0
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB held while reading a {BOMB >> 20} MiB bomb"
    warned = [r.getMessage() for r in caplog.records if "too large" in r.getMessage()]
    assert len(warned) == 2 and all(str(path) in m and "byte" in m for m in warned)


def test_a_warc_gzipped_as_one_whole_file_is_read_completely(tmp_path):
    plain = write_warc(tmp_path / "plain.warc", gzip=False).read_bytes()
    whole = tmp_path / "whole.warc.gz"
    whole.write_bytes(gzip.compress(plain))  # what `gzip x.warc` makes: one member, five records
    counts = Counter()
    rows = list(sources.read_warc(whole, counts))
    assert [r["url"] for r in rows] == ["http://a.example/1.html", "http://a.example/2.html"]
    assert counts["warc_revisit"] == 1 and counts["warc_not_html"] == 1 and counts["warc_request"] == 1
    assert rows[1]["body"] == html("Segundo documento.")

    out = tmp_path / "out"
    out.mkdir()
    stats = c.build(CrawlConfig(warc=[str(whole)]), out)  # and through the crawl, into its stats
    assert stats["documents"] == 2 and stats["counts"]["warc_documents"] == 2


def test_a_large_record_is_passed_over_and_the_records_after_it_read(tmp_path):
    """Past the cap but no bomb (incompressible): skipped by its length, or inflated and dropped."""
    buf = BytesIO()
    w = WARCWriter(buf, gzip=False)
    response(w, "http://a.example/1.html", html("Primeiro."))
    response(w, "http://a.example/big.html", b"WARC/1.0\r\n" + os.urandom(8000))  # a record's start inside
    response(w, "http://a.example/2.html", html("Segundo."))
    plain = tmp_path / "big.warc"
    plain.write_bytes(buf.getvalue())
    whole = tmp_path / "big.warc.gz"
    whole.write_bytes(gzip.compress(buf.getvalue()))
    for path in (plain, whole):
        counts = Counter()
        rows = list(sources.read_warc(path, counts, max_bytes=4096))
        assert [r["url"] for r in rows] == ["http://a.example/1.html", "http://a.example/2.html"]
        assert counts == {"warc_too_large": 1}


def test_a_truncated_whole_file_gzip_warc_counts_and_names_what_was_not_read(tmp_path, caplog):
    plain = write_warc(tmp_path / "plain.warc", gzip=False).read_bytes()
    packed = gzip.compress(plain)
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(packed[: len(packed) - 60])  # the last record's tail is gone
    counts = Counter()
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        rows = list(sources.read_warc(cut, counts))
    assert [r["url"] for r in rows] == ["http://a.example/1.html"]
    assert counts["warc_corrupt"] == 1
    assert any(str(cut) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_100_mb_jsonl_line_is_skipped_without_reading_it_whole(tmp_path, caplog):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"id": "a", "text": "Primeira linha."}).encode() + b"\n")
        f.write(b'{"id": "huge", "text": "')
        chunk = b"x" * (1 << 20)
        for _ in range(100):
            f.write(chunk)
        f.write(b'"}\n')
        f.write(json.dumps({"id": "b", "text": "Terceira linha."}).encode() + b"\n")
    counts = Counter()
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        rows, peak = peak_while(lambda: list(sources.read_jsonl(path, "text", "id", counts)))
    assert [r["text"] for r in rows] == ["Primeira linha.", "Terceira linha."]
    assert counts["jsonl_too_large"] == 1 and counts["jsonl_bad_line"] == 0
    assert peak < CAP + 8 * 2**20, f"{peak / 2**20:.0f} MiB held while skipping a 100 MiB line"
    assert any(str(path) in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)


def test_an_oversized_folder_file_is_skipped_without_reading_it(tmp_path, caplog):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Texto pequeno.", encoding="utf-8")
    with open(docs / "b.html", "wb") as f:  # sparse: 64 MiB that cost no disk
        f.truncate(64 * 2**20)
    (docs / "c.md").write_text("# Nota\nOutro texto.", encoding="utf-8")
    counts = Counter()
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        rows, peak = peak_while(lambda: list(sources.read_folder(docs, counts)))
    assert [r["url"].rsplit("/", 1)[1] for r in rows] == ["a.txt", "c.md"]
    assert counts["folder_too_large"] == 1
    assert peak < CAP + 8 * 2**20
    assert any(str(docs / "b.html") in r.getMessage() for r in caplog.records)

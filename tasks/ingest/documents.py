"""Documents: the crawl's row schema, raw page -> document (encoding, extraction), and the sink
that writes them to Parquet shards.

Shared by the web walk (tasks/web/walk.py), the file units (tasks/ingest/units.py) and the
crawl stage door (tasks/crawl.py), so that every source makes the same rows.
"""
from __future__ import annotations

import codecs
import contextlib
import email.message
import hashlib
import json
import logging
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import lxml.html
import pyarrow as pa
import pyarrow.parquet as pq
import trafilatura

from tasks import stage
from tasks.config import CrawlConfig
from tasks.ingest import sources
from tasks.web import fetch

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


def doc_bytes(doc: dict) -> bytes:
    """What the content digest follows: everything but fetched_at (the same content fetched
    again gives the same digest)."""
    return json.dumps({k: v for k, v in doc.items() if k != "fetched_at"}, sort_keys=True).encode()


def combine_digests(digests: list[str]) -> str:
    """The crawl's content_digest: one digest over its shards' digests, in shard order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


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


class DocumentSink:
    """Writes documents to Parquet shards in batches as they come, so memory stays flat; a new
    shard starts every shard_docs documents. The same id appended twice is kept once (the first).

    Each shard is written under a `.part-*` name and renamed when complete (stage.partial's
    rule), so no reader ever sees half a shard. `files` lists the finished shards with their
    row counts and digests; shard names are prefix-NNNNN.parquet from `first`."""

    def __init__(self, folder: Path, shard_docs: int, batch: int = 256, prefix: str = "documents", first: int = 0):
        self.folder, self.shard_docs, self.prefix = Path(folder), shard_docs, prefix
        self.writer: pq.ParquetWriter | None = None
        self.rows: list[dict] = []
        self.ids: set[str] = set()  # ids of this sink's documents: bounded by what one sink writes
        self.batch, self.count, self.chars, self.in_shard, self.shard = batch, 0, 0, 0, first
        self.files: list[dict] = []
        self._digest = hashlib.sha256()
        self._shard_digest = hashlib.sha256()
        self._tmp: Path | None = None

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
        blob = doc_bytes(doc)
        self._digest.update(blob)
        self._shard_digest.update(blob)
        if len(self.rows) >= self.batch or self.in_shard >= self.shard_docs:
            self.flush()
        if self.in_shard >= self.shard_docs:
            self._roll()
        return True

    @property
    def digest(self) -> str:
        """A digest of the documents appended so far, in order, without their fetch times."""
        return self._digest.hexdigest()[:16]

    def flush(self) -> None:
        if self.rows:
            if self.writer is None:
                self._tmp = self.folder / f"{stage.PART}{uuid.uuid4().hex[:8]}-{self.prefix}"
                self.writer = pq.ParquetWriter(self._tmp, DOC_SCHEMA, compression="zstd")
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=DOC_SCHEMA))
            self.rows = []

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            name = stage.shard_name(self.prefix, self.shard)
            os.replace(self._tmp, self.folder / name)
            self.files.append({"name": name, "rows": self.in_shard, "digest": self._shard_digest.hexdigest()[:16]})
        self._shard_digest = hashlib.sha256()
        self.shard, self.in_shard = self.shard + 1, 0

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self._roll()

    def abort(self) -> None:
        """Drop the shard being written (an error stopped the writing)."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)

"""Document sources other than live HTTP: WARC files, local folders and JSONL files.

Each reader yields document rows (the crawl schema) and counts what it skipped, by
reason, in the Counter it is given. A bad record is counted and skipped; it never
stops the rest of the file.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tasks.fetch import HTML_TYPES, media_type

log = logging.getLogger("forja.crawl")
FOLDER_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain", ".md": "text/markdown"}
_WARC_MAGIC = (b"WARC/1.", b"\x1f\x8b\x08")  # an uncompressed record, or a gzip member


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_warc(path: Path, counts: Counter) -> Iterator[dict]:
    """Response records of a WARC as raw pages: url, status, content_type, body, fetched_at.

    Revisit and non-response records are skipped and counted; so are non-HTML responses.
    Records are read one at a time from the places a record can start (a "WARC/1." line
    or a gzip member), so a corrupt record is counted and reading goes on after it.
    """
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        starts = _record_starts(f)
        i, resume = 0, 0
        while i < len(starts):
            off = starts[i]
            i += 1
            if off < resume:
                continue  # inside the previous good record
            f.seek(off)
            it = ArchiveIterator(f)
            try:
                record = next(it)
                ok = record.rec_type is not None and record.rec_headers.get_header("WARC-Record-ID") is not None
                row = _warc_row(record, counts) if ok else None
                it.read_to_end(record)
                length = it.get_record_length()
            except Exception as e:  # warcio raises several types on damaged input
                ok, row = False, None
                log.warning("crawl: unreadable WARC record in %s at byte %d (%s)", path, off, str(e)[:80])
            if not ok:
                counts["warc_corrupt"] += 1
                continue
            resume = off + length
            if row is not None:
                yield row


def _record_starts(f) -> list[int]:
    """Offsets where a WARC record may start: every "WARC/1." or gzip member header."""
    starts, pos, tail = [], 0, b""
    f.seek(0)
    while block := f.read(1 << 22):
        data = tail + block
        base = pos - len(tail)
        for magic in _WARC_MAGIC:
            j = data.find(magic)
            while j >= 0:
                starts.append(base + j)  # the 8-byte overlap may find one twice: set() below
                j = data.find(magic, j + 1)
        tail = data[-8:]
        pos += len(block)
    return sorted(set(starts))


def _warc_row(record, counts: Counter) -> dict | None:
    kind = record.rec_type
    if kind == "revisit":
        counts["warc_revisit"] += 1
        return None
    if kind != "response":
        counts[f"warc_{kind}"] += 1
        return None
    http = record.http_headers
    ctype = http.get_header("Content-Type", "") if http else ""
    if media_type(ctype) not in HTML_TYPES + ("text/plain",):
        counts["warc_not_html"] += 1
        return None
    return {
        "url": record.rec_headers.get_header("WARC-Target-URI"),
        "status": int(http.get_statuscode() or 0) if http else 0,
        "content_type": ctype,
        "body": record.content_stream().read(),
        "fetched_at": record.rec_headers.get_header("WARC-Date") or now(),
    }


def read_folder(folder: Path, counts: Counter) -> Iterator[dict]:
    """Files under folder with a known suffix, as raw pages with their path as url."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"crawl.folders: {root} is not a folder")
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        ctype = FOLDER_SUFFIXES.get(p.suffix.lower())
        if ctype is None:
            counts["folder_unsupported_type"] += 1
            continue
        yield {"url": p.resolve().as_uri(), "status": 200, "content_type": ctype, "body": p.read_bytes(),
               "fetched_at": datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")}


def read_jsonl(path: Path, text_field: str, id_field: str | None, counts: Counter) -> Iterator[dict]:
    """One text document per JSON line; malformed lines or records without text are counted."""
    p = Path(path)
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                text = rec[text_field]
            except (ValueError, KeyError, TypeError):
                counts["jsonl_bad_line"] += 1
                log.warning("crawl: %s line %d is not a JSON object with a %r field", p, n, text_field)
                continue
            if not isinstance(text, str):
                counts["jsonl_bad_line"] += 1
                continue
            name = rec.get(id_field) if id_field else None
            yield {"url": f"{p.resolve().as_uri()}#{name if name is not None else n}", "status": 200,
                   "content_type": "text/plain", "text": text, "fetched_at": now()}

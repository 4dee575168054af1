"""Document sources other than live HTTP: WARC files, local folders and JSONL files.

Each reader yields document rows (the crawl schema) and counts what it skipped, by
reason, in the Counter it is given. A bad record is counted and skipped; it never
stops the rest of the file.

Local input is bounded like a fetched body: no WARC record, folder file or JSONL line is
read past max_bytes (default: crawl.max_body_bytes's default, MAX_BYTES). An oversized one
is skipped, counted (`*_too_large`) and logged with its file and byte offset or line, and
is never held whole: files are read in bounded pieces and gzip is inflated a piece at a
time, so a small "gzip bomb" is stopped at the cap. A WARC gzipped as one whole file (what
`gzip x.warc` makes) is read to its end like one gzipped record by record.
"""
from __future__ import annotations

import json
import logging
import math
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tasks.config import CrawlConfig
from tasks.web.fetch import HTML_TYPES, BoundedDecoder, media_type

log = logging.getLogger("forja.crawl")
FOLDER_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain", ".md": "text/markdown"}
_GZIP = b"\x1f\x8b\x08"
_WARC_MAGIC = (b"WARC/1.", _GZIP)  # an uncompressed record, or a gzip member
MAX_BYTES = CrawlConfig.model_fields["max_body_bytes"].default  # the crawl's cap on one body (20 MiB)
HEADROOM = 1 << 20  # WARC and HTTP headers, and warcio's read-ahead, on top of a record's cap
PIECE = 1 << 20  # the most read (or inflated) at once
BOMB_RATIO = 200  # skipping a record in a gzip member: text inflates ~10 to 1, a bomb ~1000 to 1


class TooLarge(Exception):
    """A record, file or line past the cap (or a header that never ends)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_warc(path: Path, counts: Counter, max_bytes: int = MAX_BYTES) -> Iterator[dict]:
    """Response records of a WARC as raw pages: url, status, content_type, body, fetched_at.

    Revisit and non-response records are skipped and counted; so are non-HTML responses.
    Reading starts at the places a record can start (a "WARC/1." line or a gzip member) and
    goes on record by record from there, through a gzip member holding many records too; a
    corrupt record is counted and reading goes on at the next place after it. Records past
    max_bytes are skipped (warc_too_large)."""
    path = Path(path)
    with open(path, "rb") as f:
        resume = 0
        for off in _record_starts(f):
            if off >= resume:  # not inside a record already read
                resume = yield from _records_from(f, off, path, counts, max_bytes)


def _records_from(f, off: int, path: Path, counts: Counter, max_bytes: int):
    """Yield the rows of the records starting at byte off; return where the next read may start.

    A gzip member there is read to its end (one record, or a whole gzipped WARC); plain
    records are read on to the end of the file or to the first bad one. A record past the
    cap is skipped: in plain bytes by its length, in a gzip member by inflating it without
    keeping it, unless it inflates like a bomb (then the rest of that member is not read)."""
    from warcio.archiveiterator import ArchiveIterator

    src = Unpacked(f, off)
    it = ArchiveIterator(src)
    n, at = 0, 0  # records read here; plain offset of the record being read

    def where() -> str:
        if not src.gzip:
            return f"{path} at byte {off + at}"
        return f"{path}, gzip member at byte {off}" + (f", record {n + 1} in it" if n else "")

    while True:
        src.allow(max_bytes + HEADROOM)
        record, row = None, None
        try:
            record = next(it, None)
            if record is None:
                return (src.member_end or off + 1) if src.gzip else off + at + 1
            if record.rec_type is None or record.rec_headers.get_header("WARC-Record-ID") is None \
                    or record.length is None:
                raise ValueError("no WARC-Type, WARC-Record-ID or Content-Length")
            if record.length > max_bytes:
                raise TooLarge(f"declares {record.length} bytes")
            try:
                row = _warc_row(record, counts, max_bytes)
            except TooLarge as e:  # its HTTP body decodes past the cap; its own bytes are within it
                _too_large(counts, where(), e, max_bytes, "")
            it.read_to_end(record)
        except TooLarge as e:
            past = src.gzip and record is not None and _skip(it, record, src)
            _too_large(counts, where(), e, max_bytes,
                       "; the rest of its gzip member is not read" if src.gzip and not past else "")
            if not past:
                if src.gzip or record is None or not hasattr(record.raw_stream, "limit"):
                    return off + at + 1
                return off + src.tell() - it.reader.rem_length() + record.raw_stream.limit  # its end
        except Exception as e:  # warcio, zlib and our checks raise several types on damaged input
            counts["warc_corrupt"] += 1
            rest = "; the rest of its gzip member is not read" if src.gzip and n else ""
            log.warning("crawl: unreadable WARC record in %s (%s)%s", where(), str(e)[:80], rest)
            return off + at + 1
        n += 1
        at = it.offset  # where warcio will start the next record
        if row is not None:
            yield row


def _too_large(counts: Counter, where: str, why: Exception, max_bytes: int, rest: str) -> None:
    counts["warc_too_large"] += 1
    log.warning("crawl: WARC record too large, skipped: %s (%s; the cap is %d bytes)%s", where, why, max_bytes, rest)


def _skip(it, record, src: "Unpacked") -> bool:
    """Inflate an oversized record of a gzip member to its end, keeping nothing; False if it
    inflates like a bomb or is damaged (the rest of the member cannot be reached then)."""
    src.skipping()
    try:
        it.read_to_end(record)
        return True
    except Exception:
        return False


class Unpacked:
    """The plain WARC bytes from offset start of a file, for warcio, read a bounded piece at a time.

    A gzip member starting there is inflated (that member only: its end is member_end); plain
    bytes are passed on to the end of the file. read() raises TooLarge past the allowance set
    by allow(), which bounds what one record (its headers included) may pull; while skipping()
    a record, it raises TooLarge instead once the member inflates past BOMB_RATIO to 1."""

    def __init__(self, f, start: int):
        self.f = f
        f.seek(start)
        self.gzip = f.read(3) == _GZIP
        f.seek(start)
        self.inflate = zlib.decompressobj(31) if self.gzip else None
        self.pending = b""
        self.read_bytes = 0
        self.limit, self.guard = 0, None
        self.member_end: int | None = None

    def allow(self, n: int) -> None:
        self.limit, self.guard = self.read_bytes + n, None

    def skipping(self) -> None:
        self.limit, self.guard = math.inf, (self.read_bytes, self._raw_pos())

    def _raw_pos(self) -> int:
        return self.f.tell() - len(self.pending)

    def tell(self) -> int:
        return self.read_bytes

    def read(self, n: int | None = -1) -> bytes:
        room = self.limit - self.read_bytes
        n = PIECE if n is None or n < 0 else n
        if n == 0:
            return b""  # (zlib reads a max_length of 0 as "no limit")
        if room <= 0:
            raise TooLarge("more than the cap before the record ends")
        if self.guard and self.read_bytes - self.guard[0] > BOMB_RATIO * (self._raw_pos() - self.guard[1]) + HEADROOM:
            raise TooLarge(f"it inflates more than {BOMB_RATIO} to 1, a gzip bomb")
        data = self._inflate(min(n, room, PIECE)) if self.gzip else self.f.read(min(n, room, PIECE))
        self.read_bytes += len(data)
        return data

    def _inflate(self, n: int) -> bytes:
        z = self.inflate
        while not z.eof:
            if not self.pending:
                self.pending = self.f.read(1 << 16)
                if not self.pending:  # (not EOFError: warcio reads that as a clean end)
                    raise ValueError("the gzip member is cut short: the file ends inside it")
            data = z.decompress(self.pending, n)
            self.pending = z.unconsumed_tail
            if z.eof:
                self.member_end = self.f.tell() - len(z.unused_data) - len(self.pending)
            if data:
                return data
        return b""


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


def _warc_row(record, counts: Counter, max_bytes: int) -> dict | None:
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
        "body": _read_body(record, max_bytes),
        "fetched_at": record.rec_headers.get_header("WARC-Date") or now(),
    }


def _read_body(record, max_bytes: int) -> bytes:
    """A response record's HTTP body, de-chunked and decoded (gzip, deflate) a piece at a time.

    Decoding goes through the fetcher's BoundedDecoder, so a body that inflates past max_bytes
    raises TooLarge without being held. A body that is not what its Content-Encoding says
    (WARC writers often store it decoded) is kept as it is, as warcio does."""
    from warcio.bufferedreaders import ChunkedDataReader

    http = record.http_headers
    stream = record.raw_stream  # at most the record's Content-Length, checked against the cap
    if http.get_header("Transfer-Encoding", "").strip().lower() == "chunked":
        stream = ChunkedDataReader(stream)  # no decomp_type: it only de-chunks
    try:
        decoder = BoundedDecoder(http.get_header("Content-Encoding", ""), max_bytes)
    except ValueError:  # an encoding we cannot decode: the bytes as they are
        decoder = BoundedDecoder("", max_bytes)
    parts = []
    while chunk := stream.read(PIECE):
        try:
            parts.append(decoder.feed(chunk))
        except OverflowError:
            raise TooLarge(f"its body decodes to more than {max_bytes} bytes") from None
        except zlib.error:
            if parts or decoder.size:
                raise
            decoder = BoundedDecoder("", max_bytes)
            parts.append(decoder.feed(chunk))
    return b"".join(parts)


def read_folder(folder: Path, counts: Counter, max_bytes: int = MAX_BYTES) -> Iterator[dict]:
    """Files under folder with a known suffix, as raw pages with their path as url.

    A file past max_bytes is skipped (folder_too_large) after reading at most max_bytes + 1."""
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
        with open(p, "rb") as f:
            size = p.stat().st_size
            body = f.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(body) > max_bytes:  # the size, or what it grew to while read
            counts["folder_too_large"] += 1
            log.warning("crawl: %s skipped: %d bytes, over the cap of %d", p, max(size, len(body)), max_bytes)
            continue
        yield {"url": p.resolve().as_uri(), "status": 200, "content_type": ctype, "body": body,
               "fetched_at": datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")}


def read_jsonl(path: Path, text_field: str, id_field: str | None, counts: Counter,
               max_bytes: int = MAX_BYTES) -> Iterator[dict]:
    """One text document per JSON line; malformed lines or records without text are counted.

    A line past max_bytes is skipped (jsonl_too_large) without holding more than max_bytes + 1
    of it: the rest of it is read and dropped a piece at a time."""
    p = Path(path)
    with open(p, "rb") as f:
        for n, raw in enumerate(_lines(f, max_bytes), 1):
            if raw is None:
                counts["jsonl_too_large"] += 1
                log.warning("crawl: %s line %d skipped: longer than the cap of %d bytes", p, n, max_bytes)
                continue
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


def _lines(f, max_bytes: int) -> Iterator[bytearray | None]:
    """The lines of a binary file, each at most max_bytes (None in place of a longer one).

    A line is gathered a piece at a time in one buffer (bytes joined at the end would hold
    it twice); past max_bytes the buffer is dropped and the rest of the line skipped."""
    while piece := f.readline(PIECE):
        line = bytearray(piece)
        while not piece.endswith(b"\n") and len(line) <= max_bytes and (piece := f.readline(PIECE)):
            line += piece
        if len(line) <= max_bytes + 1 and (line.endswith(b"\n") or len(line) <= max_bytes):
            yield line
            continue
        line = None
        while piece and not piece.endswith(b"\n"):
            piece = f.readline(PIECE)  # the rest of the long line, dropped a piece at a time
        yield None

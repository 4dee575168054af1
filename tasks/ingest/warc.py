"""WARC files read once, streaming: response records become raw pages.

The file is read forward a bounded piece at a time (Tape); warcio parses the records. A gzip
member is inflated a piece at a time and the bytes after its end are handed to the next
member, so a well-formed file is read from disk exactly once. A damaged record is counted
and reading resumes at the next place a record can start ("WARC/1." or a gzip member) after
the start of the bad one (only then is a stretch of the file read again).

Bounds: no record pulls more than max_bytes (+ its headers) from its member; an oversized one
is skipped (warc_too_large), in a gzip member by inflating it without keeping it, unless it
inflates like a bomb (then the rest of that member is not read). The whole file gives at most
max_file_bytes decompressed bytes (FileBudget); past it the rest is skipped (warc_file_limit).
A WARC gzipped as one whole file is read to its end like one gzipped record by record.
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from tasks.ingest.limits import (BOMB_RATIO, HEADROOM, MAX_BYTES, PIECE, FileBudget, FileLimit, TooLarge,
                                 log, now)
from tasks.web.fetch import HTML_TYPES, BoundedDecoder, media_type

_GZIP = b"\x1f\x8b\x08"
_WARC_MAGIC = (b"WARC/1.", _GZIP)  # an uncompressed record, or a gzip member
_SCAN = 1 << 16


class Tape:
    """A file read forward in bounded pieces; bytes taken but not used are given back and
    handed out again without another read. disk_bytes counts what came from the file."""

    def __init__(self, f):
        self.f, self.buf, self.pos, self.disk_bytes = f, b"", 0, 0

    def take(self, n: int) -> bytes:
        if self.buf:
            data, self.buf = self.buf[:n], self.buf[n:]
        else:
            data = self.f.read(n)
            self.disk_bytes += len(data)
        self.pos += len(data)
        return data

    def give_back(self, data: bytes) -> None:
        if data:
            self.buf, self.pos = data + self.buf, self.pos - len(data)

    def seek(self, target: int) -> None:
        """Move to target: within the pieces held without reading, elsewhere by seeking the file."""
        if target == self.pos:
            return
        if self.pos < target <= self.pos + len(self.buf):
            self.buf = self.buf[target - self.pos:]
        else:
            self.f.seek(target)
            self.buf = b""
        self.pos = target

    def peek(self, n: int) -> bytes:
        """The next n bytes (fewer at the end of the file), left to be taken."""
        if len(self.buf) < n:
            more = self.f.read(max(n - len(self.buf), _SCAN))
            self.disk_bytes += len(more)
            self.buf += more
        return self.buf[:n]

    def next_start(self) -> int | None:
        """The offset of the next place a record may start, from here on (None at the end)."""
        if self.peek(7).startswith(_WARC_MAGIC):  # the usual case: right here, nothing to scan
            return self.pos
        tail = b""
        while block := self.take(_SCAN):
            data = tail + block  # (the tail: a magic split over two pieces)
            hits = [j for j in (data.find(m) for m in _WARC_MAGIC) if j >= 0]
            if hits:
                self.give_back(data[min(hits):])
                return self.pos
            tail = data[-7:]
        return None


def read_warc(path: Path, counts: Counter, max_bytes: int = MAX_BYTES, max_file_bytes: int | None = None,
              stats: dict | None = None) -> Iterator[dict]:
    """Response records of a WARC as raw pages: url, status, content_type, body, fetched_at.

    Revisit and non-response records are skipped and counted; so are non-HTML responses. Records
    past max_bytes are skipped (warc_too_large); past max_file_bytes decompressed bytes the rest
    of the file is skipped (warc_file_limit). stats, when given, receives disk_bytes: what was
    read from the file (its size, for a well-formed one)."""
    path = Path(path)
    budget = FileBudget(path, "warc", max_file_bytes)
    with open(path, "rb") as f:
        tape = Tape(f)
        try:
            while (off := tape.next_start()) is not None:
                resume = yield from _records_from(tape, off, path, counts, max_bytes, budget)
                if resume is None:  # the file gave its limit
                    budget.report(counts, f"record at byte {off}")
                    return
                tape.seek(resume)
        finally:
            if stats is not None:
                stats["disk_bytes"] = tape.disk_bytes


def _records_from(tape: Tape, off: int, path: Path, counts: Counter, max_bytes: int, budget: FileBudget):
    """Yield the rows of the records starting at byte off; return where the next read may start
    (None once the file's budget is spent).

    A gzip member there is read to its end (one record, or a whole gzipped WARC); plain
    records are read on to the end of the file or to the first bad one."""
    from warcio.archiveiterator import ArchiveIterator

    src = Unpacked(tape, off, budget)
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
                if budget.hit:
                    return None
                _too_large(counts, where(), e, max_bytes, "")
            it.read_to_end(record)
        except TooLarge as e:
            if budget.hit:
                return None
            past = src.gzip and record is not None and _skip(it, record, src)
            if budget.hit:
                return None
            _too_large(counts, where(), e, max_bytes,
                       "; the rest of its gzip member is not read" if src.gzip and not past else "")
            if not past:
                if src.gzip or record is None or not hasattr(record.raw_stream, "limit"):
                    return off + at + 1
                return off + src.tell() - it.reader.rem_length() + record.raw_stream.limit  # its end
        except Exception as e:  # warcio, zlib and our checks raise several types on damaged input
            if budget.hit:
                return None
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
    """The plain WARC bytes from offset start of the tape, for warcio, a bounded piece at a time.

    A gzip member starting there is inflated (that member only: its end is member_end, and the
    bytes read past it go back to the tape); plain bytes are passed on to the end of the file.
    read() raises TooLarge past the allowance set by allow(), which bounds what one record (its
    headers included) may pull; while skipping() a record, it raises TooLarge instead once the
    member inflates past BOMB_RATIO to 1. Every byte handed out is spent from the file's budget."""

    def __init__(self, tape: Tape, start: int, budget: FileBudget):
        self.tape, self.budget = tape, budget
        tape.seek(start)
        self.gzip = tape.peek(3) == _GZIP
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
        return self.tape.pos - len(self.pending)

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
        if self.budget.left <= 0:
            try:
                self.budget.spend(1)
            except FileLimit:
                raise TooLarge("the file's limit is reached") from None
        want = min(n, room, PIECE, self.budget.left)
        data = self._inflate(want) if self.gzip else self.tape.take(want)
        self.read_bytes += len(data)
        self.budget.used += len(data)
        return data

    def _inflate(self, n: int) -> bytes:
        z = self.inflate
        while not z.eof:
            if not self.pending:
                self.pending = self.tape.take(_SCAN)
                if not self.pending:  # (not EOFError: warcio reads that as a clean end)
                    raise ValueError("the gzip member is cut short: the file ends inside it")
            data = z.decompress(self.pending, n)
            self.pending = z.unconsumed_tail
            if z.eof:
                # the next member's bytes (zlib leaves them in unused_data, and a copy in unconsumed_tail)
                self.tape.give_back(z.unused_data)
                self.pending = b""
                self.member_end = self.tape.pos
            if data:
                return data
        return b""


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

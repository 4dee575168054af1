"""Document sources other than live HTTP: WARC files, local folders, JSONL (.jsonl, .jsonl.gz)
and Parquet files.

Each reader yields document rows (the crawl schema) and counts what it skipped, by
reason, in the Counter it is given. A bad record is counted and skipped; it never
stops the rest of the file.

Local input is bounded like a fetched body: no WARC record, folder file, JSONL line or
Parquet text is read past max_bytes (default: crawl.max_body_bytes's default). An oversized
one is skipped, counted (`*_too_large`) and logged with its file and where in it, and is
never held whole: files are read in bounded pieces and gzip is inflated a piece at a time,
so a small "gzip bomb" is stopped at the cap. One input file (a folder: all its files) gives
at most max_file_bytes decompressed bytes; the rest is skipped and counted (`*_file_limit`).
WARC files are read in tasks/ingest/warc.py.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tasks.ingest.limits import MAX_BYTES, PIECE, FileBudget, FileLimit, TooLarge, log, now  # noqa: F401
from tasks.ingest.warc import read_warc  # noqa: F401 - the WARC reader, with the others here

FOLDER_SUFFIXES = {".html": "text/html", ".htm": "text/html", ".txt": "text/plain", ".md": "text/markdown"}


def read_folder(folder: Path, counts: Counter, max_bytes: int = MAX_BYTES,
                max_file_bytes: int | None = None) -> Iterator[dict]:
    """Files under folder with a known suffix, as raw pages with their path as url.

    A file past max_bytes is skipped (folder_too_large) after reading at most max_bytes + 1;
    once the folder's files have given max_file_bytes, the rest is skipped (folder_file_limit)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"crawl.folders: {root} is not a folder")
    budget = FileBudget(root, "folder", max_file_bytes)
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        ctype = FOLDER_SUFFIXES.get(p.suffix.lower())
        if ctype is None:
            counts["folder_unsupported_type"] += 1
            continue
        with open(p, "rb") as f:
            size = p.stat().st_size
            if size <= max_bytes and size > budget.left:
                budget.hit = True
                budget.report(counts, f"before {p}")
                return
            body = f.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(body) > max_bytes:  # the size, or what it grew to while read
            counts["folder_too_large"] += 1
            log.warning("crawl: %s skipped: %d bytes, over the cap of %d", p, max(size, len(body)), max_bytes)
            continue
        budget.used += len(body)
        yield {"url": p.resolve().as_uri(), "status": 200, "content_type": ctype, "body": body,
               "fetched_at": datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")}


def open_text_file(path: Path):
    """A binary file object of path's content: .gz files are inflated (a piece at a time)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"crawl source {p} is not a file")
    return gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")


def read_jsonl(path: Path, text_field: str, id_field: str | None, counts: Counter,
               max_bytes: int = MAX_BYTES, max_file_bytes: int | None = None) -> Iterator[dict]:
    """One text document per JSON line (.jsonl, or .jsonl.gz inflated as it is read); malformed
    lines or records without text are counted.

    A line past max_bytes is skipped (jsonl_too_large) without holding more than max_bytes + 1
    of it: the rest of it is read and dropped a piece at a time. Past max_file_bytes
    decompressed, the rest of the file is skipped (jsonl_file_limit)."""
    p = Path(path)
    budget = FileBudget(p, "jsonl", max_file_bytes)
    with open_text_file(p) as f:
        n = 0
        try:
            for n, raw in enumerate(_lines(f, max_bytes, budget), 1):
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
        except FileLimit:
            budget.report(counts, f"line {n + 1}")
        except (OSError, EOFError, zlib.error) as e:  # a damaged or cut .gz
            counts["jsonl_corrupt"] += 1
            log.warning("crawl: %s is damaged after line %d (%s); the rest is not read", p, n, e)


def _lines(f, max_bytes: int, budget: FileBudget | None = None) -> Iterator[bytearray | None]:
    """The lines of a binary file, each at most max_bytes (None in place of a longer one).

    A line is gathered a piece at a time in one buffer (bytes joined at the end would hold
    it twice); past max_bytes the buffer is dropped and the rest of the line skipped. Every
    piece is spent from budget (FileLimit once the file has given its limit)."""
    spend = budget.spend if budget is not None else (lambda n: None)

    def piece_of() -> bytes:
        data = f.readline(PIECE)
        spend(len(data))
        return data

    while piece := piece_of():
        line = bytearray(piece)
        while not piece.endswith(b"\n") and len(line) <= max_bytes and (piece := piece_of()):
            line += piece
        if len(line) <= max_bytes + 1 and (line.endswith(b"\n") or len(line) <= max_bytes):
            yield line
            continue
        line = None
        while piece and not piece.endswith(b"\n"):
            piece = piece_of()  # the rest of the long line, dropped a piece at a time
        yield None


def parquet_columns(path: Path, text_field: str, id_field: str | None) -> list[str]:
    """The columns to read from a Parquet source; a missing one is a ValueError naming the file,
    the column and the columns the file has."""
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:
        raise ValueError(f"crawl.parquet: {path} is not a readable Parquet file ({e})") from None
    wanted = [text_field] + ([id_field] if id_field else [])
    for key, col in zip(("text_field", "id_field"), wanted):
        if col not in names:
            raise ValueError(f"crawl.parquet: {path} has no column {col!r} (its {key}); its columns are "
                             f"{', '.join(names)}: set text_field/id_field to one of them")
    return wanted


def read_parquet(path: Path, text_field: str, id_field: str | None, counts: Counter,
                 max_bytes: int = MAX_BYTES, max_file_bytes: int | None = None, batch_rows: int = 64) -> Iterator[dict]:
    """One text document per row of a Parquet file, read a small batch of rows at a time.

    A text past max_bytes (UTF-8) is skipped (parquet_too_large), a null or non-text one counted
    (parquet_bad_row); past max_file_bytes of text the rest of the file is skipped
    (parquet_file_limit). Rows are named by id_field, or by their row number from 1."""
    import pyarrow.parquet as pq

    p = Path(path)
    columns = parquet_columns(p, text_field, id_field)
    budget = FileBudget(p, "parquet", max_file_bytes)
    uri, n = p.resolve().as_uri(), 0
    with pq.ParquetFile(p) as f:
        for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
            texts = batch.column(0).to_pylist()
            names = batch.column(1).to_pylist() if id_field else [None] * len(texts)
            for text, name in zip(texts, names):
                n += 1
                if not isinstance(text, str):
                    counts["parquet_bad_row"] += 1
                    continue
                size = len(text.encode("utf-8"))
                if size > max_bytes:
                    counts["parquet_too_large"] += 1
                    log.warning("crawl: %s row %d skipped: %d bytes, over the cap of %d", p, n, size, max_bytes)
                    continue
                try:
                    budget.spend(size)
                except FileLimit:
                    budget.report(counts, f"row {n}")
                    return
                yield {"url": f"{uri}#{name if name is not None else n}", "status": 200,
                       "content_type": "text/plain", "text": text, "fetched_at": now()}

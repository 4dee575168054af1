"""Per-URL revalidation store for the crawler: validators and the body each page last gave.

Under <workdir>/http-cache/, one JSON record (status, content type, ETag, Last-Modified,
when the body was fetched and when it was last checked, the body's sha256) and one body
file per URL. The crawler sends If-None-Match / If-Modified-Since only when the stored
body is present and matches its digest, so a 304 always has a document to keep; a record
whose body is missing or damaged is fetched again unconditionally.

The body is kept rather than the extracted text because an unchanged page's links are
still followed; the document is derived from it the same way every time.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class Entry:
    url: str
    status: int
    content_type: str
    etag: str
    last_modified: str
    fetched_at: str  # when this body was last received (a 200)
    checked_at: float  # when the server last confirmed it (a 200 or a 304)
    body_sha256: str
    body: bytes | None = field(default=None, repr=False)  # None: missing or damaged, do not revalidate

    def validators(self) -> dict[str, str]:
        """Conditional request headers for this entry; empty without a usable body."""
        if self.body is None:
            return {}
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


class HttpCache:
    """Entries keyed by URL in a folder; writes are atomic (temp file, then rename)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _paths(self, url: str) -> tuple[Path, Path]:
        h = hashlib.sha256(url.encode()).hexdigest()
        base = self.folder / h[:2] / h
        return base.with_suffix(".json"), base.with_suffix(".body")

    def load(self, url: str) -> Entry | None:
        meta, body = self._paths(url)
        try:
            entry = Entry(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        try:
            data = body.read_bytes()
            entry.body = data if hashlib.sha256(data).hexdigest() == entry.body_sha256 else None
        except OSError:
            entry.body = None
        return entry

    def save(self, entry: Entry, write_body: bool) -> None:
        meta, body = self._paths(entry.url)
        meta.parent.mkdir(parents=True, exist_ok=True)
        if write_body:
            _atomic(body, entry.body or b"")
        _atomic(meta, json.dumps({k: v for k, v in asdict(entry).items() if k != "body"}).encode())

    def received(self, url: str, previous: Entry | None, status: int, content_type: str, body: bytes,
                 etag: str, last_modified: str) -> tuple[Entry, str]:
        """Store a full response (a 200); returns the entry and whether it is new, changed or unchanged."""
        digest = hashlib.sha256(body).hexdigest()
        same = previous is not None and previous.body_sha256 == digest
        kind = "new" if previous is None else "unchanged" if same else "changed"
        entry = Entry(url, status, content_type, etag, last_modified,
                      previous.fetched_at if same else _now(), time.time(), digest, body)
        self.save(entry, write_body=not (same and previous.body is not None))
        return entry, kind

    def not_modified(self, entry: Entry, etag: str, last_modified: str) -> Entry:
        """The server confirmed the stored body (a 304): note when, and any new validators it sent."""
        entry.checked_at = time.time()
        entry.etag = etag or entry.etag
        entry.last_modified = last_modified or entry.last_modified
        self.save(entry, write_body=False)
        return entry


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

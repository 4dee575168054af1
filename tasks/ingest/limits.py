"""The bounds every local source is read under: one record (crawl.max_body_bytes) and one
input file (crawl.max_file_bytes), both counted in decompressed bytes."""
from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tasks.config import CrawlConfig

log = logging.getLogger("forja.crawl")
MAX_BYTES = CrawlConfig.model_fields["max_body_bytes"].default  # the crawl's cap on one body (20 MiB)
MAX_FILE_BYTES = CrawlConfig.model_fields["max_file_bytes"].default
HEADROOM = 1 << 20  # WARC and HTTP headers, and warcio's read-ahead, on top of a record's cap
PIECE = 1 << 20  # the most read (or inflated) at once
BOMB_RATIO = 200  # skipping a record in a gzip member: text inflates ~10 to 1, a bomb ~1000 to 1


class TooLarge(Exception):
    """A record, file or line past the cap (or a header that never ends)."""


class FileLimit(Exception):
    """An input file has given crawl.max_file_bytes (decompressed): the rest of it is not read."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FileBudget:
    """Decompressed bytes one input file (or folder) may still give; hit is set once it ran out."""

    def __init__(self, path: Path, kind: str, limit: int | None):
        self.path, self.kind = Path(path), kind
        self.limit = MAX_FILE_BYTES if limit is None else limit
        self.used, self.hit = 0, False

    @property
    def left(self) -> int:
        return self.limit - self.used

    def spend(self, n: int) -> None:
        """Count n bytes read; raises FileLimit once the file has given more than its limit."""
        self.used += n
        if self.used > self.limit:
            self.hit = True
            raise FileLimit(str(self.path))

    def report(self, counts: Counter, where: str = "") -> None:
        """Count and log the file whose rest is skipped."""
        counts[f"{self.kind}_file_limit"] += 1
        log.warning("crawl: %s: stopped after %d decompressed bytes%s, the crawl.max_file_bytes limit (%d); the "
                    "rest of the file is skipped", self.path, self.used, f" ({where})" if where else "", self.limit)

"""Polite, bounded, SSRF-guarded HTTP fetching for the crawl stage.

- robots.txt per RFC 9309 (protego): the longest matching rule wins, `*` and `$` wildcards,
  Allow beats Disallow of equal length; 4xx allows all, 5xx or unreachable disallows the
  host; every redirect hop is checked too (a redirect into a disallowed path is refused,
  not followed); Crawl-delay honoured (decimals too) up to MAX_CRAWL_DELAY_S, a larger one
  is capped and logged; cached for at most 24 hours.
- Per host (scheme-less host:port): at most crawl.host_connections requests in flight and a
  minimum delay between two request starts (HostGate, shared by the fetchers of a crawl's
  threads, so two threads never hit one host closer than its delay); Retry-After honoured; retries
  with exponential back-off on 5xx, 429, timeouts and connection errors only.
- Limits: body size (counted after decompression, which is done here in bounded steps,
  so a gzip bomb stops at the limit), a total deadline per fetch (slow drip), at most 5
  redirects, non-HTML refused from the headers before any body is read.
- SSRF guard (tasks/web/netguard.py): every hop's host is resolved once, within crawl.timeout_s
  (a stalled lookup fails that URL as dns_timeout), and refused if any address is not public
  (loopback, private, link-local, reserved, and the IPv4 inside IPv4-mapped, -compatible,
  NAT64 and 6to4 IPv6 spellings), numeric spellings such as 2130706433 or 0x7f.0.0.1 too;
  the connection goes to exactly the addresses checked (no second lookup: no DNS rebinding).
  Loopback only when allowed in config. Environment proxies are not used (they would resolve
  the name themselves).
- Revalidation (with an HttpCache): a page stored before is asked for with If-None-Match /
  If-Modified-Since, a 304 keeps the stored body; one checked since `fresh_since` (within
  the current refresh window) is served from the store without a request.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import zlib
import contextlib
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import urljoin, urlsplit

import httpx
from protego import Protego

from tasks.web import netguard
from tasks.config import CrawlConfig
from tasks.web.httpcache import Entry, HttpCache

log = logging.getLogger("forja.crawl")

RETRY_STATUS = {429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = HTML_TYPES + ("text/plain",)
MAX_REDIRECTS = 5
ROBOTS_TTL_S = 24 * 3600
MAX_RETRY_AFTER_S = 120.0
# A robots.txt Crawl-delay above this is capped (and logged): one page a minute still lets a
# crawl finish, while a hostile or mistaken "Crawl-delay: 100000" would stall it for days.
MAX_CRAWL_DELAY_S = 60.0


class CrawlError(RuntimeError):
    """A fetch that cannot succeed; the message names the URL and why."""


class Refused(CrawlError):
    """A URL refused without retrying: scope, SSRF guard, limits, content type."""

    def __init__(self, url: str, reason: str, detail: str = ""):
        super().__init__(f"{url}: {reason}{' (' + detail + ')' if detail else ''}")
        self.url, self.reason, self.detail = url, reason, detail


@dataclass
class Page:
    url: str  # after redirects
    status: int
    content_type: str
    body: bytes
    # With a cache: "new", "changed", "unchanged" (a 200 with the stored body), "not_modified"
    # (a 304) or "reused" (checked within the refresh window, no request); "" without one.
    freshness: str = ""
    fetched_at: str = ""  # when this body was received ("" = now)
    etag: str = ""
    last_modified: str = ""


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def public_address_check(url: str, allow_loopback: bool, timeout: float = 15.0) -> netguard.Target:
    """The vetted target of url (see tasks/web/netguard.py), or Refused / CrawlError naming why not."""
    try:
        return netguard.vet(url, allow_loopback, timeout)
    except netguard.Blocked as e:
        raise Refused(url, e.reason, e.detail) from None
    except netguard.Unresolved as e:
        if e.reason == "dns_timeout":  # not retried: a stalled resolver would stall every retry
            raise Refused(url, e.reason, e.detail) from None
        raise CrawlError(f"{url}: {e.detail}") from None


@dataclass
class Robots:
    """One origin's robots.txt: its rules (None = allow all) or disallow_all, and its delay."""

    rules: Protego | None = None
    disallow_all: bool = False
    crawl_delay: float | None = None

    def allows(self, url: str, product: str) -> bool:
        if self.disallow_all:
            return False
        return self.rules is None or self.rules.can_fetch(url, product)


def parse_robots(text: str, product: str, origin: str) -> Robots:
    """The rules of a robots.txt body for crawler `product`, Crawl-delay capped at MAX_CRAWL_DELAY_S."""
    rules = Protego.parse(text)
    delay = rules.crawl_delay(product)
    if delay is not None and delay > MAX_CRAWL_DELAY_S:
        log.warning("crawl: %s/robots.txt asks for Crawl-delay %g s; capped at %g s (fetch.MAX_CRAWL_DELAY_S)",
                    origin, delay, MAX_CRAWL_DELAY_S)
        delay = MAX_CRAWL_DELAY_S
    return Robots(rules, crawl_delay=delay)


class BoundedDecoder:
    """Content-Encoding decoding that never produces more than `limit` bytes in total."""

    def __init__(self, encoding: str, limit: int):
        encoding = (encoding or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj()
        elif encoding in ("identity", ""):
            self._z = None
        else:
            raise ValueError(encoding)
        self.limit, self.size = limit, 0

    def feed(self, data: bytes) -> bytes:
        """Decoded bytes for data; raises OverflowError once the output passes the limit."""
        if self._z is None:
            out = data
        else:
            # max_length bounds each step's output, so a bomb never inflates past the limit.
            out = self._z.decompress(data, self.limit - self.size + 1)
            while self._z.unconsumed_tail and len(out) <= self.limit - self.size:
                out += self._z.decompress(self._z.unconsumed_tail, self.limit - self.size + 1 - len(out))
        self.size += len(out)
        if self.size > self.limit:
            raise OverflowError
        return out


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        return min(max(0.0, parsedate_to_datetime(value).timestamp() - time.time()), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return None


class HostGate:
    """Politeness shared by every thread of a crawl: per host, at most `connections` requests in
    flight, and each request starts at least the host's delay after the previous one started
    and after the last one ended (whatever thread makes them)."""

    def __init__(self, connections: int = 1):
        self.connections = connections
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[threading.BoundedSemaphore, threading.Lock, list[float]]] = {}

    @contextlib.contextmanager
    def slot(self, host: str, delay: float):
        """Hold one of host's connections for a request, starting it no sooner than delay after the last."""
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = (threading.BoundedSemaphore(self.connections), threading.Lock(), [-1e9])
            slots, lock, last = self._hosts[host]
        with slots:
            with lock:  # one waiter at a time: the next start is last start + delay
                wait = last[0] + delay - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                last[0] = time.monotonic()
            try:
                yield
            finally:  # the delay also runs from the end of a request: a slow host is given room
                with lock:
                    last[0] = max(last[0], time.monotonic())


@dataclass
class Fetcher:
    """HTTP GET with the rules in this module's docstring. One per host walk (tasks/web/walk.py);
    its get() may be called from crawl.host_connections threads at once (httpx's client is
    thread-safe), and the HostGate it is given keeps the politeness across fetchers."""

    cfg: CrawlConfig
    client: httpx.Client = field(init=False)
    robots: dict[str, tuple[float, Robots]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # origin -> why its robots.txt failed
    cache: HttpCache | None = None  # revalidation store; None = plain fetching
    fresh_since: float = math.inf  # entries checked at or after this time are reused without a request
    cache_key: Callable[[str], str | None] = lambda url: url  # None: never cache this URL
    stalled: dict[str, str] = field(default_factory=dict)  # host -> why its DNS lookup stalled
    gate: HostGate | None = None  # shared politeness; None: a gate of this fetcher's own

    def __post_init__(self):
        self.pins = netguard.PinnedBackend()  # connections go only where the guard vetted
        if self.gate is None:
            self.gate = HostGate(self.cfg.host_connections)
        n = self.cfg.host_connections
        self.client = httpx.Client(
            transport=netguard.PinnedTransport(self.pins, httpx.Limits(max_connections=n, max_keepalive_connections=n)),
            timeout=httpx.Timeout(self.cfg.timeout_s), follow_redirects=False, trust_env=False,
            headers={"User-Agent": self.cfg.user_agent, "Accept-Encoding": "gzip, deflate",
                     "Accept": "text/html,application/xhtml+xml,text/plain;q=0.8,*/*;q=0.1"},
        )
        # RFC 9309 matches a group by the crawler's product token ("forja"), not the whole User-Agent.
        self.product = self.cfg.user_agent.split("/")[0].split()[0] if self.cfg.user_agent.strip() else "*"

    def close(self) -> None:
        self.client.close()

    def get(self, url: str, accept: tuple[str, ...] = TEXT_TYPES, conditional: bool = True,
            robots: bool = True) -> Page:
        """Fetch url following up to 5 redirects, each hop guarded; see the module docstring.

        The caller checks robots.txt for url itself (allowed()); each redirect target is checked
        here. conditional=False bypasses the revalidation store; robots=False (robots.txt itself)
        skips the robots check of redirect targets."""
        for hop in range(MAX_REDIRECTS + 1):
            if hop and robots and not self.allowed(url):
                why = self.why_host_skipped(url)  # the target host's robots.txt failed
                raise Refused(url, "robots_redirect", "redirected into a path robots.txt disallows"
                              + (f": {why}" if why else ""))
            key = self.cache_key(url) if self.cache is not None and conditional else None
            entry = self.cache.load(key) if key else None
            if entry is not None and entry.body is not None and entry.checked_at >= self.fresh_since:
                return Page(url, entry.status, entry.content_type, entry.body, "reused", entry.fetched_at)
            self._vet(url)
            page = self._get_one(url, accept, entry)
            if page.status in REDIRECT_STATUS:
                url = page.url
                continue
            if key and page.status < 400:
                page = self._remember(key, entry, page)
            return page
        raise Refused(url, "too_many_redirects", f"more than {MAX_REDIRECTS}")

    def _vet(self, url: str) -> None:
        """Resolve and check url's host once, then pin its connections to what was checked."""
        host = urlsplit(url).hostname or ""
        if host in self.stalled:  # asked once already: do not wait for it again
            raise Refused(url, "dns_timeout", self.stalled[host])
        try:
            self.pins.pin(public_address_check(url, self.cfg.allow_loopback, self.cfg.timeout_s))
        except Refused as e:
            if e.reason == "dns_timeout":
                self.stalled[host] = e.detail
            raise

    def _remember(self, key: str, entry: Entry | None, page: Page) -> Page:
        """Store a 200 or turn a 304 into the stored page, noting its freshness."""
        if page.status == 304:
            entry = self.cache.not_modified(entry, page.etag, page.last_modified)
            return Page(page.url, entry.status, entry.content_type, entry.body, "not_modified", entry.fetched_at)
        entry, kind = self.cache.received(key, entry, page.status, page.content_type, page.body, page.etag,
                                          page.last_modified)
        return Page(page.url, page.status, page.content_type, page.body, kind, entry.fetched_at)

    def _get_one(self, url: str, accept: tuple[str, ...], entry: Entry | None = None) -> Page:
        host = urlsplit(url).netloc
        reason = ""
        validators = entry.validators() if entry is not None else {}
        for attempt in range(self.cfg.retries + 1):
            pause = self.cfg.backoff_s * 2**attempt
            try:
                with self.gate.slot(host, self.delay_for(url)), \
                        self.client.stream("GET", url, headers=validators) as r:
                    if r.status_code in REDIRECT_STATUS and "location" in r.headers:
                        return Page(urljoin(url, r.headers["location"]), r.status_code, "", b"")
                    if r.status_code == 304:
                        if not validators:  # nothing stored to keep: the server is confused
                            raise CrawlError(f"{url} answered 304 Not Modified to an unconditional request")
                        return Page(url, 304, "", b"", etag=r.headers.get("etag", ""),
                                    last_modified=r.headers.get("last-modified", ""))
                    if r.status_code in RETRY_STATUS:
                        reason = f"HTTP {r.status_code}"
                        pause = max(pause, retry_after_seconds(r.headers.get("retry-after")) or 0)
                    else:
                        ctype = r.headers.get("content-type", "")
                        if r.status_code >= 400:
                            return Page(url, r.status_code, ctype, b"")
                        if media_type(ctype) not in accept:
                            raise Refused(url, "content_type", media_type(ctype) or "none")
                        return Page(url, r.status_code, ctype, self._read_body(url, r),
                                    etag=r.headers.get("etag", ""), last_modified=r.headers.get("last-modified", ""))
            except (httpx.TimeoutException, httpx.TransportError) as e:
                reason = f"{type(e).__name__}: {e}"
            if attempt < self.cfg.retries:
                time.sleep(pause)
        raise CrawlError(f"could not fetch {url} after {self.cfg.retries + 1} attempts ({reason})")

    def _read_body(self, url: str, r: httpx.Response) -> bytes:
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise Refused(url, "body_too_large", f"Content-Length {declared}")
        try:
            decoder = BoundedDecoder(r.headers.get("content-encoding", ""), self.cfg.max_body_bytes)
        except ValueError as e:
            raise Refused(url, "content_encoding", str(e)) from None
        deadline = time.monotonic() + self.cfg.deadline_s
        body = bytearray()  # grows in place: no list of chunks joined into a second copy
        try:
            for raw in r.iter_raw():  # no chunk size: data as it arrives, so the deadline is checked
                body += decoder.feed(raw)
                if time.monotonic() > deadline:
                    raise Refused(url, "deadline", f"body not complete after {self.cfg.deadline_s:g} s")
        except OverflowError:
            raise Refused(url, "body_too_large", f"over {self.cfg.max_body_bytes} bytes decoded") from None
        except zlib.error as e:
            raise Refused(url, "bad_compression", str(e)) from None
        return bytes(body)

    def _robots_for(self, url: str) -> Robots:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        cached = self.robots.get(origin)
        if cached and time.time() - cached[0] < ROBOTS_TTL_S:
            return cached[1]
        try:
            page = self.get(origin + "/robots.txt", accept=("text/plain", "text/html", ""), conditional=False,
                            robots=False)
            if page.status >= 500:
                robots = Robots(disallow_all=True)
            elif page.status >= 400:
                robots = Robots()
            else:
                robots = parse_robots(page.body.decode("utf-8", "replace"), self.product, origin)
        except Refused as e:
            if e.reason in ("non_public_address", "dns_timeout"):  # the host itself is refused: say so, per URL
                raise
            # robots.txt served as something odd: treat as absent; other refusals: stay away
            robots = Robots(disallow_all=e.reason != "content_type")
        except CrawlError as e:  # 5xx after retries or unreachable: skip the host (RFC 9309 2.3.1.4)
            robots = Robots(disallow_all=True)
            self.unreachable[origin] = str(e)
        self.robots[origin] = (time.time(), robots)
        return robots

    def allowed(self, url: str) -> bool:
        return self._robots_for(url).allows(url, self.product)

    def why_host_skipped(self, url: str) -> str | None:
        """Why url's host is skipped (its robots.txt failed after retries), or None."""
        parts = urlsplit(url)
        return self.unreachable.get(f"{parts.scheme}://{parts.netloc}")

    def delay_for(self, url: str) -> float:
        """The pause between two requests to url's host: crawl.delay_s or robots' (capped) Crawl-delay."""
        parts = urlsplit(url)
        cached = self.robots.get(f"{parts.scheme}://{parts.netloc}")
        return max(self.cfg.delay_s, (cached[1].crawl_delay if cached else None) or 0.0)

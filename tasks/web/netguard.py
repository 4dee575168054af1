"""The crawl's SSRF guard: which addresses a URL may reach, and connections pinned to them.

A host is resolved once, with a deadline (a stalled resolver fails the URL instead of
hanging the crawl); every address it resolves to is checked, including the IPv4 address
embedded in IPv6 spellings (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`,
SIIT `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo); the local-use
NAT64 prefix `64:ff9b:1::/48` and deprecated site-local `fec0::/10` are refused outright.
The HTTP client then connects to exactly those vetted addresses (PinnedBackend): it never
resolves a name itself, so DNS rebinding (a public answer for the check, a private one for
the connection) cannot happen. The URL's host name still goes in the Host header and in
TLS (SNI and certificate verification), as httpcore takes both from the URL, not the socket.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use: never a public destination
V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated RFC 4291 form ::a.b.c.d
V4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 SIIT form ::ffff:0:a.b.c.d
DEFAULT_PORTS = {"http": 80, "https": 443}


class Blocked(Exception):
    """A URL the guard refuses; reason is a short slug (scheme, no_host, non_public_address)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail


class Unresolved(Exception):
    """A host that could not be resolved; reason is dns_timeout (stalled) or dns_error."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Target:
    """A vetted destination: the host as httpcore will ask for it, and where it may connect."""

    host: str
    port: int
    addresses: tuple[str, ...]


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries (and the spelling's name), or None."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour:
        return ip.sixtofour, "6to4"
    if ip.teredo:
        return ip.teredo[1], "Teredo"
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in NAT64:
        return low32, "NAT64"
    if ip in V4_TRANSLATED:
        return low32, "IPv4-translated"
    if ip in V4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves, not IPv4
        return low32, "IPv4-compatible"
    return None


def address_problem(ip: IPAddress, allow_loopback: bool) -> str | None:
    """Why ip must not be reached, or None when it may.

    Loopback is allowed (when asked) only as itself or IPv4-mapped, which reach this machine;
    a translated spelling of 127.0.0.1 (NAT64, 6to4 ...) reaches some other machine's."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL:
            return "local-use NAT64 prefix 64:ff9b:1::/48"
        if ip.is_site_local:
            return "site-local fec0::/10"
        inner = embedded_ipv4(ip)
        if inner is not None:
            v4, spelling = inner
            why = address_problem(v4, allow_loopback and spelling == "IPv4-mapped")
            return f"{spelling} spelling of {v4}: {why}" if why else None
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "not a public address"
    return None


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses host resolves to, asked once with a deadline of timeout seconds.

    getaddrinfo cannot be interrupted, so it runs in a daemon thread that is left behind
    if it stalls (it ends when the system resolver gives up); the caller fails at once."""
    try:
        return [str(ipaddress.ip_address(host))]  # a literal address: nothing to ask
    except ValueError:
        pass
    box: dict = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as e:  # reported to the caller below
            box["error"] = e

    worker = threading.Thread(target=lookup, name=f"forja-dns-{host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise Unresolved("dns_timeout", f"DNS lookup of {host} gave no answer within {timeout:g} s")
    if "error" in box:
        raise Unresolved("dns_error", f"cannot resolve {host} ({box['error']})")
    addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in box["infos"]))
    if not addresses:
        raise Unresolved("dns_error", f"cannot resolve {host} (no addresses)")
    return addresses


def vet(url: str, allow_loopback: bool, timeout: float) -> Target:
    """Resolve url's host once and check every address; raises Blocked or Unresolved."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise Blocked("bad_url", str(e)) from None
    if parsed.scheme not in DEFAULT_PORTS:
        raise Blocked("scheme", parsed.scheme or "none")
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded, no brackets: what httpcore connects to
    if not host:
        raise Blocked("no_host")
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    addresses = resolve(host, port, timeout)
    for address in addresses:
        why = address_problem(ipaddress.ip_address(address), allow_loopback)
        if why:
            raise Blocked("non_public_address", f"{host} -> {address}: {why}")
    return Target(host.lower(), port, tuple(addresses))


class PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections only to addresses vetted for (host, port); never resolves names."""

    def __init__(self) -> None:
        self.pins: dict[tuple[str, int], tuple[str, ...]] = {}
        self._tcp = httpcore.SyncBackend()

    def pin(self, target: Target) -> None:
        self.pins[(target.host, target.port)] = target.addresses

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = self.pins.get((host.lower(), port))
        if not addresses:
            raise httpcore.ConnectError(f"{host}:{port} was not vetted by the SSRF guard; not connecting")
        error: Exception | None = None
        for address in addresses:  # literal addresses: the socket layer resolves nothing
            try:
                return self._tcp.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        raise error

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("the crawler does not connect to Unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool on a PinnedBackend.

    httpx 0.28 does not take a network backend, its pool (httpcore.ConnectionPool) does: the
    pool is rebuilt with the same TLS verification and limits on the pinned backend."""

    def __init__(self, backend: PinnedBackend, limits: httpx.Limits):
        super().__init__(verify=True, limits=limits, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=True),  # SSL_CERT_FILE/DIR still honoured
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=backend,
        )

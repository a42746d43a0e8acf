"""Downloading http(s) URLs without letting a URL reach into the caller's own network.

A URL's host is resolved once; every address it resolves to is checked against the policy, and
the connection goes to the checked address (no second lookup that a rebinding DNS server could
answer differently). Redirects are followed by hand, each hop resolved and checked the same way.
Loopback, private, link-local (cloud metadata at 169.254.169.254 included), shared (CGNAT),
multicast, unspecified and reserved addresses are refused unless the caller allows them.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Sequence

__all__ = ["MAX_REDIRECTS", "AllowPrivate", "allowed_networks", "download", "refusal"]

#: False: public addresses only; True: any address; networks ("10.0.0.0/8", "127.0.0.1", "::1",
#: as a list or one comma-separated string): public addresses and those.
AllowPrivate = bool | Sequence[str]

#: Most redirects followed before a download fails.
MAX_REDIRECTS = 5

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


def _embedded_v4(ip: _IP) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what it reaches."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: _IP) -> str | None:
    """Why `ip` is not a public address ("loopback", "private", ...), or None if it is."""
    ip = _embedded_v4(ip) or ip
    for name, hit in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if hit:
            return name
    # is_global also leaves out what the flags above miss, e.g. 100.64.0.0/10 (carrier NAT).
    return None if ip.is_global else "non-global"


_Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


def allowed_networks(allow: AllowPrivate) -> _Networks | None:
    """The non-public networks `allow` opens (None: all of them); a string is comma-separated.

    Raises:
        ValueError: an entry that is not an address or network.
    """
    if allow is True:
        return None
    if allow is False:
        return []
    items = allow.split(",") if isinstance(allow, str) else list(allow)
    try:
        return [ipaddress.ip_network(n.strip(), strict=False) for n in items if n.strip()]
    except (ValueError, TypeError) as e:
        raise ValueError(f"allow_private_urls: {e}") from e


def _check(host: str, ip: _IP, networks: _Networks | None) -> None:
    reason = refusal(ip)
    if reason is None or networks is None:
        return
    if any(ip in net or (_embedded_v4(ip) or ip) in net for net in networks):
        return
    what = f"{ip} is" if host == str(ip) else f"{host} resolves to {ip},"
    raise ValueError(f"{what} a {reason} address; URLs may only name public hosts unless private addresses are allowed (allow_private_urls)")


def _resolve(host: str, port: int, networks: _Networks | None) -> str:
    """The one address of `host` to connect to, after checking every address it resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from e
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 scope id ("fe80::1%eth0")
        ip = ipaddress.ip_address(text)
        # Every answer is checked: a host that resolves to one public and one private address
        # must not get the private one on some later connection attempt.
        _check(host, ip, networks)
        addresses.append(text)
    if not addresses:
        raise ValueError(f"host {host!r} has no address")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to an already resolved and checked address (Host header: the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def _target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r} is not http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in URLs are not supported")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from e
    if not parts.hostname:
        raise ValueError("no host")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, parts.hostname, port, path


def _left(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out after {timeout} s")
    return left


def _body(resp: http.client.HTTPResponse, sock: socket.socket, max_bytes: int, deadline: float, timeout: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise ValueError(f"it is {int(length)} bytes, more than the {max_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        # The socket timeout bounds each read; the deadline bounds the whole body, so a server
        # that sends a byte now and then cannot hold the download open forever. (The response
        # owns the socket now: the connection let go of it when the server said it will close.)
        sock.settimeout(min(timeout, _left(deadline, timeout)))
        chunk = resp.read1(_CHUNK)  # one receive: read() would wait for the whole chunk
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:  # also catches bodies without (or lying about) Content-Length
            raise ValueError(f"it is larger than the {max_bytes}-byte limit")
        chunks.append(chunk)


def download(url: str, *, timeout: float, max_bytes: int, allow_private: AllowPrivate, headers: dict[str, str]) -> bytes:
    """The body of a GET of an http(s) URL, under the address policy, `timeout` seconds in all
    (connect, redirects and body) and `max_bytes`.

    Raises:
        ValueError: refused address, too many redirects, an HTTP status other than 200, a body
            over the limit. TimeoutError and OSError: network failures; the caller words them.
    """
    networks = allowed_networks(allow_private)
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path = _target(url)
        address = _resolve(host, port, networks)
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(host, port, address, timeout=min(timeout, _left(deadline, timeout)))
        try:
            conn.request("GET", path, headers=headers)
            sock = conn.sock
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise ValueError(f"HTTP {resp.status} redirect without a Location")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} {resp.reason}")
            if sock is None:  # request() connects, so this cannot happen; keeps the types honest
                raise OSError("connection closed")
            return _body(resp, sock, max_bytes, deadline, timeout)
        finally:
            conn.close()
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")

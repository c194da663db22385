"""Where a webhook may be sent: the URL's rules and the address check against SSRF.

A user names the URL, so without a check the service would POST wherever they like: to its
own database, the cloud's metadata service, an admin console on the private network. So:

* the URL is ``https`` (plain ``http`` only to loopback, when loopback is allowed), absolute,
  without credentials or fragment, at most 2048 characters;
* its host is **resolved**, and refused when **any** address is private, loopback,
  link-local, multicast, reserved, unspecified or otherwise not global (``ipaddress``'s
  properties), unless the settings allow it: ``NOTIFICATION_WEBHOOK_ALLOW_LOOPBACK``
  (development and tests) or ``NOTIFICATION_WEBHOOK_ALLOWED_NETWORKS`` (CIDRs). An IPv4-mapped
  IPv6 address is judged as the IPv4 address it is; a 6to4 or Teredo address is refused when
  the IPv4 address it carries is not public, whatever the settings allow;
* at registration a refusal is a 422 naming the reason; at delivery the host is resolved
  again and the attempt fails as ``forbidden_address`` without a connection: a name that
  pointed somewhere public when registered and points inside now (DNS rebinding) is caught;
* the request then goes to the **address that was checked** (the URL's host as ``Host`` and
  TLS server name), never to a second resolution, and redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port)`` to the addresses it resolves to (text); ``OSError`` when it does not."""

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}


class Refused(Exception):
    """A URL or address webhooks may not go to; ``reason`` is a short slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Target:
    """A URL's parts, as the request will use them."""

    scheme: str
    host: str
    """ASCII (IDNA) host name, or an IP address without brackets."""
    port: int
    path: str
    """Path and query (``/`` at least)."""
    literal: IPAddress | None
    """The host when it is an IP address."""

    @property
    def authority(self) -> str:
        """The ``Host`` header: the host (bracketed if IPv6) and any non-default port."""
        host = f"[{self.host}]" if isinstance(self.literal, ipaddress.IPv6Address) else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"


@dataclass(frozen=True)
class Policy:
    allow_loopback: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def refusal(self, address: IPAddress) -> str | None:
        """None when webhooks may go to ``address``; else the property that forbids it."""
        if any(address in network for network in self.allowed_networks):
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return self.refusal(address.ipv4_mapped)  # the same address, written as IPv6
        for inner in _embedded(address):  # 6to4, Teredo: where it really leads counts too,
            why = _STRICT._judge(inner)  # with no exception (they are for the address itself)
            if why is not None:
                return why
        return self._judge(address)

    def _judge(self, address: IPAddress) -> str | None:
        if address.is_loopback:
            return None if self.allow_loopback else "loopback"
        for name in ("unspecified", "link_local", "multicast", "private", "reserved"):
            if getattr(address, f"is_{name}"):
                return name
        if not address.is_global:
            return "non_global"
        return None

    def allows_plain_http(self, addresses: Iterable[IPAddress]) -> bool:
        return self.allow_loopback and all(_unmapped(a).is_loopback for a in addresses)


_STRICT = Policy()


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 one carries (mapped, 6to4, Teredo): where it really leads."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour]
    if address.teredo is not None:
        found.extend(address.teredo)
    return [a for a in found if a is not None]


def _idna(host: str) -> str:
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise Refused("invalid_url", "the host is not a valid name") from None
    labels = ascii_host.rstrip(".").split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_label(label) for label in labels):
        raise Refused("invalid_url", "the host is not a valid name")
    return ascii_host.rstrip(".").lower()


def _label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )


def parse(url: str) -> Target:
    """The parts of ``url`` if it may be a webhook URL at all (before any resolution)."""
    if not isinstance(url, str) or not url:
        raise Refused("invalid_url", "no URL")
    if len(url) > MAX_URL_LENGTH:
        raise Refused("invalid_url", f"longer than {MAX_URL_LENGTH} characters")
    if any(ch <= " " or ch == "\x7f" or ch == "\\" for ch in url):
        raise Refused("invalid_url", "spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        raise Refused("invalid_url", "not a URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise Refused("scheme", "webhook URLs are https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Refused("invalid_url", "credentials in the URL are not allowed")
    if parts.fragment or url.endswith("#"):
        raise Refused("invalid_url", "a fragment is never sent: leave it out")
    if not hostname:
        raise Refused("invalid_url", "no host")
    if port == 0:
        raise Refused("invalid_url", "port 0")
    try:
        literal: IPAddress | None = ipaddress.ip_address(hostname)
    except ValueError:
        literal = None
    if literal is not None and getattr(literal, "scope_id", None):
        raise Refused("forbidden_address", "a scoped (link-local) address")
    host = str(literal) if literal is not None else _idna(hostname)
    path = parts.path or "/"
    if not path.startswith("/"):
        raise Refused("invalid_url", "not a URL")
    if parts.query or url.endswith("?"):
        path = f"{path}?{parts.query}"
    return Target(
        scheme=scheme,
        host=host,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        path=path,
        literal=literal,
    )


def check(target: Target, addresses: Sequence[str], policy: Policy) -> IPAddress:
    """The address to connect to, if every address ``target``'s host has is allowed."""
    if not addresses:
        raise Refused("unresolvable", f"{target.host} has no address")
    found: list[IPAddress] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise Refused("unresolvable", f"{target.host} resolves to no IP address") from None
        why = "link_local" if "%" in text else policy.refusal(address)
        if why is not None:
            raise Refused(
                "forbidden_address",
                f"{target.host} resolves to {address}, a {why.replace('_', '-')} address",
            )
        found.append(address)
    if target.scheme == "http" and not policy.allows_plain_http(found):
        raise Refused("scheme", "webhook URLs are https (http only to loopback in development)")
    return found[0]


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """The host's addresses as the operating system resolves them (``getaddrinfo``)."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in found:
        text = str(sockaddr[0])
        if len(sockaddr) == 4 and sockaddr[3]:  # an IPv6 scope id: link-local
            text = f"{text}%{sockaddr[3]}"
        if text not in addresses:
            addresses.append(text)
    return addresses


async def resolve(target: Target, resolver: Resolver) -> list[str]:
    if target.literal is not None:
        return [str(target.literal)]
    try:
        return list(await resolver(target.host, target.port))
    except (OSError, UnicodeError):
        raise Refused("unresolvable", f"{target.host} does not resolve") from None


@dataclass(frozen=True)
class Destination:
    target: Target
    address: IPAddress

    @property
    def url(self) -> str:
        """The URL to request: the checked address in place of the host."""
        ip = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.target.scheme}://{ip}:{self.target.port}{self.target.path}"

    @property
    def server_name(self) -> str | None:
        """The TLS server name (SNI and certificate check): the URL's host name."""
        if self.target.scheme != "https" or self.target.literal is not None:
            return None
        return self.target.host


async def vet(url: str, policy: Policy, resolver: Resolver = system_resolver) -> Destination:
    """Parse, resolve and check ``url``; raises :class:`Refused`."""
    target = parse(url)
    addresses = await resolve(target, resolver)
    return Destination(target, check(target, addresses, policy))

"""Where webhooks may go (SSRF), and how they are signed: properties and cases, no network."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from tributary.messaging.db import now
from tributary.notification.webhook_models import WebhookEndpoint
from tributary.notification.webhook_urls import (
    Destination,
    IPAddress,
    Policy,
    Refused,
    Resolver,
    check,
    parse,
    vet,
)
from tributary.notification.webhooks import new_secret, sign, signing_secrets

FORBIDDEN = ("private", "loopback", "link_local", "multicast", "reserved", "unspecified")


def leads_to(address: IPAddress) -> list[IPAddress]:
    """The address and the IPv4 ones an IPv6 address carries (mapped, 6to4, Teredo)."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return [address.ipv4_mapped]
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
    return found


def public(address: IPAddress) -> bool:
    """The oracle: global and none of the forbidden properties, wherever it really leads."""
    return all(
        a.is_global and not any(getattr(a, f"is_{p}") for p in FORBIDDEN) for a in leads_to(address)
    )


def static(table: dict[str, list[str]]) -> Resolver:
    """A resolver answering from ``table`` (a name not in it does not resolve)."""

    async def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise OSError(f"{host}: no such name")
        return table[host]

    return resolve


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
special = st.sampled_from(
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:8.8.8.8",
        "2002:7f00:1::1",
        "2002:808:808::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "8.8.8.8",
        "2001:4860:4860::8888",
    ]
).map(ipaddress.ip_address)
addresses = st.one_of(ipv4, ipv6, special)
hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)
networks = st.one_of(st.tuples(ipv4, st.integers(0, 32)), st.tuples(ipv6, st.integers(0, 128))).map(
    lambda a: ipaddress.ip_network(f"{a[0]}/{a[1]}", strict=False)
)


def as_host(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


urls = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["https", "https", "https", "http", "HTTPS", "ftp", "javascript", ""]),
        st.one_of(hostnames, addresses.map(as_host), st.text(max_size=40)),
        st.one_of(st.just(""), st.integers(-5, 70000).map(lambda p: f":{p}")),
        st.one_of(st.just(""), st.text(max_size=60).map(lambda p: "/" + p)),
    ),
)


def attempt(url: str, policy: Policy, resolved: list[IPAddress]) -> Destination | str:
    """Where ``url`` goes when its host resolves to ``resolved``; or why it may not."""
    try:
        target = parse(url)
        table = {target.host: [str(a) for a in resolved]}
        return asyncio.run(vet(url, policy, static(table)))
    except Refused as refused:
        return refused.reason


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    url=urls,
    resolved=st.lists(addresses, max_size=4),
    loopback=st.booleans(),
)
def test_no_url_crashes_the_check_and_none_reaches_a_forbidden_address(
    url: str, resolved: list[IPAddress], loopback: bool
) -> None:
    policy = Policy(allow_loopback=loopback)
    outcome = attempt(url, policy, resolved)
    if isinstance(outcome, str):
        assert outcome in {"invalid_url", "scheme", "forbidden_address", "unresolvable"}
        return
    destination = outcome
    reached = [destination.target.literal] if destination.target.literal else resolved
    assert destination.address in reached
    for address in reached:  # every address the name has, not only the one connected to
        assert address is not None
        assert public(address) or (loopback and all(a.is_loopback for a in leads_to(address))), (
            address
        )
    if destination.target.scheme == "http":
        assert loopback
        assert all(a.is_loopback for r in reached if r for a in leads_to(r))
    assert destination.url.startswith(f"{destination.target.scheme}://")


@given(address=addresses, allowed=st.lists(networks, max_size=3))
def test_allowed_networks_open_exactly_themselves(
    address: IPAddress, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    why = Policy(allowed_networks=tuple(allowed)).refusal(address)
    inside = any(address in n for n in allowed)
    if why is None:
        assert (
            inside
            or public(address)
            or any(any(a in n for n in allowed) for a in leads_to(address))
        )
    if inside:
        assert why is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://10.0.0.1/", "forbidden_address"),
        ("https://[fe80::1%25eth0]/", "forbidden_address"),
        ("https://169.254.169.254/latest", "forbidden_address"),
        ("https://[::ffff:169.254.169.254]/", "forbidden_address"),
        ("http://example.com/", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("https://user@example.com/", "invalid_url"),
        ("https://example.com/a b", "invalid_url"),
        ("https://example.com\\@10.0.0.1/", "invalid_url"),
        ("https://example.com:0/", "invalid_url"),
        ("https://example.com:99999/", "invalid_url"),
        ("https:///path", "invalid_url"),
        ("https://exa_mple..com/", "invalid_url"),
        ("https://" + "a" * 64 + ".com/", "invalid_url"),
        ("https://example.com/#frag", "invalid_url"),
        ("//example.com/", "scheme"),
    ],
)
def test_urls_refused_before_or_without_resolution(url: str, reason: str) -> None:
    resolver = static({"example.com": ["93.184.216.34"]})
    with pytest.raises(Refused) as refused:
        asyncio.run(vet(url, Policy(), resolver))
    assert refused.value.reason == reason


def test_a_name_is_judged_by_every_address_it_has() -> None:
    resolver = static(
        {
            "mixed.example": ["93.184.216.34", "10.0.0.5"],
            "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
            "inside.example": ["192.168.10.10"],
            "localhost": ["127.0.0.1", "::1"],
        }
    )
    with pytest.raises(Refused, match=r"10\.0\.0\.5, a private address"):
        asyncio.run(vet("https://mixed.example/hook", Policy(), resolver))
    found = asyncio.run(vet("https://public.example:8443/h?x=1", Policy(), resolver))
    assert str(found.address) == "93.184.216.34"
    assert found.url == "https://93.184.216.34:8443/h?x=1"
    assert found.server_name == "public.example"
    assert found.target.authority == "public.example:8443"
    allowed = Policy(allowed_networks=(ipaddress.ip_network("192.168.0.0/16"),))
    inside = asyncio.run(vet("https://inside.example/", allowed, resolver))
    assert inside.target.authority == "inside.example"
    with pytest.raises(Refused) as plain:
        asyncio.run(vet("http://inside.example/", allowed, resolver))  # https only there
    assert plain.value.reason == "scheme"
    local = asyncio.run(vet("http://localhost:8080/", Policy(allow_loopback=True), resolver))
    assert local.url == "http://127.0.0.1:8080/"
    assert local.server_name is None
    assert local.target.authority == "localhost:8080"
    with pytest.raises(Refused, match="does not resolve"):
        asyncio.run(vet("https://unknown.example/", Policy(), resolver))
    with pytest.raises(Refused, match="no address"):
        check(parse("https://empty.example/"), [], Policy())


def test_signatures_verify_with_each_secret_and_rotation_ends() -> None:
    old, new = new_secret(), new_secret()
    assert old.startswith("whsec_")
    body = '{"type":"notification.created","data":{}}'
    stamp = int(now().timestamp())
    header = sign("msg_0123456789abcdef", stamp, body, [new, old])
    headers = {
        "webhook-id": "msg_0123456789abcdef",
        "webhook-timestamp": str(stamp),
        "webhook-signature": header,
    }
    assert len(header.split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {
            "type": "notification.created",
            "data": {},
        }

    endpoint = WebhookEndpoint(id="wh_x", user_id="usr_x", url="https://e/", secret=new)
    assert signing_secrets(endpoint, now()) == [new]
    endpoint.previous_secret = old
    endpoint.previous_secret_until = now() + timedelta(hours=1)
    assert signing_secrets(endpoint, now()) == [new, old]
    assert signing_secrets(endpoint, now() + timedelta(hours=2)) == [new]

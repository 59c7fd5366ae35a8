"""Allow/deny lists: the prefix sets against `ipaddress` as the oracle, the rule, the reload merge."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.balance.hashing import client_ip
from pointsman.protect.acl import (
    MAX_PREFIXES,
    Acl,
    AclLists,
    PrefixSet,
    address_key,
    canonical,
    normalise,
    parse_networks,
)

v4_networks = st.builds(
    lambda value, length: ipaddress.IPv4Network((value, length), strict=False),
    st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_networks = st.builds(
    lambda value, length: ipaddress.IPv6Network((value, length), strict=False),
    st.integers(0, 2**128 - 1), st.integers(0, 128))
v4_addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6_addresses = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


def _near(networks: list[ipaddress.IPv4Network]) -> st.SearchStrategy[ipaddress.IPv4Address]:
    """Addresses inside or just outside the given networks, so hits are exercised, not only misses."""
    edges = [int(n.network_address) + d for n in networks for d in (-1, 0, 1)] + \
        [int(n.broadcast_address) + d for n in networks for d in (-1, 0, 1)]
    values = [v for v in edges if 0 <= v < 2**32] or [0]
    return st.sampled_from(values).map(ipaddress.IPv4Address)


@settings(max_examples=150)
@given(st.lists(v4_networks, max_size=30), st.data())
def test_v4_membership_matches_ipaddress(networks: list[ipaddress.IPv4Network], data: st.DataObject) -> None:
    prefixes = PrefixSet(networks)
    near = _near(networks)
    for _ in range(8):
        address = data.draw(st.one_of(v4_addresses, near))
        assert (address in prefixes) == any(address in n for n in networks)


@settings(max_examples=200)
@given(st.lists(v6_networks, max_size=30), st.lists(v6_addresses, max_size=20))
def test_v6_membership_matches_ipaddress(networks: list[ipaddress.IPv6Network],
                                         addresses: list[ipaddress.IPv6Address]) -> None:
    prefixes = PrefixSet(networks)
    # Each network's first and last address are members: the oracle must agree on hits too.
    probes = addresses + [n.network_address for n in networks] + [n.broadcast_address for n in networks]
    for address in probes:
        expected = any(address in n for n in networks if not n.subnet_of(ipaddress.IPv6Network(
            "::ffff:0:0/96")) or n.prefixlen < 96)
        assert (address in prefixes) == expected


@settings(max_examples=200)
@given(st.lists(v4_networks, max_size=20), st.lists(v4_networks, max_size=20), v4_addresses)
def test_deny_wins_and_allow_restricts(allow: list[ipaddress.IPv4Network],
                                       deny: list[ipaddress.IPv4Network],
                                       address: ipaddress.IPv4Address) -> None:
    acl = Acl(PrefixSet(allow) if allow else None, PrefixSet(deny))
    denied = any(address in n for n in deny)
    allowed = not allow or any(address in n for n in allow)
    assert acl.refuses(str(address)) == (denied or not allowed)


@settings(max_examples=500)
@given(st.one_of(
    v4_addresses.map(str),
    v6_addresses.map(str),
    v4_addresses.map(lambda a: f"::ffff:{a}"),
    v4_addresses.map(lambda a: str(ipaddress.IPv6Address(int(a) | 0xFFFF00000000))),
    st.text(alphabet="0123456789abcdef:.%", max_size=20),
))
def test_address_key_follows_client_ip(ip: str) -> None:
    try:
        expected = client_ip(ip)
    except ValueError:
        with pytest.raises(ValueError):
            address_key(ip)
        return
    assert address_key(ip) == (expected.version, int(expected))


@settings(max_examples=500)
@given(st.one_of(
    v4_networks.map(str),
    v4_addresses.map(str),
    st.builds(lambda a, n: f"{a}/{n}", v4_addresses, st.integers(0, 40)),
    st.text(alphabet="0123456789./ ", max_size=22),
    st.sampled_from(["1.2.3.4/08", "01.2.3.4", "1.2.3.4/", "/8", "1.2.3.4/+8", "1.2.3.4/٣"]),
))
def test_the_fast_ipv4_parser_agrees_with_ipaddress(text: str) -> None:
    try:
        expected = str(normalise(text))
    except ValueError:
        with pytest.raises(ValueError):
            canonical(text)
        return
    assert canonical(text) == expected
    assert PrefixSet([text]).has(4, int(ipaddress.ip_network(expected).network_address))


def test_families_do_not_mix() -> None:
    acl = Acl(None, PrefixSet(["0.0.0.0/0"]))
    assert acl.refuses("192.0.2.1")
    assert not acl.refuses("2001:db8::1")
    acl6 = Acl(None, PrefixSet(["::/0"]))
    assert acl6.refuses("2001:db8::1") and not acl6.refuses("192.0.2.1")


def test_ipv4_mapped_peers_are_judged_as_ipv4() -> None:
    acl = Acl(PrefixSet(["10.0.0.0/8"]), PrefixSet(["10.9.0.0/16"]))
    assert not acl.refuses("::ffff:10.1.2.3")
    assert acl.refuses("::ffff:10.9.2.3")
    assert acl.refuses("::ffff:192.0.2.1")


def test_a_mapped_prefix_is_stored_as_ipv4() -> None:
    assert str(normalise("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    acl = Acl(None, PrefixSet(["::ffff:192.0.2.0/120"]))
    assert acl.refuses("192.0.2.9") and acl.refuses("::ffff:192.0.2.9")
    assert not acl.refuses("192.0.3.9")


def test_single_addresses_and_host_bits() -> None:
    assert parse_networks(["192.0.2.7", "10.1.2.3/8", "2001:db8::1/32", "10.0.0.0/8"]) == (
        "192.0.2.7/32", "10.0.0.0/8", "2001:db8::/32")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.com", "", "1.2.3", 42, None])
def test_bad_prefixes_are_named(bad: object) -> None:
    with pytest.raises(ValueError, match="expected an address or prefix"):
        parse_networks(["10.0.0.0/8", bad])


def test_the_number_of_prefixes_is_capped() -> None:
    many = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(MAX_PREFIXES + 1))
    with pytest.raises(ValueError, match="more than"):
        parse_networks(many)


def test_thousands_of_prefixes_use_few_probes() -> None:
    prefixes = PrefixSet([f"10.{i >> 8}.{i & 255}.0/24" for i in range(5000)] + ["192.0.2.1/32"])
    assert len(prefixes) == 5001
    assert ipaddress.IPv4Address("10.19.135.200") in prefixes  # the last: 4999 = 19 * 256 + 135
    assert ipaddress.IPv4Address("10.19.136.1") not in prefixes
    assert len(prefixes._v4) == 2  # two distinct lengths: two probes per lookup


def test_empty_lists_compile_to_nothing() -> None:
    assert AclLists().compile() is None
    acl = AclLists(deny=("10.0.0.0/8",)).compile()
    assert acl is not None and acl.allow is None


def test_a_list_set_at_runtime_survives_a_reload_that_leaves_the_file_list_alone() -> None:
    loaded = AclLists.from_file(["10.0.0.0/8"], ["192.0.2.0/24"], "peer")
    blocked = loaded.replaced("deny", ["192.0.2.0/24", "198.51.100.0/24"])
    assert blocked.changed_at_runtime
    again = AclLists.from_file(["10.0.0.0/8"], ["192.0.2.0/24"], "peer", blocked)
    assert again.deny == ("192.0.2.0/24", "198.51.100.0/24")
    edited = AclLists.from_file(["10.0.0.0/8"], ["203.0.113.0/24"], "peer", again)
    assert edited.deny == ("203.0.113.0/24",) and not edited.changed_at_runtime
    # The allow list is judged on its own: the file changing it replaces it, deny is untouched.
    both = AclLists.from_file(["10.0.0.0/16"], ["192.0.2.0/24"], "proxy_header", blocked)
    assert both.allow == ("10.0.0.0/16",) and both.deny == blocked.deny and both.on == "proxy_header"

"""Allow/deny lists as kernel interval sets (kernel/acl.py), and the nft text and JSON that write
them (ruleset.py): merging, element forms, diffs. No kernel here: tests/netns/test_kernel_acl.py
loads them into one."""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given
from hypothesis import strategies as st

from pointsman.kernel.acl import (
    KernelAcl,
    element_json,
    element_text,
    kernel_acl,
    merged,
    set_diff,
)
from pointsman.kernel.program import Programmed, fallback, plan
from pointsman.kernel.ruleset import acl_commands, listener_text
from pointsman.protect.acl import AclLists, PrefixSet

from .helpers import view
from .test_ruleset import rules, spec

V4_ALL = (0, 2**32 - 1)


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def test_overlapping_and_adjacent_prefixes_merge() -> None:
    assert merged(["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "192.0.2.7"], 4) == (
        (ip("10.0.0.0"), ip("11.255.255.255")), (ip("192.0.2.7"), ip("192.0.2.7")))


def test_other_family_is_left_out_and_mapped_prefixes_are_ipv4() -> None:
    assert merged(["2001:db8::/32", "::ffff:192.0.2.0/120"], 4) == ((ip("192.0.2.0"), ip("192.0.2.255")),)
    assert merged(["10.0.0.0/8", "2001:db8::/32"], 6) == (
        (ip("2001:db8::"), ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")),)


def test_empty_allow_list_allows_the_whole_family() -> None:
    assert kernel_acl(AclLists(), 4) == KernelAcl(4, (V4_ALL,), ())
    assert kernel_acl(AclLists(), 6).allow == ((0, 2**128 - 1),)
    # An allow list of the other family only: nobody of this family passes (as in the proxy).
    only_v6 = AclLists(allow=("2001:db8::/32",))
    assert kernel_acl(only_v6, 4).allow == ()


def test_element_forms() -> None:
    assert element_text((ip("192.0.2.7"), ip("192.0.2.7")), 4) == "192.0.2.7"
    assert element_text((ip("10.0.0.0"), ip("10.255.255.255")), 4) == "10.0.0.0/8"
    assert element_text((ip("10.0.0.3"), ip("10.0.0.9")), 4) == "10.0.0.3-10.0.0.9"
    assert element_text(V4_ALL, 4) == "0.0.0.0/0"
    assert element_text((ip("2001:db8::"), ip("2001:db8::ffff")), 6) == "2001:db8::/112"
    assert element_json((ip("10.0.0.0"), ip("10.255.255.255")), 4) == {
        "prefix": {"addr": "10.0.0.0", "len": 8}}
    assert element_json((ip("10.0.0.3"), ip("10.0.0.9")), 4) == {"range": ["10.0.0.3", "10.0.0.9"]}
    assert element_json((ip("fd00::1"), ip("fd00::1")), 6) == "fd00::1"


prefixes_v4 = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: str(ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]), t[1])))),
    max_size=12)


@given(prefixes_v4, st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_merged_matches_what_the_proxy_matches(prefixes: list[str], probes: list[int]) -> None:
    intervals = merged(prefixes, 4)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(intervals))  # disjoint, apart
    proxy = PrefixSet(prefixes)
    edges = [x for first, last in intervals
             for x in (first, last, max(first - 1, 0), min(last + 1, 2**32 - 1))]
    for address in probes + edges:
        in_kernel = any(first <= address <= last for first, last in intervals)
        assert in_kernel == proxy.has(4, address)


@given(prefixes_v4, prefixes_v4)
def test_diff_turns_old_into_new(old: list[str], new: list[str]) -> None:
    a, b = merged(old, 4), merged(new, 4)
    diff = set_diff(a, b)
    assert (set(a) - set(diff.delete)) | set(diff.add) == set(b)
    kept = set(a) - set(diff.delete)
    assert not kept & set(diff.add)


def test_sets_and_rules_are_in_the_listener_text() -> None:
    acl = kernel_acl(AclLists(allow=("10.0.0.0/8",), deny=("10.1.0.0/16", "10.2.0.0/16")), 4)
    text = listener_text(spec(), acl=acl)
    lines = text.splitlines()
    assert "add set inet pointsman l_web_deny { type ipv4_addr ; flags interval ; }" in lines
    assert "add set inet pointsman l_web_allow { type ipv4_addr ; flags interval ; }" in lines
    assert "add element inet pointsman l_web_allow { 10.0.0.0/8 }" in lines
    # 10.1/16 and 10.2/16 are adjacent but not one prefix: one range
    assert "add element inet pointsman l_web_deny { 10.1.0.0-10.2.255.255 }" in lines
    # the sets are filled before the rules that use them, in the same transaction
    assert lines.index("add element inet pointsman l_web_allow { 10.0.0.0/8 }") < next(
        i for i, line in enumerate(lines) if line.startswith("add rule"))


def test_no_lists_write_an_open_allow_set() -> None:
    lines = listener_text(spec()).splitlines()
    assert "add element inet pointsman l_web_allow { 0.0.0.0/0 }" in lines
    assert not any(line.startswith("add element inet pointsman l_web_deny") for line in lines)


def test_ipv6_sets() -> None:
    acl = kernel_acl(AclLists(deny=("fd00::100/128", "10.0.0.0/8")), 6)
    text = listener_text(spec(family="ip6", vip="fd00::1"), acl=acl)
    assert "add set inet pointsman l_web_deny { type ipv6_addr ; flags interval ; }" in text
    assert "add element inet pointsman l_web_deny { fd00::100 }" in text
    assert "add element inet pointsman l_web_allow { ::/0 }" in text
    assert rules(text, "l_web_dnat")[0].startswith(
        'ip6 daddr fd00::1 tcp dport 80 ip6 saddr @l_web_deny counter name "l_web_new"')


def test_stateless_udp_drops_every_denied_datagram_without_counting_new() -> None:
    text = listener_text(spec(nat="stateless", protocol="udp", snat=False))
    assert rules(text, "l_web_sin")[0:2] == [
        'ip saddr @l_web_deny counter name "l_web_denied" drop',
        'ip saddr != @l_web_allow counter name "l_web_denied" drop']


def test_commands_change_only_what_changed() -> None:
    before = kernel_acl(AclLists(deny=("192.0.2.0/24", "198.51.100.7")), 4)
    after = kernel_acl(AclLists(deny=("192.0.2.0/24", "203.0.113.0/25")), 4)
    commands = acl_commands(spec(), before, after)
    ref = {"family": "inet", "table": "pointsman", "name": "l_web_deny"}
    assert commands == [
        {"delete": {"element": {**ref, "elem": ["198.51.100.7"]}}},
        {"add": {"element": {**ref, "elem": [{"prefix": {"addr": "203.0.113.0", "len": 25}}]}}},
    ]
    assert acl_commands(spec(), after, after) == []


def test_commands_replace_both_sets_when_the_kernel_state_is_unknown() -> None:
    acl = kernel_acl(AclLists(deny=("192.0.2.0/24",)), 4)
    commands = acl_commands(spec(), None, acl)
    assert [next(iter(c)) for c in commands] == ["flush", "add", "flush", "add"]
    assert commands[1]["add"]["element"]["elem"] == [{"prefix": {"addr": "0.0.0.0", "len": 0}}]


def test_plan_writes_a_list_change_with_the_slot_diff_and_the_fallback_replaces_the_sets() -> None:
    listener_spec = spec()
    backends = [view(i) for i in range(3)]
    first = plan(Programmed(), listener_spec, backends)
    assert first.text is not None and "l_web_allow { 0.0.0.0/0 }" in first.text
    lists = AclLists(deny=("192.0.2.0/24",))
    acl = kernel_acl(lists, 4)
    second = plan(first.after, listener_spec, backends, lists)
    assert second.text is None and second.after.acl == acl
    assert second.commands == acl_commands(listener_spec, first.after.acl, acl)
    replace = fallback(second)[1]  # after the joining backends, before the leaving ones
    assert {"flush": {"set": {"family": "inet", "table": "pointsman", "name": "l_web_deny"}}} in replace
    again = plan(second.after, listener_spec, backends, AclLists(deny=("192.0.2.0/24",)))
    assert again.commands == [] and again.after.acl is second.after.acl  # not merged again

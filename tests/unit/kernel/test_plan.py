"""Listener specs and slot tables: what the kernel is told to do, decided without a kernel."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.balance.base import Candidate
from pointsman.balance.maglev import Maglev
from pointsman.config.loader import load_text
from pointsman.kernel.plan import (
    KernelConfigError,
    SlotDiff,
    Target,
    VipPorts,
    slot_diff,
    slot_indices,
    slot_targets,
    spec_for,
)
from pointsman.pool.state import BackendState

from .helpers import listener, pool, view


def test_spec_for_a_maglev_listener() -> None:
    spec = spec_for(listener(), pool(hash_key="source_ip_port"))
    assert (spec.family, spec.vip, spec.port, spec.protocol) == ("ip", "10.99.100.1", 80, "tcp")
    assert (spec.slots, spec.algorithm, spec.dispatch, spec.hash_key, spec.snat) == (
        13, "maglev", "jhash", "source_ip_port", True)


def test_spec_for_round_robin_udp_without_snat() -> None:
    spec = spec_for(listener(protocol="udp", kernel={"slots": 13, "snat": "none"}),
                    pool(algorithm="round_robin"))
    assert (spec.protocol, spec.dispatch, spec.snat) == ("udp", "numgen", False)


def test_spec_for_ipv6() -> None:
    backends = [{"address": "[fd00::11]:8080"}, {"address": "[fd00:0::12]:8080"}]
    spec = spec_for(listener(bind="[fd00::1]:80"), pool(backends=backends))
    assert (spec.family, spec.vip) == ("ip6", "fd00::1")


@pytest.mark.parametrize(("listener_overrides", "pool_overrides", "message"), [
    ({}, {"algorithm": "least_connections"}, "least_connections is not available in the kernel"),
    ({}, {"algorithm": "source_hash"}, "source_hash is not available"),
    ({}, {"affinity": {}}, "affinity is not available"),
    ({}, {"proxy_protocol": {"send": "v2"}}, "proxy_protocol.send"),
    ({}, {"source": {"mode": "transparent"}}, "source addresses are for the proxy"),
    ({"bind": "0.0.0.0:80"}, {}, "specific address"),
    ({"kernel": {"slots": 4096}}, {}, "must be prime"),
    ({"proxy_protocol": {"accept": "required"}}, {}, "proxy_protocol.accept"),
    ({"limits": {"max_connections_per_source": 3}}, {}, "limits"),
    ({"bind": "[fd00::1]:80"}, {}, "IPv4 behind an IPv6 VIP"),
    ({"acl_on": "proxy_header"}, {}, "acl_on: proxy_header needs the proxy data plane"),
    ({"bind": ["10.99.100.1:80", "[fd00::1]:80"]}, {}, "mixes IPv4 and IPv6"),
    ({"bind": "10.99.100.1:80-81", "kernel": {"slots": 13, "nat": "stateless", "snat": "none"}}, {},
     "nat: stateless needs one address and one port"),
    ({"bind": ["10.99.100.1:80", "10.99.100.2:80"],
      "kernel": {"slots": 13, "nat": "stateless", "snat": "none"}}, {},
     "nat: stateless needs one address and one port"),
])
def test_refuses_what_the_kernel_cannot_do(listener_overrides: dict[str, object],
                                           pool_overrides: dict[str, object], message: str) -> None:
    with pytest.raises(KernelConfigError, match=message) as info:
        spec_for(listener(**listener_overrides), pool(**pool_overrides))
    assert "listener web (dataplane: kernel)" in str(info.value)


def test_spec_for_a_port_range_and_an_address_list() -> None:
    spec = spec_for(listener(bind=["10.99.100.1:30000-30100", "10.99.100.2:80"]), pool())
    assert (spec.vip, spec.port) == ("10.99.100.1", 30000)
    assert spec.entries == (VipPorts("10.99.100.1", 30000, 30100), VipPorts("10.99.100.2", 80, 80))
    assert [e.ports for e in spec.entries] == ["30000-30100", "80"]
    single = spec_for(listener(), pool())
    assert single.binds == () and single.entries == (VipPorts("10.99.100.1", 80, 80),)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(KernelConfigError) as info:
        spec_for(listener(kernel={"slots": 4096}), pool(algorithm="power_of_two"))
    assert len(info.value.issues) == 2


def test_maglev_slots_are_the_userspace_table() -> None:
    backends = [view(0), view(1, weight=3), view(2)]
    table = slot_indices("maglev", backends, 13)
    candidates = [Candidate(b.id, b.effective_weight) for b in backends]
    assert table == list(Maglev(candidates, 13, home_weights=[1.0, 3.0, 1.0]).table)


def test_maglev_down_backend_gives_up_only_its_slots() -> None:
    up = slot_indices("maglev", [view(0), view(1), view(2)], 4093)
    down = slot_indices("maglev", [view(0), view(1, state=BackendState.DOWN), view(2)], 4093)
    moved = [i for i in range(4093) if up[i] != down[i]]
    assert moved and all(up[i] == 1 for i in moved)
    assert 1 not in down


def test_round_robin_slots_rotate_over_available() -> None:
    table = slot_indices("round_robin", [view(0), view(1, state=BackendState.DRAINING), view(2)], 13)
    assert table == [0, 2] * 6 + [0]


def test_weighted_round_robin_slots_follow_weights() -> None:
    table = slot_indices("weighted_round_robin", [view(0, weight=1), view(1, weight=3)], 4093)
    counts = Counter(table)
    assert abs(counts[1] / counts[0] - 3) < 0.01
    assert table[:4] == [1, 0, 1, 1]  # smooth (nginx order): the light one is not left to the end


def test_no_backend_leaves_every_slot_empty() -> None:
    down = [view(0, state=BackendState.DOWN)]
    for algorithm in ("maglev", "round_robin", "weighted_round_robin"):
        assert slot_targets(algorithm, down, 7) == [None] * 7


def test_unsupported_algorithm() -> None:
    with pytest.raises(ValueError, match="not available"):
        slot_indices("least_connections", [view(0)], 7)


def test_slot_targets_are_addresses() -> None:
    assert set(slot_targets("round_robin", [view(0), view(1)], 7)) == {
        ("10.99.11.2", 8080), ("10.99.12.2", 8080)}


def _apply(old: list[Target | None], diff: SlotDiff) -> list[Target | None]:
    new = list(old)
    for i in diff.delete:
        assert new[i] is not None
        new[i] = None
    for i, target in diff.add:
        assert new[i] is None
        new[i] = target
    return new


_targets = st.lists(st.one_of(st.none(), st.sampled_from([("10.0.0.1", 1), ("10.0.0.2", 1)])),
                    min_size=7, max_size=7)


@given(_targets, _targets)
def test_diff_turns_old_into_new(old: list[Target | None], new: list[Target | None]) -> None:
    diff = slot_diff(old, new)
    assert _apply(old, diff) == new
    assert len(diff) <= 2 * sum(a != b for a, b in zip(old, new, strict=True))


def test_diff_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        slot_diff([None], [None, None])


def test_spec_for_stateless() -> None:
    spec = spec_for(listener(kernel={"slots": 13, "nat": "stateless", "snat": "none"}),
                    pool(hash_key="source_ip_port"))
    assert (spec.nat, spec.stateless, spec.snat, spec.dispatch) == ("stateless", True, False, "jhash")
    assert spec_for(listener(), pool()).nat == "conntrack"


@pytest.mark.parametrize("algorithm", ["round_robin", "weighted_round_robin"])
def test_stateless_needs_a_hash_of_the_flow(algorithm: str) -> None:
    with pytest.raises(KernelConfigError, match="nat: stateless needs algorithm maglev"):
        spec_for(listener(kernel={"slots": 13, "nat": "stateless", "snat": "none"}),
                 pool(algorithm=algorithm))


def test_every_kernel_example_in_the_docs_is_one_the_kernel_takes() -> None:
    page = Path(__file__).resolve().parents[3] / "docs" / "kernel.md"
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)
              if "listeners:" in b and "pools:" in b]
    assert len(blocks) >= 3
    for block in blocks:
        config = load_text(block, "kernel.md")
        pools = {p.name: p for p in config.pools}
        for item in config.listeners:
            spec_for(item, pools[item.fallback_pool])

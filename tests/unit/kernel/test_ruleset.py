"""The nftables text and JSON pointsman writes (checked as text here; loaded into a real kernel by
tests/netns/test_kernel_dataplane.py)."""

from __future__ import annotations

from pointsman.kernel.plan import ListenerSpec, SlotDiff
from pointsman.kernel.ruleset import (
    Names,
    add_backend_commands,
    listener_text,
    remove_backend_commands,
    remove_listener_text,
    replace_slots_commands,
    slot_commands,
    stop_dnat_text,
)


def spec(**overrides: object) -> ListenerSpec:
    values: dict[str, object] = {
        "name": "web", "family": "ip", "vip": "10.99.100.1", "port": 80, "protocol": "tcp",
        "slots": 13, "algorithm": "maglev", "dispatch": "jhash", "hash_key": "source_ip",
        "snat": True, "seed": 0x706D616E,
    }
    values.update(overrides)
    return ListenerSpec(**values)  # type: ignore[arg-type]


def rules(text: str, chain: str) -> list[str]:
    prefix = f"add rule inet pointsman {chain} "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def test_jhash_dnat_rule() -> None:
    text = listener_text(spec())
    assert rules(text, "l_web_dnat") == [
        'ip daddr 10.99.100.1 tcp dport 80 counter name "l_web_new" dnat ip addr . port to '
        "jhash ip saddr mod 13 seed 0x706d616e map @l_web_slots"]
    assert rules(text, "l_web_dnat_local") == rules(text, "l_web_dnat")


def test_hash_key_with_port() -> None:
    text = listener_text(spec(hash_key="source_ip_port", protocol="udp"))
    assert "jhash ip saddr . udp sport mod 13 seed 0x706d616e" in text


def test_numgen_for_round_robin() -> None:
    assert "to numgen inc mod 13 map @l_web_slots" in listener_text(spec(dispatch="numgen"))


def test_masquerade_only_with_snat() -> None:
    assert rules(listener_text(spec()), "l_web_snat")[-1].endswith(" masquerade")
    no_snat = rules(listener_text(spec(snat=False)), "l_web_snat")
    assert len(no_snat) == 1 and "masquerade" not in no_snat[0]


def test_guard_rejects_by_protocol() -> None:
    assert rules(listener_text(spec()), "l_web_guard")[0].endswith("reject with tcp reset")
    udp = rules(listener_text(spec(protocol="udp")), "l_web_guard")[0]
    assert udp.endswith("reject with icmpx port-unreachable")


def test_ipv6() -> None:
    text = listener_text(spec(family="ip6", vip="fd00::1"), [("fd00::11", 8080)])
    assert "typeof numgen inc mod 2 : ip6 daddr . tcp dport" in text
    assert "type ipv6_addr . inet_service : counter" in text
    assert "dnat ip6 addr . port to jhash ip6 saddr mod 13" in text
    assert "add element inet pointsman l_web_slots { 0 : fd00::11 . 8080 }" in text


def test_structure_is_idempotent_and_carries_the_map() -> None:
    text = listener_text(spec(), [("10.0.0.1", 80), None, ("10.0.0.2", 80)])
    lines = text.splitlines()
    assert lines[0] == "add table inet pointsman"
    assert not any(line.startswith(("create ", "delete ")) for line in lines)
    # every chain is flushed before its rules are added, then the map is replaced
    assert lines.index("flush chain inet pointsman l_web_dnat") < lines.index(
        next(line for line in lines if line.startswith("add rule inet pointsman l_web_dnat ")))
    assert lines[-2:] == ["flush map inet pointsman l_web_slots",
                          "add element inet pointsman l_web_slots { 0 : 10.0.0.1 . 80, 2 : 10.0.0.2 . 80 }"]


def test_empty_map_has_no_element_line() -> None:
    assert "add element" not in listener_text(spec(), [None] * 3)


def test_removal_deletes_rules_before_what_they_use() -> None:
    text = remove_listener_text("web", ["l_web_b0_new"])
    lines = text.splitlines()
    first_delete = next(i for i, line in enumerate(lines) if line.startswith("delete"))
    assert all(line.startswith("flush chain") for line in lines[:first_delete])
    assert lines.index("delete map inet pointsman l_web_bnew") < lines.index(
        "delete counter inet pointsman l_web_b0_new")
    assert lines.index("delete chain inet pointsman l_web_fwd") < lines.index(
        "delete chain inet pointsman l_web_count")


def test_stop_dnat_flushes_only_dnat_chains() -> None:
    assert stop_dnat_text("web") == ("flush chain inet pointsman l_web_dnat\n"
                                     "flush chain inet pointsman l_web_dnat_local\n")


def test_slot_commands() -> None:
    ref = {"family": "inet", "table": "pointsman", "name": "l_web_slots"}
    diff = SlotDiff(delete=(1, 2), add=((2, ("10.0.0.1", 80)),))
    assert slot_commands("web", diff) == [
        {"delete": {"element": {**ref, "elem": [1, 2]}}},
        {"add": {"element": {**ref, "elem": [[2, {"concat": ["10.0.0.1", 80]}]]}}},
    ]
    assert slot_commands("web", SlotDiff((), ())) == []
    assert replace_slots_commands("web", [None, ("10.0.0.1", 80)]) == [
        {"flush": {"map": ref}},
        {"add": {"element": {**ref, "elem": [[1, {"concat": ["10.0.0.1", 80]}]]}}},
    ]


def test_backend_counters_come_and_go_in_order() -> None:
    add = add_backend_commands("web", 4, ("10.0.0.1", 80))
    assert [next(iter(c["add"])) for c in add] == ["counter", "element"] * 3
    assert add[1]["add"]["element"]["elem"] == [[{"concat": ["10.0.0.1", 80]}, "l_web_b4_new"]]
    remove = remove_backend_commands("web", 4, ("10.0.0.1", 80))
    assert [next(iter(c["delete"])) for c in remove] == ["element"] * 3 + ["counter"] * 3


def test_names() -> None:
    names = Names("web-1.a")
    assert names.slots == "l_web-1.a_slots"
    assert names.backend_counter(3, "in") == "l_web-1.a_b3_in"
    assert names.owns("l_web-1.a_new") and not names.owns("l_web-1.ab_new")

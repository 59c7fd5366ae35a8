"""The nftables text and JSON pointsman writes (checked as text here; loaded into a real kernel by
tests/netns/test_kernel_dataplane.py)."""

from __future__ import annotations

from pointsman.kernel.plan import ListenerSpec, SlotDiff, VipPorts
from pointsman.kernel.ruleset import (
    Names,
    add_backend_commands,
    listener_text,
    remove_backend_commands,
    remove_listener_text,
    replace_slots_commands,
    slot_commands,
    stop_new_flows_text,
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
        'ip daddr 10.99.100.1 tcp dport 80 ip saddr @l_web_deny counter name "l_web_new" '
        'counter name "l_web_denied" drop',
        'ip daddr 10.99.100.1 tcp dport 80 ip saddr != @l_web_allow counter name "l_web_new" '
        'counter name "l_web_denied" drop',
        "ip daddr 10.99.100.1 tcp dport 80 dnat ip addr . port to "
        "jhash ip saddr mod 13 seed 0x706d616e map @l_web_slots"]
    assert rules(text, "l_web_dnat_local") == rules(text, "l_web_dnat")
    # A DNATed flow counts in its backend's `new`; a refused one in the listener's.
    refuse = ('ip daddr 10.99.100.1 tcp dport 80 counter name "l_web_new" counter name "l_web_rejected" '
              "reject with tcp reset")
    # A late FIN or RST of a flow conntrack forgot (invalid) is refused, never counted.
    stray = "ip daddr 10.99.100.1 tcp dport 80 ct state invalid reject with tcp reset"
    assert rules(text, "l_web_guard") == rules(text, "l_web_guard_local") == [stray, refuse]
    # No listener counter on the forwarding path: its totals are the backends' sums.
    assert rules(text, "l_web_count") == [
        "ct direction original counter name ip daddr . tcp dport map @l_web_bin",
        "ct direction reply counter name ip saddr . tcp sport map @l_web_bout"]
    assert "l_web_in" not in text and "l_web_out" not in text


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
    assert "add element inet pointsman l_web_slots" not in listener_text(spec(), [None] * 3)


def test_removal_deletes_rules_before_what_they_use() -> None:
    text = remove_listener_text(spec(), ["l_web_b0_new"])
    lines = text.splitlines()
    first_delete = next(i for i, line in enumerate(lines) if line.startswith("delete"))
    assert all(line.startswith("flush chain") for line in lines[:first_delete])
    assert lines.index("delete map inet pointsman l_web_bnew") < lines.index(
        "delete counter inet pointsman l_web_b0_new")
    assert lines.index("delete chain inet pointsman l_web_fwd") < lines.index(
        "delete chain inet pointsman l_web_count")


def test_stop_dnat_flushes_only_dnat_chains() -> None:
    assert stop_new_flows_text(spec()) == ("flush chain inet pointsman l_web_dnat\n"
                                           "flush chain inet pointsman l_web_dnat_local\n")


def test_slot_commands() -> None:
    ref = {"family": "inet", "table": "pointsman", "name": "l_web_slots"}
    diff = SlotDiff(delete=(1, 2), add=((2, ("10.0.0.1", 80)),))
    assert slot_commands(spec(), diff) == [
        {"delete": {"element": {**ref, "elem": [1, 2]}}},
        {"add": {"element": {**ref, "elem": [[2, {"concat": ["10.0.0.1", 80]}]]}}},
    ]
    assert slot_commands(spec(), SlotDiff((), ())) == []
    assert replace_slots_commands(spec(), [None, ("10.0.0.1", 80)]) == [
        {"flush": {"map": ref}},
        {"add": {"element": {**ref, "elem": [[1, {"concat": ["10.0.0.1", 80]}]]}}},
    ]


def test_backend_counters_come_and_go_in_order() -> None:
    add = add_backend_commands(spec(), 4, ("10.0.0.1", 80))
    assert [next(iter(c["add"])) for c in add] == ["counter", "element"] * 3
    assert add[1]["add"]["element"]["elem"] == [[{"concat": ["10.0.0.1", 80]}, "l_web_b4_new"]]
    remove = remove_backend_commands(spec(), 4, ("10.0.0.1", 80))
    assert [next(iter(c["delete"])) for c in remove] == ["element"] * 3 + ["counter"] * 3


def test_names() -> None:
    names = Names("web-1.a")
    assert names.slots == "l_web-1.a_slots"
    assert names.backend_counter(3, "in") == "l_web-1.a_b3_in"
    assert names.owns("l_web-1.a_new") and not names.owns("l_web-1.ab_new")


def test_a_port_range_is_one_rule_and_each_address_its_own() -> None:
    text = listener_text(spec(binds=(VipPorts("10.99.100.1", 30000, 30100),
                                     VipPorts("10.99.100.2", 80, 80))))
    dnat = [r for r in rules(text, "l_web_dnat") if " dnat " in r]
    assert [r.split(" dnat")[0] for r in dnat] == ["ip daddr 10.99.100.1 tcp dport 30000-30100",
                                                       "ip daddr 10.99.100.2 tcp dport 80"]
    assert all(r.endswith("map @l_web_slots") for r in dnat)  # to the backend's own port
    assert len(rules(text, "l_web_dnat")) == 6  # deny, allow, dnat per entry
    assert [r.split(" counter")[0] for r in rules(text, "l_web_guard")
            if "invalid" not in r] == [
        "ip daddr 10.99.100.1 tcp dport 30000-30100", "ip daddr 10.99.100.2 tcp dport 80"]
    assert "ct original ip daddr 10.99.100.1 ct original proto-dst 30000-30100 jump l_web_count" in text
    assert "ct original ip daddr 10.99.100.2 ct original proto-dst 80 masquerade" in text


def test_removal_deletes_the_acl_sets_after_the_rules() -> None:
    lines = remove_listener_text(spec()).splitlines()
    assert lines.index("delete set inet pointsman l_web_deny") > lines.index(
        "delete chain inet pointsman l_web_dnat")
    assert "delete counter inet pointsman l_web_denied" in lines


# --- nat: stateless ----------------------------------------------------------------------------------


def stateless(**overrides: object) -> ListenerSpec:
    return spec(nat="stateless", snat=False, hash_key="source_ip_port", **overrides)


B0 = {("10.0.0.1", 80): 0}


def test_stateless_rules_notrack_and_rewrite_both_ways() -> None:
    text = listener_text(stateless(), backends={("10.0.0.1", 8080): 0})
    index = "jhash ip saddr . th sport mod 13 seed 0x706d616e"  # th: no protocol test
    # One base chain per hook for every stateless listener: verdict maps dispatch to the listener.
    # IPv4 first, a family's rules together: an IPv4 packet never meets an IPv6 rule first.
    # Each shared lookup behind a port bitmap: what belongs to no listener fails there.
    def shared(fam: str, v: int) -> tuple[str, str, str]:
        key = "meta l4proto . th"
        return (f"meta nfproto ipv{v} th dport @stateless_vports {fam} daddr . {key} dport "
                f"vmap @stateless_vips{v}",
                f"meta nfproto ipv{v} th sport @stateless_bports {fam} saddr . {key} sport "
                f"@stateless_replies{v} fib daddr type != local notrack accept",
                f"meta nfproto ipv{v} th sport @stateless_bports {fam} saddr . {key} sport "
                f"vmap @stateless_rev{v}")

    (vips4, replies4, rev4), (vips6, replies6, rev6) = shared("ip", 4), shared("ip6", 6)
    assert rules(text, "stateless_in") == [vips4, replies4, vips6, replies6]
    assert rules(text, "stateless_out") == [rev4, rev6]
    assert "add set inet pointsman stateless_vports { type inet_service ; }" in text
    assert "add element inet pointsman stateless_vports { 80 }" in text
    assert "add element inet pointsman stateless_bports { 8080 }" in text
    assert "add element inet pointsman stateless_vips4 { 10.99.100.1 . tcp . 80 : goto l_web_sin }" in text
    # One hash, one lookup: the slot's verdict is its backend's chain.
    # notrack is in the backends' chains: what is dropped or refused never reaches conntrack.
    assert rules(text, "l_web_sin") == [
        f"{index} vmap @l_web_slot_to",
        'ip daddr 10.99.100.1 tcp dport 80 tcp flags & (syn | ack) == syn counter name "l_web_new" '
        'counter name "l_web_rejected" reject with tcp reset',
        'ip daddr 10.99.100.1 tcp dport 80 counter name "l_web_rejected" reject with tcp reset',
    ]
    # the lists, for SYNs only (the backends' syn chains jump here; what passes returns)
    assert rules(text, "l_web_syn") == [
        'ip saddr @l_web_deny counter name "l_web_new" counter name "l_web_denied" drop',
        'ip saddr != @l_web_allow counter name "l_web_new" counter name "l_web_denied" drop',
    ]
    # The backend's chains write constants and count with named counters: no lookups.
    assert rules(text, "l_web_b0_sin") == [
        "tcp flags & (syn | ack) == syn goto l_web_b0_syn",
        'notrack ip daddr set 10.0.0.1 tcp dport set 8080 counter name "l_web_b0_in" accept']
    assert rules(text, "l_web_b0_syn") == [
        "jump l_web_syn",
        'notrack ip daddr set 10.0.0.1 tcp dport set 8080 counter name "l_web_b0_new" '
        'counter name "l_web_b0_in" accept']
    assert rules(text, "l_web_b0_rev") == [
        'counter name "l_web_b0_out" ip saddr set 10.99.100.1 tcp sport set 80']
    assert "add element inet pointsman stateless_rev4 { 10.0.0.1 . tcp . 8080 : goto l_web_b0_rev }" in text
    assert "l_web_in" not in text and "l_web_out" not in text and "map @l_web_b" not in text
    assert rules(text, "l_web_guard") == []  # the guard is l_web_sin's last rule
    assert rules(text, "l_web_guard_local")[0].endswith("reject with tcp reset")
    # raw before conntrack; replies rewritten after routing
    assert "stateless_in { type filter hook prerouting priority -300 ;" in text
    assert "stateless_out { type filter hook postrouting priority 100 ;" in text
    assert "add chain inet pointsman l_web_b0_rev\n" in text  # a regular chain: the dispatch jumps


def test_stateless_same_port_is_not_rewritten() -> None:
    text = listener_text(stateless(), backends=B0)
    assert rules(text, "l_web_b0_sin")[1] == 'notrack ip daddr set 10.0.0.1 counter name "l_web_b0_in" accept'
    assert rules(text, "l_web_b0_rev") == ['counter name "l_web_b0_out" ip saddr set 10.99.100.1']
    # the JSON a joining backend's chains are written with says the same as the text
    add = add_backend_commands(stateless(), 0, ("10.0.0.1", 80))
    exprs = {c["add"]["rule"]["chain"]: c["add"]["rule"]["expr"] for c in add if "rule" in c.get("add", {})
             and c["add"]["rule"]["chain"] == "l_web_b0_rev"}
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    sin = [c["add"]["rule"]["expr"] for c in add
           if c.get("add", {}).get("rule", {}).get("chain") == "l_web_b0_sin"]
    assert sin[1] == [{"notrack": None}, {"mangle": {"key": daddr, "value": "10.0.0.1"}},
                      {"counter": "l_web_b0_in"}, {"accept": None}]
    flags = {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}
    assert sin[0] == [{"match": {"op": "==", "left": flags, "right": "syn"}},
                      {"goto": {"target": "l_web_b0_syn"}}]
    assert exprs["l_web_b0_rev"][0] == {"counter": "l_web_b0_out"}


def test_stateless_uses_no_conntrack_and_no_nat_chain() -> None:
    for protocol in ("tcp", "udp"):
        text = listener_text(stateless(protocol=protocol), [("10.0.0.1", 80)], backends=B0)
        assert " ct " not in text and "type nat" not in text and "dnat" not in text
        assert "masquerade" not in text


def test_stateless_udp_counts_no_new_flows() -> None:
    text = listener_text(stateless(protocol="udp"), [("10.0.0.1", 81)], backends={("10.0.0.1", 81): 0})
    assert not any("flags" in rule for rule in rules(text, "l_web_sin"))
    assert rules(text, "l_web_sin")[-1].endswith("reject with icmpx port-unreachable")
    assert "jhash ip saddr . th sport mod 13 seed 0x706d616e vmap @l_web_slot_to" in text
    assert rules(text, "l_web_b0_sin") == [
        'notrack ip daddr set 10.0.0.1 udp dport set 81 counter name "l_web_b0_in" accept']
    assert "udp sport set 80" in text
    assert rules(text, "l_web_b0_syn") == []  # there, empty: the same chains for either protocol


def test_stateless_ipv6() -> None:
    text = listener_text(stateless(family="ip6", vip="fd00::1"), [("fd00::11", 8080)],
                         backends={("fd00::11", 8080): 0})
    assert "jhash ip6 saddr . th sport mod 13 seed 0x706d616e vmap @l_web_slot_to" in text
    assert rules(text, "l_web_b0_sin")[1:] == [
        'notrack ip6 daddr set fd00::11 tcp dport set 8080 counter name "l_web_b0_in" accept']
    assert rules(text, "l_web_b0_rev") == [
        'counter name "l_web_b0_out" ip6 saddr set fd00::1 tcp sport set 80']
    assert ("add map inet pointsman stateless_vips6 "
            "{ type ipv6_addr . inet_proto . inet_service : verdict ; }") in text
    assert "add element inet pointsman stateless_vips6 { fd00::1 . tcp . 80 : goto l_web_sin }" in text


def test_stateless_slot_maps_are_filled_together() -> None:
    text = listener_text(stateless(), [("10.0.0.1", 80), None, ("10.0.0.2", 81)],
                         backends={("10.0.0.2", 81): 1, ("10.0.0.1", 80): 0})
    lines = text.splitlines()
    assert ("add element inet pointsman l_web_slot_to "
            "{ 0 : goto l_web_b0_sin, 2 : goto l_web_b1_sin }") in lines
    # the chains exist before the map elements that jump to them
    assert lines.index("add chain inet pointsman l_web_b1_sin") < lines.index(
        "flush map inet pointsman l_web_slot_to")
    add = "add element inet pointsman"
    assert lines[-6:] == [f"{add} stateless_replies4 {{ 10.0.0.1 . tcp . 80 }}",
                          f"{add} stateless_rev4 {{ 10.0.0.1 . tcp . 80 : goto l_web_b0_rev }}",
                          f"{add} stateless_replies4 {{ 10.0.0.2 . tcp . 81 }}",
                          f"{add} stateless_rev4 {{ 10.0.0.2 . tcp . 81 : goto l_web_b1_rev }}",
                          f"{add} stateless_vports {{ 80 }}",
                          f"{add} stateless_bports {{ 80, 81 }}"]


def test_stateless_slot_commands_name_the_backends_chains() -> None:
    diff = SlotDiff(delete=(1, 2), add=((2, ("10.0.0.1", 80)), (5, ("10.0.0.2", 81))))
    commands = slot_commands(stateless(), diff, {("10.0.0.1", 80): 0, ("10.0.0.2", 81): 7})
    by_map: dict[tuple[str, str], object] = {}
    for command in commands:
        (verb, body), = command.items()
        by_map[(verb, body["element"]["name"])] = body["element"]["elem"]

    def to(index: int) -> dict[str, dict[str, str]]:
        return {"goto": {"target": f"l_web_b{index}_sin"}}

    assert by_map == {("delete", "l_web_slot_to"): [1, 2], ("add", "l_web_slot_to"): [[2, to(0)], [5, to(7)]]}
    replaced = replace_slots_commands(stateless(), [None, ("10.0.0.1", 80)], B0)
    assert replaced == [{"flush": {"map": {"family": "inet", "table": "pointsman", "name": "l_web_slot_to"}}},
                        {"add": {"element": {"family": "inet", "table": "pointsman", "name": "l_web_slot_to",
                                             "elem": [[1, to(0)]]}}}]


def test_stateless_backends_join_with_their_chains_and_reply_entries() -> None:
    target = ("10.0.0.1", 81)
    add = add_backend_commands(stateless(), 4, target)
    ref = {"family": "inet", "table": "pointsman"}
    key = {"concat": ["10.0.0.1", "tcp", 81]}
    assert add[-3:] == [
        {"add": {"element": {**ref, "name": "stateless_bports", "elem": [81]}}},
        {"add": {"element": {**ref, "name": "stateless_replies4", "elem": [key]}}},
        {"add": {"element": {**ref, "name": "stateless_rev4",
                             "elem": [[key, {"goto": {"target": "l_web_b4_rev"}}]]}}}]
    chains = [c["add"]["chain"]["name"] for c in add if "chain" in c.get("add", {})]
    assert chains == ["l_web_b4_sin", "l_web_b4_syn", "l_web_b4_rev"]
    rules_ = {c["add"]["rule"]["chain"]: c["add"]["rule"]["expr"] for c in add if "rule" in c.get("add", {})}
    # (the last rule of each chain: the syn chain's first jumps to the lists)
    assert rules_["l_web_b4_syn"][-3:] == [{"counter": "l_web_b4_new"}, {"counter": "l_web_b4_in"},
                                           {"accept": None}]
    jumps = [c["add"]["rule"]["expr"] for c in add
             if c.get("add", {}).get("rule", {}).get("chain") == "l_web_b4_syn"]
    assert jumps[0] == [{"jump": {"target": "l_web_syn"}}]
    assert rules_["l_web_b4_rev"][0] == {"counter": "l_web_b4_out"}
    # counters before the chains that count in them
    first_chain = next(i for i, c in enumerate(add) if "chain" in c.get("add", {}))
    assert all("counter" in c.get("add", {}) or "element" in c.get("add", {}) for c in add[:first_chain])
    remove = remove_backend_commands(stateless(), 4, target)
    # the entry that jumps to l_web_b4_rev goes first, then its chains, then the counters
    assert [c["delete"]["element"]["name"] for c in remove[:2]] == ["stateless_rev4", "stateless_replies4"]
    deleted = [(verb, kind) for c in remove for verb, body in c.items() for kind in body]
    assert deleted.index(("delete", "chain")) < deleted.index(("delete", "counter"))
    assert not any(c.get("add", {}).get("element", {}).get("name", "").startswith("stateless")
                   for c in add_backend_commands(spec(), 4, target))
    assert not any("chain" in c.get("add", {}) for c in add_backend_commands(spec(), 4, target))


def test_stateless_stop_refuses_syns_only_for_tcp() -> None:
    assert stop_new_flows_text(stateless()) == (
        "insert rule inet pointsman l_web_sin tcp flags & (syn | ack) == syn "
        'counter name "l_web_new" counter name "l_web_rejected" reject with tcp reset\n')
    assert stop_new_flows_text(stateless(protocol="udp")) == (
        "flush chain inet pointsman l_web_sin\n"
        "add rule inet pointsman l_web_sin notrack\n"
        'add rule inet pointsman l_web_sin ip daddr 10.99.100.1 udp dport 80 counter name "l_web_rejected" '
        "reject with icmpx port-unreachable\n")


def test_stateless_removal() -> None:
    lines = remove_listener_text(stateless(), ["l_web_b0_in"], B0).splitlines()
    deleted = [line.split()[-1] for line in lines if line.startswith("delete chain")]
    # the slot map (it jumps to the backends' chains), then those (their syn chains jump to
    # l_web_syn), then the listener's
    assert deleted == ["l_web_b0_sin", "l_web_b0_syn", "l_web_b0_rev",
                       "l_web_guard_local", "l_web_sin", "l_web_syn"]
    assert lines.index("delete map inet pointsman l_web_slot_to") < lines.index(
        "delete chain inet pointsman l_web_b0_sin")
    assert lines.index("delete chain inet pointsman l_web_b0_rev") < lines.index(
        "delete counter inet pointsman l_web_b0_in")
    # its entries in the shared dispatch go first (added first: nft 1.0.6 has no `destroy`)
    assert lines[:6] == [
        "add element inet pointsman stateless_vips4 { 10.99.100.1 . tcp . 80 : goto l_web_sin }",
        "delete element inet pointsman stateless_vips4 { 10.99.100.1 . tcp . 80 }",
        "add element inet pointsman stateless_replies4 { 10.0.0.1 . tcp . 80 }",
        "delete element inet pointsman stateless_replies4 { 10.0.0.1 . tcp . 80 }",
        "add element inet pointsman stateless_rev4 { 10.0.0.1 . tcp . 80 : goto l_web_b0_rev }",
        "delete element inet pointsman stateless_rev4 { 10.0.0.1 . tcp . 80 }"]
    assert not any("stateless_in" in line or "stateless_out" in line for line in lines)  # shared
    assert "delete map inet pointsman l_web_slot_to" in lines
    assert not any("l_web_slots" in line or "l_web_dnat" in line for line in lines)


def test_switching_nat_mode_removes_only_the_other_modes_objects() -> None:
    to_stateless = listener_text(stateless(), previous="conntrack").splitlines()
    gone = [line.split()[-1] for line in to_stateless if line.startswith("delete ")]
    # (the chains are emptied first, so the map they named can go before them)
    assert gone == ["l_web_slots", "l_web_dnat", "l_web_dnat_local", "l_web_guard", "l_web_snat", "l_web_fwd",
                    "l_web_count"]
    back = listener_text(spec(), was=stateless(), backends=B0).splitlines()
    gone = [line.split()[-1] for line in back if line.startswith("delete ") and "element" not in line]
    assert gone == ["l_web_slot_to", "l_web_b0_sin", "l_web_b0_syn", "l_web_b0_rev", "l_web_sin", "l_web_syn"]
    assert back.index("delete element inet pointsman stateless_vips4 { 10.99.100.1 . tcp . 80 }") < \
        back.index("delete chain inet pointsman l_web_sin")
    same = listener_text(spec(), previous="conntrack").splitlines()
    assert not any(line.startswith("delete") for line in same)

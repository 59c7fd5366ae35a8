"""The `bgp:` config section: defaults, and every mistake reported with its line and field."""

from __future__ import annotations

import textwrap

import pytest

from pointsman.config.loader import ConfigError, load_text

SOURCE = "pointsman.yaml"

BASE = """
listeners:
  - name: web
    bind: "10.99.0.10:80"
    pool: web
pools:
  - name: web
    backends:
      - address: "127.0.0.1:9000"
"""

VALID = BASE + """
bgp:
  asn: 65001
  router_id: 10.0.11.1
  peers:
    - address: 10.0.11.254
      asn: 65000
  vips:
    - prefix: 10.99.0.10
      pool: web
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(textwrap.dedent(text).lstrip("\n"), SOURCE)
    return [str(issue) for issue in caught.value.issues]


def with_bgp(body: str) -> str:
    return BASE + "bgp:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ") + "\n"


def test_defaults() -> None:
    config = load_text(VALID, SOURCE)
    assert config.bgp is not None
    (peer,) = config.bgp.peers
    (vip,) = config.bgp.vips
    assert (peer.port, peer.hold_time, peer.local_address) == (179, 90.0, None)
    assert (vip.prefix, vip.pool, vip.listener, vip.min_available, vip.next_hop) == (
        "10.99.0.10/32", "web", None, 1, None)
    assert config.bgp.next_hop == "self"
    assert config.bgp.exabgp_command is None


def test_no_bgp_section_means_no_announcement() -> None:
    assert load_text(BASE, SOURCE).bgp is None


def test_every_key() -> None:
    config = load_text(with_bgp("""
        asn: 4200000000
        router_id: 10.0.11.1
        next_hop: 10.0.11.1
        exabgp_command: [/opt/exabgp/bin/exabgp]
        peers:
          - {address: 10.0.11.254, asn: 65000, port: 1179, hold_time: 9s, local_address: 10.0.11.1}
          - {address: "2001:db8::1", asn: 65000, hold_time: 0}
        vips:
          - {prefix: 10.99.0.10/32, pool: web, min_available: 2, next_hop: self}
          - {prefix: "2001:db8::10", listener: web, next_hop: "2001:db8::2"}
    """), SOURCE)
    assert config.bgp is not None
    assert [v.prefix for v in config.bgp.vips] == ["10.99.0.10/32", "2001:db8::10/128"]
    assert config.bgp.peers[1].hold_time == 0


@pytest.mark.parametrize(("body", "expected"), [
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.0/24, pool: web}]
     """, "pointsman.yaml:13: bgp.vips[0].prefix: a VIP is one address: expected a /32 or /128, "
          "got '10.99.0.0/24'"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, pool: web, listener: web}]
     """, "pointsman.yaml:13: bgp.vips[0]: a VIP needs exactly one of pool or listener"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000, hold_time: 2s}]
        vips: [{prefix: 10.99.0.10, pool: web}]
     """, "pointsman.yaml:12: bgp.peers[0]: hold_time must be 0 or between 3s and 65535s "
          "(RFC 4271 4.2)"),
    ("""
        asn: 0
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, pool: web}]
     """, "pointsman.yaml:10: bgp.asn: input should be greater than or equal to 1, got 0"),
    ("""
        asn: 65001
        router_id: "2001:db8::1"
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, pool: web}]
     """, "pointsman.yaml:9: bgp: router_id must be an IPv4 address (RFC 4271: a 4-octet BGP "
          "Identifier)"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: "2001:db8::10", pool: web}]
     """, "pointsman.yaml:9: bgp: vips[0]: no peer of the same IP version as 2001:db8::10/128; "
          "it would never be announced"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, pool: web}, {prefix: 10.99.0.10/32, pool: web}]
     """, "pointsman.yaml:9: bgp: vips[1]: duplicate prefix 10.99.0.10/32"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, pool: web, next_hop: "2001:db8::1"}]
     """, "pointsman.yaml:13: bgp.vips[0]: next_hop must be the same IP version as prefix"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, pool: nope}]
     """, "pointsman.yaml:13: bgp.vips[0].pool: no pool named 'nope'"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: [{address: 10.0.11.254, asn: 65000}]
        vips: [{prefix: 10.99.0.10, listener: nope}]
     """, "pointsman.yaml:13: bgp.vips[0].listener: no listener named 'nope'"),
    ("""
        asn: 65001
        router_id: 10.0.11.1
        peers: []
        vips: [{prefix: 10.99.0.10, pool: web}]
     """, "pointsman.yaml:12: bgp.peers: list should have at least 1 item after validation, "
          "not 0, got []"),
])
def test_mistakes_name_their_line_and_field(body: str, expected: str) -> None:
    assert errors(with_bgp(body)) == [expected]

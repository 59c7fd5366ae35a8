"""Config rules for issue 15's keys: each mistake named with its file, line and field."""

from __future__ import annotations

from tests.unit.config_support import SOURCE, errors, load


def test_the_new_keys_load() -> None:
    config = load("""
        listeners:
          - name: web
            bind: "127.0.0.1:8080"
            pool: web
            allow: [10.0.0.0/8, "2001:db8::/32", "::ffff:192.0.2.0/120"]
            deny: [10.9.0.1]
          - name: lb
            bind: "127.0.0.1:8081"
            pool: web
            proxy_protocol: {accept: required}
            acl_on: proxy_header
            deny: ["203.0.113.0/24"]
        pools:
          - name: web
            fallback_pool: sorry
            panic_threshold: 50%
            backends:
              - {address: "127.0.0.1:9001"}
              - {address: "127.0.0.1:9002", backup: true, health_check_address: "127.0.0.1:7001"}
            health_check: {type: exec, command: [/usr/lib/check, --fast], timeout: 1s}
          - name: sorry
            backends: [{address: "127.0.0.1:9003"}]
            health_check: {type: agent, address: "127.0.0.1:7002", send: "web\\n"}
    """)
    web = config.listeners[0]
    assert web.allow == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.0/24"]
    assert web.deny == ["10.9.0.1/32"] and web.acl_on == "peer"
    assert config.listeners[1].acl_on == "proxy_header"
    pool = config.pool("web")
    assert (pool.fallback_pool, pool.panic_threshold) == ("sorry", 0.5)
    assert pool.backends[1].backup and str(pool.backends[1].health_check_address) == "127.0.0.1:7001"
    assert pool.health_check is not None and pool.health_check.command == ["/usr/lib/check", "--fast"]
    sorry = config.pool("sorry").health_check
    assert sorry is not None and str(sorry.address) == "127.0.0.1:7002"


def test_fallback_pool_must_exist_and_never_cycle() -> None:
    assert errors("""
        listeners: [{name: l, bind: "127.0.0.1:1", pool: a}]
        pools:
          - name: a
            fallback_pool: b
            backends: [{address: "127.0.0.1:2"}]
          - name: b
            fallback_pool: a
            backends: [{address: "127.0.0.1:3"}]
          - name: c
            fallback_pool: c
            backends: [{address: "127.0.0.1:4"}]
          - name: d
            fallback_pool: nowhere
            backends: [{address: "127.0.0.1:5"}]
          - name: e
            fallback_pool: a
            backends: [{address: "127.0.0.1:6"}]
    """) == [
        f"{SOURCE}:4: pools[0].fallback_pool: fallback cycle: a -> b -> a",
        f"{SOURCE}:7: pools[1].fallback_pool: fallback cycle: b -> a -> b",
        f"{SOURCE}:10: pools[2].fallback_pool: fallback cycle: c -> c",
        f"{SOURCE}:13: pools[3].fallback_pool: no pool named 'nowhere'",
    ]


def test_fallback_rules_that_follow_the_listener() -> None:
    assert errors("""
        listeners:
          - {name: dns, bind: "127.0.0.1:53", protocol: udp, pool: a}
          - {name: k, bind: "127.0.0.1:80", pool: a, dataplane: kernel}
        pools:
          - name: a
            fallback_pool: b
            backends: [{address: "127.0.0.1:2"}]
          - name: b
            proxy_protocol: {send: v1}
            backends: [{address: "127.0.0.1:3"}]
    """) == [
        f"{SOURCE}:2: listeners[0].pool: pool 'b' (through fallback_pool) sends PROXY v1, which "
        "is for TCP only: use v2 for UDP",
        f"{SOURCE}:3: listeners[1].pool: pool 'a' has a fallback_pool, which the kernel data "
        "plane does not follow (use dataplane: proxy)",
    ]


def test_acl_mistakes() -> None:
    assert errors("""
        listeners:
          - name: a
            bind: "127.0.0.1:1"
            pool: p
            allow: [10.0.0.0/8, 10.0.0.0/33]
          - {name: b, bind: "127.0.0.1:3", pool: p, acl_on: header}
        pools: [{name: p, backends: [{address: "127.0.0.1:9"}]}]
    """) == [
        f"{SOURCE}:5: listeners[0].allow[1]: expected an address or prefix such as 10.0.0.0/8, "
        "got '10.0.0.0/33'",
        f"{SOURCE}:6: listeners[1].acl_on: expected one of 'peer' or 'proxy_header', got 'header'",
    ]
    assert errors("""
        listeners:
          - {name: a, bind: "127.0.0.1:1", pool: p, acl_on: proxy_header}
          - {name: k, bind: "127.0.0.1:2", pool: p, dataplane: kernel, deny: [192.0.2.0/24],
             acl_on: proxy_header, proxy_protocol: {accept: required}}
        pools: [{name: p, backends: [{address: "127.0.0.1:9"}]}]
    """) == [
        f"{SOURCE}:2: listeners[0].acl_on: proxy_header needs proxy_protocol.accept (required "
        "or optional): there is no header to judge",
        f"{SOURCE}:4: listeners[1].acl_on: the kernel data plane judges the packet's source "
        "address, not a PROXY header: use acl_on: peer (or dataplane: proxy)",
    ]


def test_health_check_mistakes() -> None:
    assert errors("""
        listeners: [{name: a, bind: "127.0.0.1:1", pool: p}]
        pools:
          - name: p
            backends: [{address: "127.0.0.1:9"}]
            health_check: {type: exec}
          - name: q
            backends: [{address: "127.0.0.1:9"}]
            health_check: {type: tcp, command: [/bin/true], address: "127.0.0.1:8", port: 8}
          - name: r
            backends:
              - {address: "127.0.0.1:9"}
              - {address: "127.0.0.1:10", health_check_address: "127.0.0.1:11"}
            health_check: {type: agent}
    """) == [
        f"{SOURCE}:5: pools[0].health_check.command: type exec needs command: [program, arg, ...]",
        f"{SOURCE}:8: pools[1].health_check.command: only type exec runs a command (type is tcp)",
        f"{SOURCE}:8: pools[1].health_check.port: address already names the port: give address "
        "or port, not both",
        f"{SOURCE}:13: pools[2].health_check.type: an agent listens on its own port: give port (on "
        "each backend's host) or address (or health_check_address on every backend)",
    ]
    assert errors("""
        listeners: [{name: a, bind: "127.0.0.1:1", pool: s}]
        pools:
          - name: s
            panic_threshold: 1.5
            backends: [{address: "127.0.0.1:9", backup: maybe}]
    """) == [
        f"{SOURCE}:4: pools[0].panic_threshold: expected a percentage between 0% and 100%, got 1.5",
        f"{SOURCE}:5: pools[0].backends[0].backup: input should be a valid boolean, unable to "
        "interpret input, got 'maybe'",
    ]

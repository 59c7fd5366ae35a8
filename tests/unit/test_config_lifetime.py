"""Config rules for tcp_keepalive and max_connection_duration (issue 15): each mistake named
with its file, line and field."""

from __future__ import annotations

import pytest

from pointsman.config.model import TcpKeepaliveConfig
from tests.unit.config_support import SOURCE, errors, load


def test_the_keys_load_as_written_in_the_issue() -> None:
    config = load("""
        listeners:
          - name: web
            bind: "127.0.0.1:8080"
            pool: web
            tcp_keepalive: {idle: 60s, interval: 10s, count: 6}
          - {name: plain, bind: "127.0.0.1:8081", pool: web}
        pools:
          - name: web
            tcp_keepalive: {idle: 2m, interval: 5, count: 3}
            max_connection_duration: 1h
            backends: [{address: "127.0.0.1:9001"}]
    """)
    assert config.listeners[0].tcp_keepalive == TcpKeepaliveConfig(idle=60, interval=10, count=6)
    assert config.listeners[1].tcp_keepalive is None  # off by default
    pool = config.pool("web")
    assert pool.tcp_keepalive == TcpKeepaliveConfig(idle=120, interval=5, count=3)
    assert pool.max_connection_duration == 3600.0


@pytest.mark.parametrize(("written", "expected"), [
    ("on", TcpKeepaliveConfig()), ("true", TcpKeepaliveConfig()), ("{}", TcpKeepaliveConfig()),
    ("off", None), ("false", None), ("{idle: 1s, interval: 1s, count: 1}",
                                     TcpKeepaliveConfig(idle=1, interval=1, count=1))])
def test_switch_words(written: str, expected: TcpKeepaliveConfig | None) -> None:
    config = load(f"""
        listeners: [{{name: a, bind: "127.0.0.1:1", pool: p, tcp_keepalive: {written}}}]
        pools: [{{name: p, backends: [{{address: "127.0.0.1:9"}}]}}]
    """)
    assert config.listeners[0].tcp_keepalive == expected
    assert TcpKeepaliveConfig() == TcpKeepaliveConfig(idle=60, interval=10, count=6)


def test_keepalive_mistakes_name_the_field() -> None:
    found = errors("""
        listeners:
          - name: a
            bind: "127.0.0.1:1"
            pool: p
            tcp_keepalive: {idle: 1500ms, interval: 0s, count: 128}
        pools:
          - name: p
            tcp_keepalive: {idle: 10h, intervall: 1s}
            backends: [{address: "127.0.0.1:9"}]
    """)
    whole = "must be whole seconds from 1s to 32767s (the kernel counts keepalive time in seconds)"
    assert found == [
        f"{SOURCE}:5: listeners[0].tcp_keepalive.count: input should be less than or equal to "
        "127, got 128",
        f"{SOURCE}:5: listeners[0].tcp_keepalive.idle: {whole}, got 1.5s",
        f"{SOURCE}:5: listeners[0].tcp_keepalive.interval: {whole}, got 0s",
        f"{SOURCE}:8: pools[0].tcp_keepalive.idle: {whole}, got 36000s",
        f"{SOURCE}:8: pools[0].tcp_keepalive.intervall: unknown key (did you mean 'interval'?)",
    ]


def test_duration_mistakes_name_the_field() -> None:
    assert errors("""
        listeners: [{name: a, bind: "127.0.0.1:1", pool: p}]
        pools:
          - name: p
            max_connection_duration: 0s
            backends: [{address: "127.0.0.1:9"}]
          - name: q
            max_connection_duration: 31d
            backends: [{address: "127.0.0.1:9"}]
    """)[0].startswith(f"{SOURCE}:4: pools[0].max_connection_duration: ")


def test_udp_and_the_kernel_data_plane_refuse_them() -> None:
    assert errors("""
        listeners:
          - {name: dns, bind: "127.0.0.1:53", protocol: udp, pool: p, tcp_keepalive: on}
          - {name: k, bind: "127.0.0.1:80", pool: q, dataplane: kernel, tcp_keepalive: on}
          - {name: k2, bind: "127.0.0.1:81", pool: p, dataplane: kernel}
        pools:
          - name: p
            tcp_keepalive: on
            max_connection_duration: 1h
            backends: [{address: "127.0.0.1:2"}]
          - {name: q, backends: [{address: "127.0.0.1:3"}]}
    """) == [
        f"{SOURCE}:2: listeners[0].tcp_keepalive: UDP has no keepalive (sessions end by "
        "session_timeout)",
        f"{SOURCE}:3: listeners[1].tcp_keepalive: the kernel data plane holds no client socket "
        "to keep alive (use dataplane: proxy)",
        f"{SOURCE}:4: listeners[2].pool: pool 'p' sets tcp_keepalive, which the kernel data plane "
        "does not apply (use dataplane: proxy)",
        f"{SOURCE}:4: listeners[2].pool: pool 'p' sets max_connection_duration, which the kernel "
        "data plane does not apply (use dataplane: proxy)",
    ]


def test_a_udp_listener_may_share_a_pool_that_has_them() -> None:
    """Pool keys are TCP-only: a UDP listener on the same pool ignores them (documented)."""
    config = load("""
        listeners:
          - {name: dns, bind: "127.0.0.1:53", protocol: udp, pool: p}
          - {name: dnst, bind: "127.0.0.1:53", pool: p}
        pools:
          - {name: p, tcp_keepalive: on, max_connection_duration: 1h,
             backends: [{address: "127.0.0.1:2"}]}
    """)
    assert config.pool("p").max_connection_duration == 3600.0

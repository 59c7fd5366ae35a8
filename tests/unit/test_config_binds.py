"""`listeners[].bind`: one address (a string, as before), a list, port ranges; errors with their
line (an entry of a list has its own), overlaps, the kernel data plane's limit, serialisation."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pointsman.config.addresses import MAX_BIND_PORTS, BindRange, Binds, HostPort, binds_of
from pointsman.config.loader import ConfigError, load_text
from pointsman.config.model import Config, ListenerConfig
from pointsman.config.node import load_node_text, overlay_local
from pointsman.config.preflight import Bind, needs

POOLS = """
pools:
  - name: p
    backends: [{address: "127.0.0.1:9000"}]
"""


def load(listeners: str) -> Config:
    return load_text(textwrap.dedent(listeners) + POOLS, "binds.yaml")


def problems(listeners: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(listeners)
    return [str(issue) for issue in caught.value.issues]


def test_one_address_stays_a_string() -> None:
    config = load("""
    listeners:
      - {name: a, bind: "127.0.0.1:8000", pool: p}
    """)
    bind = config.listeners[0].bind
    assert isinstance(bind, Binds)
    assert str(bind) == "127.0.0.1:8000" and bind.single == HostPort("127.0.0.1", 8000)
    assert config.listeners[0].model_dump(mode="json")["bind"] == "127.0.0.1:8000"


def test_a_list_and_ranges_expand_to_one_address_per_port() -> None:
    config = load("""
    listeners:
      - name: a
        bind: ["0.0.0.0:443", "[::]:443", "127.0.0.1:30000-30002"]
        pool: p
    """)
    listener = config.listeners[0]
    assert listener.addresses == (
        HostPort("0.0.0.0", 443), HostPort("::", 443), HostPort("127.0.0.1", 30000),
        HostPort("127.0.0.1", 30001), HostPort("127.0.0.1", 30002))
    assert str(listener.bind) == "0.0.0.0:443, [::]:443, 127.0.0.1:30000-30002"
    assert listener.model_dump(mode="json")["bind"] == ["0.0.0.0:443", "[::]:443",
                                                        "127.0.0.1:30000-30002"]
    with pytest.raises(ValueError, match="one address and one port"):
        _ = listener.bind.single


def test_a_range_alone_is_a_string() -> None:
    listener = load("""
    listeners:
      - {name: a, bind: "[::1]:7000-7001", pool: p}
    """).listeners[0]
    assert listener.addresses == (HostPort("::1", 7000), HostPort("::1", 7001))
    assert listener.model_dump(mode="json")["bind"] == "[::1]:7000-7001"


def test_a_bad_entry_of_a_list_names_its_own_line() -> None:
    assert problems("""
    listeners:
      - name: a
        bind:
          - "127.0.0.1:8000"
          - "127.0.0.1"
          - "127.0.0.1:9-3"
        pool: p
    """) == [
        "binds.yaml:6: listeners[0].bind[1]: expected host:port, got '127.0.0.1'",
        "binds.yaml:7: listeners[0].bind[2]: port range 9-3 ends before it starts, in "
        "'127.0.0.1:9-3'",
    ]


@pytest.mark.parametrize(("bind", "message"), [
    ('"127.0.0.1:0-3"', "expected a port between 1 and 65535"),
    ('"127.0.0.1:1-70000"', "expected a port between 1 and 65535"),
    ('"127.0.0.1:1-2000"', f"at most {MAX_BIND_PORTS} per listener"),
    ("[]", "at least 1 item"),
    ("{a: 1}", "expected host:port, host:first-last or a list of them"),
])
def test_bad_binds(bind: str, message: str) -> None:
    [problem] = problems(f"""
    listeners:
      - name: a
        bind: {bind}
        pool: p
    """)
    assert problem.startswith("binds.yaml:4: listeners[0].bind: ") and message in problem


def test_a_list_of_ranges_is_bounded_as_a_whole() -> None:
    [problem] = problems("""
    listeners:
      - name: a
        bind: ["127.0.0.1:1000-1999", "127.0.0.2:1000-1999"]
        pool: p
    """)
    assert problem == ("binds.yaml:4: listeners[0].bind: 2000 addresses; at most 1024 per "
                       "listener (each port is a socket per worker)")


def test_overlaps_within_and_between_listeners() -> None:
    assert problems("""
    listeners:
      - {name: a, bind: "127.0.0.1:8000-8010", pool: p}
      - name: b
        bind:
          - "127.0.0.1:7000"
          - "127.0.0.1:8005"
          - "127.0.0.1:6999-7001"
        pool: p
      - {name: c, bind: "127.0.0.1:8010", pool: p, protocol: udp}
    """) == [
        "binds.yaml:7: listeners[1].bind[1]: same address as listeners[0]",
        "binds.yaml:8: listeners[1].bind[2]: 127.0.0.1:7000 is also bound by an earlier entry",
    ]


def test_the_kernel_data_plane_takes_ranges_and_lists_of_one_family() -> None:
    load("""
    listeners:
      - {name: a, bind: ["10.0.0.1:80-81", "10.0.0.2:443"], pool: p, dataplane: kernel}
    """)
    assert problems("""
    listeners:
      - {name: a, bind: ["10.0.0.1:80", "[fd00::1]:80"], pool: p, dataplane: kernel}
      - {name: b, bind: "10.0.0.1:90-91", pool: p, dataplane: kernel,
         kernel: {nat: stateless, snat: none}}
    """) == [
        "binds.yaml:3: listeners[0].bind: the kernel data plane serves one address family per "
        "listener (got 10.0.0.1:80, [fd00::1]:80): use a listener per family",
        "binds.yaml:4: listeners[1].bind: kernel.nat: stateless takes one address and one port "
        "(got 10.0.0.1:90-91): use nat: conntrack for address lists and port ranges",
    ]


def test_round_trips_through_json_yaml_and_pickle() -> None:
    config = load("""
    listeners:
      - {name: a, bind: ["127.0.0.1:1-3", "[::1]:5"], pool: p}
      - {name: b, bind: "127.0.0.1:9", pool: p}
    """)
    dumped = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    assert load_text(dumped, "again.yaml", environ=None) == config
    assert pickle.loads(pickle.dumps(config)) == config  # the workers get it this way


def test_preflight_binds_every_address_at_its_entry() -> None:
    config = load("""
    listeners:
      - {name: a, bind: ["127.0.0.1:1-2", "[::1]:5"], pool: p}
      - {name: b, bind: "127.0.0.1:9", pool: p}
    """)
    binds = [(need.loc, need.address) for need in needs(config) if isinstance(need, Bind)]
    assert binds == [
        (("listeners", 0, "bind", 0), HostPort("127.0.0.1", 1)),
        (("listeners", 0, "bind", 0), HostPort("127.0.0.1", 2)),
        (("listeners", 0, "bind", 1), HostPort("::1", 5)),
        (("listeners", 1, "bind"), HostPort("127.0.0.1", 9)),
    ]


def test_a_fleet_node_may_bind_its_listener_to_a_list() -> None:
    node = load_node_text(textwrap.dedent("""
    node:
      name: lb-a
      binds: {web: ["127.0.0.1:8000", "127.0.0.2:8000-8001"], db: "127.0.0.1:5432"}
    config_source: {etcd: {endpoints: ["http://127.0.0.1:2379"], prefix: /pm/}}
    """))
    assert node.binds == {"web": ["127.0.0.1:8000", "127.0.0.2:8000-8001"], "db": "127.0.0.1:5432"}
    data = overlay_local({"listeners": [{"name": "web", "bind": "0.0.0.0:1", "pool": "p"}],
                          "pools": yaml.safe_load(POOLS)["pools"]}, {}, node.binds)
    listener = Config.model_validate(data).listeners[0]
    assert len(listener.addresses) == 3


entries = st.builds(
    lambda host, first, size: f"{host}:{first}" if size == 0 else f"{host}:{first}-{first + size}",
    st.sampled_from(["127.0.0.1", "[::1]", "0.0.0.0", "localhost"]),
    st.integers(1, 60000), st.integers(0, 5))


@given(st.lists(entries, min_size=1, max_size=4))
def test_any_bind_reads_back_as_written(written: list[str]) -> None:
    value: str | list[str] = written[0] if len(written) == 1 else written
    listener = ListenerConfig.model_validate({"name": "a", "bind": value, "pool": "p"})
    assert listener.bind.as_written() == value
    assert binds_of(value) == listener.bind
    assert all(isinstance(entry, BindRange) for entry in listener.bind)
    assert len(listener.addresses) == sum(e.last - e.first + 1 for e in listener.bind)

"""Socket activation: reading LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, matching passed sockets to
listener addresses by name or by address (with real sockets for what `inspect` reads)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import yaml

from pointsman.config.addresses import HostPort
from pointsman.config.loader import load_text
from pointsman.config.model import Config
from pointsman.node.activation import (
    SD_LISTEN_FDS_START,
    ActivationError,
    Inherited,
    PassedSocket,
    assign,
    inspect,
    parse_environment,
)


def cfg(*listeners: dict[str, object]) -> Config:
    return load_text(yaml.safe_dump({
        "listeners": list(listeners),
        "pools": [{"name": "p", "backends": [{"address": "127.0.0.1:9"}]}]}), "a.yaml")


def passed(fd: int, name: str, address: str | None, protocol: str | None = "tcp") -> PassedSocket:
    host, _, port = (address or ":0").rpartition(":")
    at = HostPort(host.strip("[]"), int(port)) if address else None
    return PassedSocket(fd, name, protocol, at)  # type: ignore[arg-type]


# --- the environment ----------------------------------------------------------------------------


def test_descriptors_from_three_with_their_names() -> None:
    env = {"LISTEN_FDS": "3", "LISTEN_PID": "42", "LISTEN_FDNAMES": "web:web:dns"}
    assert parse_environment(env, 42) == [(3, "web"), (4, "web"), (5, "dns")]
    assert parse_environment({"LISTEN_FDS": "2", "LISTEN_PID": "42"}, 42) == [(3, ""), (4, "")]


@pytest.mark.parametrize("env", [
    {},
    {"LISTEN_FDS": "1", "LISTEN_PID": "41"},  # for our parent: inherited, not ours
    {"LISTEN_FDS": "1"},
    {"LISTEN_FDS": "1", "LISTEN_PID": "x"},
])
def test_not_for_this_process(env: dict[str, str]) -> None:
    assert parse_environment(env, 42) == []


@pytest.mark.parametrize(("env", "message"), [
    ({"LISTEN_FDS": "two", "LISTEN_PID": "42"}, "LISTEN_FDS='two'"),
    ({"LISTEN_FDS": "0", "LISTEN_PID": "42"}, "LISTEN_FDS='0'"),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "42", "LISTEN_FDNAMES": "web"},
     "LISTEN_FDNAMES names 1 descriptors, LISTEN_FDS says 2"),
])
def test_a_malformed_environment_is_an_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match=message):
        parse_environment(env, 42)


# --- matching -------------------------------------------------------------------------------------


def test_by_name_and_by_address() -> None:
    config = cfg({"name": "web", "bind": ["0.0.0.0:443", "[::]:443"], "pool": "p"},
                 {"name": "dns", "bind": "127.0.0.1:53", "pool": "p", "protocol": "udp"},
                 {"name": "pg", "bind": "127.0.0.1:5432", "pool": "p"})
    found = assign(config.listeners, [
        passed(3, "web", "[::]:443"),
        passed(4, "web", "0.0.0.0:443"),
        passed(5, "pointsman.socket", "127.0.0.1:53", "udp"),  # unnamed: matched by address
        passed(6, "pointsman.socket", "127.0.0.1:5433"),  # nobody's
        passed(7, "pointsman.socket", "127.0.0.1:5432", "udp"),  # pg is tcp: not its socket
    ])
    assert found.fds == {("web", HostPort("::", 443)): 3, ("web", HostPort("0.0.0.0", 443)): 4,
                         ("dns", HostPort("127.0.0.1", 53)): 5}
    assert [s.fd for s in found.unused] == [6, 7]


def test_a_socket_named_after_a_listener_must_be_one_of_its_addresses() -> None:
    config = cfg({"name": "web", "bind": "0.0.0.0:443", "pool": "p"})
    with pytest.raises(ActivationError) as caught:
        assign(config.listeners, [passed(3, "web", "0.0.0.0:8443")])
    assert str(caught.value) == (
        "listener web: the passed socket fd 3 (web, 0.0.0.0:8443/tcp) is named after it but is "
        "not tcp on one of its addresses (0.0.0.0:443)")


def test_a_named_socket_is_not_taken_by_another_listener_at_its_address() -> None:
    config = cfg({"name": "a", "bind": "127.0.0.1:80", "pool": "p"},
                 {"name": "b", "bind": "127.0.0.1:80", "pool": "p", "protocol": "udp"})
    found = assign(config.listeners, [passed(3, "b", "127.0.0.1:80", "udp")])
    assert found.fds == {("b", HostPort("127.0.0.1", 80)): 3}


def test_port_ranges_take_a_socket_per_port() -> None:
    config = cfg({"name": "r", "bind": "127.0.0.1:7000-7002", "pool": "p"})
    found = assign(config.listeners, [passed(3, "", "127.0.0.1:7002"),
                                      passed(4, "", "127.0.0.1:7000")])
    assert found.fds == {("r", HostPort("127.0.0.1", 7002)): 3,
                         ("r", HostPort("127.0.0.1", 7000)): 4}


def test_kernel_listeners_take_no_socket() -> None:
    config = cfg({"name": "k", "bind": "10.0.0.1:80", "pool": "p", "dataplane": "kernel"})
    found = assign(config.listeners, [passed(3, "k", "10.0.0.1:80")])
    assert found.fds == {} and [s.fd for s in found.unused] == [3]


# --- with real sockets ------------------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def test_inspect_reads_type_and_address(sockets: list[socket.socket]) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    unix = socket.socket(socket.AF_UNIX)
    sockets += [tcp, udp, unix]
    assert inspect(tcp.fileno(), "web") == PassedSocket(
        tcp.fileno(), "web", "tcp", HostPort("127.0.0.1", tcp.getsockname()[1]))
    assert inspect(udp.fileno(), "") == PassedSocket(
        udp.fileno(), "", "udp", HostPort("::1", udp.getsockname()[1]))
    assert inspect(unix.fileno(), "x") == PassedSocket(unix.fileno(), "x", None, None)


def test_inherited_takes_duplicates_and_keeps_the_passed_socket(sockets: list[socket.socket]) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    sockets.append(tcp)
    port = tcp.getsockname()[1]
    inherited = Inherited([inspect(tcp.fileno(), "")])
    config = cfg({"name": "web", "bind": f"127.0.0.1:{port}", "pool": "p"})
    inherited.prepare(config)
    assert inherited.held(config) == [(HostPort("127.0.0.1", port), "tcp")]
    taken = inherited.take("web", HostPort("127.0.0.1", port))
    assert taken is not None and taken.fileno() != tcp.fileno()
    taken.close()  # a listener closing its copy leaves the passed socket listening
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert inherited.take("web", HostPort("127.0.0.1", port + 1)) is None


def test_from_environment_removes_the_variables(sockets: list[socket.socket]) -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "web",
           "OTHER": "x"}
    inherited = Inherited.from_environment(env)  # not for us: nothing taken, variables gone
    assert not inherited and env == {"OTHER": "x"}
    assert SD_LISTEN_FDS_START == 3

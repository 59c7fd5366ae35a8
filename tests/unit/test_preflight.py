"""Preflight: which files, directories and addresses a config needs (pure), and finding on this
host the problems `run` would meet (real files in tmp_path, real sockets on loopback)."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

from pointsman.config.addresses import parse_host_port
from pointsman.config.loader import load_text
from pointsman.config.node import load_node_file
from pointsman.config.preflight import (
    Bind,
    ReadFile,
    WriteFile,
    needs,
    preflight,
    preflight_file,
    preflight_node,
    problems,
)
from tests.support import LOOPBACK, free_port, has_ipv6

# TEST-NET-1 (RFC 5737): documentation only, never an address of a test host.
NOT_LOCAL = "192.0.2.10"


POOLS = 'pools:\n  - {name: p, backends: [{address: "127.0.0.1:1"}]}\n'


def config_text(listeners: list[str], extra: str = "") -> str:
    """Listeners in flow style (one line each, from line 2), the pool, then `extra`."""
    return "listeners:\n" + "".join(f"  - {item}\n" for item in listeners) + POOLS + extra


def one_listener(bind: str, protocol: str = "tcp", extra: str = "") -> str:
    return config_text([f'{{name: lb, bind: "{bind}", protocol: {protocol}, pool: p}}'], extra)


# --- needs (pure) --------------------------------------------------------------------------------


def test_needs_lists_listeners_admin_files_and_flow_log_in_order() -> None:
    config = load_text(config_text([
        '{name: a, bind: "127.0.0.1:7001", pool: p, backlog: 50}',
        '{name: b, bind: "127.0.0.1:7002", protocol: udp, pool: p}',
        '{name: k, bind: "10.0.0.1:80", pool: p, dataplane: kernel}',
    ], 'admin: {bind: "127.0.0.1:7003", token_file: /etc/pm/token}\n'
       "flow_log: {path: /var/log/pm/flows.log}\n"))
    assert needs(config) == [
        ReadFile(("admin", "token_file"), "/etc/pm/token", non_empty=True),
        WriteFile(("flow_log", "path"), "/var/log/pm/flows.log"),
        Bind(("listeners", 0, "bind"), parse_host_port("127.0.0.1:7001"), "tcp", 50),
        Bind(("listeners", 1, "bind"), parse_host_port("127.0.0.1:7002"), "udp"),
        # the kernel data plane binds no socket: listeners[2] needs nothing
        Bind(("admin", "bind"), parse_host_port("127.0.0.1:7003"), "tcp"),
    ]


def test_no_bind_leaves_only_files() -> None:
    config = load_text(one_listener("127.0.0.1:7001", extra='admin: {bind: "127.0.0.1:7003"}\n'))
    assert needs(config, bind=False) == []


@pytest.mark.parametrize("flow_log", ['{path: "-"}', "{enabled: false, path: /nope/x.log}"])
def test_flow_log_to_stderr_or_disabled_needs_no_file(flow_log: str) -> None:
    config = load_text(one_listener("127.0.0.1:7001", extra=f"flow_log: {flow_log}\n"))
    assert needs(config, bind=False) == []


# --- problems (files) ----------------------------------------------------------------------------


def test_readable_token_file_is_fine_missing_empty_and_directory_are_not(tmp_path: Path) -> None:
    good, empty = tmp_path / "token", tmp_path / "empty"
    good.write_text("s3cret\n")
    empty.write_text(" \n")
    wanted = [ReadFile(("a",), str(good), True), ReadFile(("b",), str(tmp_path / "nope"), True),
              ReadFile(("c",), str(empty), True), ReadFile(("d",), str(empty), False),
              ReadFile(("e",), str(tmp_path), False)]
    assert list(problems(wanted)) == [
        (("b",), f"cannot read {tmp_path / 'nope'}: no such file or directory"),
        (("c",), f"{empty} is empty"),
        (("e",), f"cannot read {tmp_path}: is a directory"),
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes files whatever their mode")
def test_unreadable_file_and_unwritable_directory(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x")
    secret.chmod(0)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    found = list(problems([ReadFile(("a",), str(secret)), WriteFile(("b",), str(locked / "f"))]))
    assert found == [(("a",), f"cannot read {secret}: permission denied"),
                     (("b",), f"cannot create {locked / 'f'}: directory {locked} is not writable")]


def test_flow_log_path_needs_its_directory(tmp_path: Path) -> None:
    existing = tmp_path / "flows.log"
    existing.write_text("")
    wanted = [WriteFile(("a",), str(existing)), WriteFile(("b",), str(tmp_path / "new.log")),
              WriteFile(("c",), str(tmp_path / "no" / "dir.log")), WriteFile(("d",), str(tmp_path))]
    assert list(problems(wanted)) == [
        (("c",), f"cannot create {tmp_path / 'no' / 'dir.log'}: no directory {tmp_path / 'no'}"),
        (("d",), f"{tmp_path} is a directory"),
    ]


# --- problems (binds) ----------------------------------------------------------------------------


def bind(address: str, protocol: str = "tcp", loc: str = "x") -> Bind:
    return Bind((loc,), parse_host_port(address), protocol)


def test_a_free_address_passes_and_is_released_at_once() -> None:
    address = f"{LOOPBACK}:{free_port()}"
    assert list(problems([bind(address), bind(address, "udp", "y")])) == []
    with socket.socket() as again:  # nothing held: run can bind it right after
        again.bind((LOOPBACK, int(address.rsplit(":", 1)[1])))


def test_a_listening_tcp_port_is_in_use() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        address = f"{LOOPBACK}:{taken.getsockname()[1]}"
        assert list(problems([bind(address)])) == [
            (("x",), f"cannot bind {address}/tcp: address already in use")]


def test_a_bound_udp_port_is_in_use() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        address = f"{LOOPBACK}:{taken.getsockname()[1]}"
        assert list(problems([bind(address, "udp")])) == [
            (("x",), f"cannot bind {address}/udp: address already in use")]


def test_an_address_this_host_does_not_have() -> None:
    assert list(problems([bind(f"{NOT_LOCAL}:7001")])) == [
        (("x",), f"cannot bind {NOT_LOCAL}:7001/tcp: {NOT_LOCAL} is not an address of this host")]


def test_two_of_the_configs_own_addresses_clash() -> None:
    address = f"{LOOPBACK}:{free_port()}"
    wanted = [bind(address, loc="listeners"), bind(address, "udp", "dns"), bind(address, loc="admin")]
    assert list(problems(wanted)) == [(("admin",), "same address as listeners")]


def test_a_wildcard_and_a_loopback_listener_on_one_port_clash_in_the_kernel() -> None:
    port = free_port()
    wanted = [bind(f"0.0.0.0:{port}", loc="a"), bind(f"{LOOPBACK}:{port}", loc="b")]
    assert list(problems(wanted)) == [
        (("b",), f"cannot bind {LOOPBACK}:{port}/tcp: address already in use")]


def test_addresses_a_running_pointsman_holds_are_not_tried() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        need = bind(f"{LOOPBACK}:{taken.getsockname()[1]}")
        assert list(problems([need], held=[(need.address, "tcp")])) == []
        assert list(problems([need], held=[(need.address, "udp")])) != []


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this host")
def test_ipv6_listeners_are_v6_only_as_in_run() -> None:
    """[::]:p and 0.0.0.0:p can be two listeners, because run binds IPv6 sockets v6-only."""
    port = free_port()
    assert list(problems([bind(f"[::]:{port}", loc="a"), bind(f"0.0.0.0:{port}", loc="b")])) == []


# --- entry points: file, line and field ------------------------------------------------------------


def test_preflight_file_names_file_line_and_field(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        busy = f"{LOOPBACK}:{taken.getsockname()[1]}"
        path = tmp_path / "pointsman.yaml"
        path.write_text(config_text([f'{{name: lb, bind: "{busy}", pool: p}}'], (
            "admin:\n"
            f'  bind: "{LOOPBACK}:{free_port()}"\n'
            f"  token_file: {tmp_path / 'missing-token'}\n"
            "flow_log:\n"
            f"  path: {tmp_path / 'no-dir' / 'flows.log'}\n")))
        config = load_text(path.read_text(), str(path))
        issues = [str(issue) for issue in preflight_file(str(path), config)]
    assert issues == [
        f"{path}:2: listeners[0].bind: cannot bind {busy}/tcp: address already in use",
        f"{path}:7: admin.token_file: cannot read {tmp_path / 'missing-token'}: "
        "no such file or directory",
        f"{path}:9: flow_log.path: cannot create {tmp_path / 'no-dir' / 'flows.log'}: "
        f"no directory {tmp_path / 'no-dir'}",
    ]
    assert preflight_file(str(path), config, bind=False)[0].path == "admin.token_file"


def test_preflight_of_a_config_from_etcd_has_no_lines() -> None:
    config = load_text(one_listener(f"{NOT_LOCAL}:7001"))
    assert [str(i) for i in preflight(config, "<etcd>", {})] == [
        f"<etcd>: listeners[0].bind: cannot bind {NOT_LOCAL}:7001/tcp: "
        f"{NOT_LOCAL} is not an address of this host"]


def test_preflight_node_checks_etcd_credentials_and_node_local_keys(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "node.yaml"
    path.write_text(textwrap.dedent(f"""\
        node: {{name: lb-a}}
        config_source:
          etcd:
            endpoints: ["https://127.0.0.1:2379"]
            prefix: /pm/
            ca_file: {ca}
            token_file: {tmp_path / "etcd.token"}
        admin:
          bind: "{NOT_LOCAL}:9900"
          token_file: {tmp_path / "admin.token"}
        """))
    issues = [f"{i.line}: {i.path}: {i.message}" for i in preflight_node(load_node_file(path))]
    assert issues == [
        f"7: config_source.etcd.token_file: cannot read {tmp_path / 'etcd.token'}: "
        "no such file or directory",
        f"9: admin.bind: cannot bind {NOT_LOCAL}:9900/tcp: {NOT_LOCAL} is not an address of this host",
        f"10: admin.token_file: cannot read {tmp_path / 'admin.token'}: no such file or directory",
    ]


# --- kernel.datapath: tc -------------------------------------------------------------------------

TC_LISTENER = ('{name: vip, bind: "10.99.0.1:80", pool: p, dataplane: kernel, '
               'kernel: {nat: stateless, snat: none, datapath: tc, interfaces: [lo, nosuch0]}}')
MAGLEV = 'pools:\n  - {name: p, algorithm: maglev, backends: [{address: "127.0.0.1:1"}]}\n'


def test_a_tc_listener_needs_its_program_and_each_interface(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`check` names an interface this host lacks at its place in the list, and (with no clang
    on the PATH) what the program's build needs, at `kernel.datapath`."""
    path = tmp_path / "pointsman.yaml"
    path.write_text("listeners:\n  - " + TC_LISTENER + "\n" + MAGLEV)
    config = load_text(path.read_text(), str(path))
    assert [need.loc for need in needs(config, bind=False)] == [
        ("listeners", 0, "kernel", "datapath"), ("listeners", 0, "kernel", "interfaces", 0),
        ("listeners", 0, "kernel", "interfaces", 1)]
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    issues = [str(issue) for issue in preflight_file(str(path), config, bind=False)]
    assert issues == [
        f"{path}:2: listeners[0].kernel.datapath: the tc data path needs clang "
        "(Debian: apt-get install clang libbpf-dev)",
        f"{path}:2: listeners[0].kernel.interfaces[1]: no network interface 'nosuch0' on this host",
    ]

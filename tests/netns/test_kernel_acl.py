"""Allow/deny lists and bind lists / port ranges on the kernel data plane, end to end, in the
namespaces of kernel_support.py (client -- lb -- 3 backends).

What is checked: a refused source's SYN is dropped in the kernel (the client's connect times out:
no reset, nothing reaches a backend) and counted as `denied`; deny wins over allow; a list set
through the admin API or changed by a reload is in the kernel's set at once, and a flow that was
established before its source was denied goes on to its last byte (both NAT modes); IPv6; a port
range is one rule whose ports are all balanced, and every address of a bind list is served.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .kernel_support import (
    IO_TIMEOUT,
    Metrics,
    Stream,
    admin,
    backend_servers,
    config,
    http_get,
    maglev_choice,
    metrics_when,
    pointsman,
    ready_servers,
)
from .netns_support import (
    VIP,
    BackendServer,
    LbTopology,
    lb_topology,
    nftables_unavailable_reason,
    wait_until,
)

_reason = nftables_unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

DROP_WAIT = 1.0
"""How long a connect to a denied source waits before it counts as dropped. A dropped SYN gets
no answer at all (a refused one would get a reset at once); 1 s covers the first SYN and, at
most, one retransmission."""

SET_WAIT = 5.0
"""A list change reaches the kernel through the listener's writer (one transaction): poll the
set for this long."""


@pytest.fixture(scope="module")
def topo() -> Iterator[LbTopology]:
    with lb_topology(backends=3) as topology:
        yield topology


@pytest.fixture(scope="module")
def servers(topo: LbTopology) -> Iterator[dict[str, BackendServer]]:
    with backend_servers(topo) as running:
        yield running


def listener_keys(text: str, **keys: Any) -> str:
    """The config `text` with `keys` set on its listener."""
    data = yaml.safe_load(text)
    data["listeners"][0].update(keys)
    return yaml.safe_dump(data)


def dropped(topo: LbTopology, source: str, address: str = VIP, port: int = 80,
            family: int = socket.AF_INET) -> bool:
    """True when a connect from `source` gets no answer (its SYN was dropped); False when it
    connects. A reset fails the test: a denied SYN must be dropped, not refused."""
    with topo.client.socket(family) as sock:
        sock.settimeout(DROP_WAIT)
        sock.bind((source, 0))
        try:
            sock.connect((address, port))
        except TimeoutError:
            return True
        return False


def acl_set(topo: LbTopology, kind: str) -> str:
    return topo.lb.run("nft", "list", "set", "inet", "pointsman", f"l_web_{kind}")


def wait_set(topo: LbTopology, kind: str, present: str, absent: str = "") -> None:
    def ready() -> bool:
        listed = acl_set(topo, kind)
        return present in listed and (not absent or absent not in listed)

    wait_until(ready, SET_WAIT, what=f"{present!r} in the kernel's {kind} set")


def denied(m: Metrics) -> float:
    return m("pointsman_kernel_connections_rejected_total", reason="denied")


# --- allow / deny ------------------------------------------------------------------------------------


def test_allow_deny_and_deny_wins(topo: LbTopology, servers: dict[str, BackendServer],
                                  tmp_path: Path) -> None:
    # allow .96-.111; deny .100-.101 inside it: deny wins there; .2 is outside the allow list.
    text = listener_keys(config(topo), allow=["10.99.1.96/28"], deny=["10.99.1.100/31"])
    with pointsman(topo, tmp_path, text):
        allowed = topo.client_source(4)  # 10.99.1.104
        assert http_get(topo, (allowed, 0)).split()[0] in topo.names
        assert dropped(topo, topo.client_source(0))  # allowed and denied: deny wins
        assert dropped(topo, topo.client_ip)  # not in the allow list
        m = metrics_when(topo, lambda m: denied(m) >= 2, "two denied SYNs counted")
        assert m("pointsman_kernel_connections_rejected_total", reason="no_backend") == 0
        status, body = admin(topo, "GET", "/api/v1/status")
        assert status == 200
        listener = next(item for item in json.loads(body)["listeners"] if item["name"] == "web")
        assert listener["rejected"]["denied"] >= 2
        assert "10.99.1.96/28" in acl_set(topo, "allow")


def test_api_deny_keeps_established_flows_and_reload_puts_the_file_back(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    source = topo.client_source(5)
    other = topo.client_source(6)
    with pointsman(topo, tmp_path, config(topo)) as proc:
        assert "elements" not in acl_set(topo, "deny")
        stream = Stream(topo, 200_000, 1.5, (source, 0))  # established before the deny
        status, body = admin(topo, "PUT", "/api/v1/listeners/web/deny", [f"{source}/32"])  # type: ignore[arg-type]
        assert (status, json.loads(body)) == (200, [f"{source}/32"])
        wait_set(topo, "deny", source)
        assert dropped(topo, source)
        assert http_get(topo, (other, 0)).split()[0] in topo.names
        assert stream.finish() == 200_000  # the established flow went on to its last byte
        assert json.loads(admin(topo, "GET", "/api/v1/listeners/web/deny")[1]) == [f"{source}/32"]
        metrics_when(topo, lambda m: denied(m) >= 1, "the denied SYN counted")

        # The file changes the deny list: the file wins over the API's list.
        proc.path.write_text(listener_keys(config(topo), deny=[f"{other}/32"]))
        proc.reload()
        wait_set(topo, "deny", other, absent=source)
        assert http_get(topo, (source, 0)).split()[0] in topo.names
        assert dropped(topo, other)


def test_stateless_drops_denied_syns_and_keeps_established_flows(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    source = topo.client_source(7)
    text = listener_keys(config(topo, nat="stateless", snat="none"), deny=["10.99.1.120/32"])
    with pointsman(topo, tmp_path, text):
        assert dropped(topo, topo.client_source(20))  # 10.99.1.120, denied by the file
        stream = Stream(topo, 200_000, 1.5, (source, 0))
        status, _ = admin(topo, "PUT", "/api/v1/listeners/web/deny",
                          [f"{source}/32", "10.99.1.120/32"])  # type: ignore[arg-type]
        assert status == 200
        wait_set(topo, "deny", source)
        assert dropped(topo, source)
        assert stream.finish() == 200_000  # not a SYN: the rewrite goes on
        assert http_get(topo, (topo.client_source(8), 0)).split()[0] in topo.names
        metrics_when(topo, lambda m: denied(m) >= 2, "both denied SYNs counted")


# --- IPv6 --------------------------------------------------------------------------------------------

VIP6 = "fd99:100::1"
CLIENT6 = "fd99:1::2"
DENIED6 = "fd99:1::100"
V6_PORT = 8090
V6_SERVER = r'''
import asyncio, sys
NAME = sys.argv[1]

async def answer(reader, writer):
    peer = writer.get_extra_info("peername")
    writer.write(f"{NAME} {peer[0]}\n".encode())
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "::", int(sys.argv[2]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
'''


def backend6(index: int) -> str:
    return f"fd99:{11 + index}::2"


@contextlib.contextmanager
def ipv6(topo: LbTopology) -> Iterator[None]:
    """IPv6 on the topology's links (no DAD: usable at once) and a server on [::]:V6_PORT in
    every backend namespace. The addresses go with the namespaces (`replace`: a second test of
    the module finds them there)."""
    topo.client.run("ip", "-6", "addr", "replace", f"{CLIENT6}/64", "dev", "eth0", "nodad")
    topo.client.run("ip", "-6", "addr", "replace", f"{DENIED6}/64", "dev", "eth0", "nodad")
    topo.client.run("ip", "-6", "route", "replace", "default", "via", "fd99:1::1")
    topo.lb.run("ip", "-6", "addr", "replace", "fd99:1::1/64", "dev", "c0", "nodad")
    topo.lb.sysctl("net.ipv6.conf.all.forwarding", "1")
    for i, node in enumerate(topo.backends):
        topo.lb.run("ip", "-6", "addr", "replace", f"fd99:{11 + i}::1/64", "dev", f"b{i + 1}", "nodad")
        node.run("ip", "-6", "addr", "replace", f"{backend6(i)}/64", "dev", "eth0", "nodad")
        node.run("ip", "-6", "route", "replace", "default", "via", f"fd99:{11 + i}::1")
    with ready_servers([node.popen(sys.executable, "-c", V6_SERVER, name, str(V6_PORT),
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                        for node, name in zip(topo.backends, topo.names, strict=True)], "v6 server"):
        yield


def answer6(topo: LbTopology, source: str, port: int = 0) -> str:
    with topo.client.socket(socket.AF_INET6) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.bind((source, port))
        sock.connect((VIP6, 80))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode()


def test_ipv6_deny(topo: LbTopology, tmp_path: Path) -> None:
    text = yaml.safe_dump({
        "listeners": [{"name": "web", "bind": f"[{VIP6}]:80", "pool": "web", "dataplane": "kernel",
                       "kernel": {"slots": 13}, "deny": [f"{DENIED6}/128", "10.0.0.0/8"]}],
        "pools": [{"name": "web", "algorithm": "maglev", "maglev_table_size": 13,
                   "backends": [{"address": f"[{backend6(i)}]:{V6_PORT}", "name": name}
                                for i, name in enumerate(topo.names)]}],
        "admin": {"bind": "127.0.0.1:9900"},
    })
    with ipv6(topo), pointsman(topo, tmp_path, text):
        assert answer6(topo, CLIENT6).split()[0] in topo.names
        assert dropped(topo, DENIED6, VIP6, family=socket.AF_INET6)
        listed = acl_set(topo, "deny")
        assert DENIED6 in listed and "10.0.0.0" not in listed  # only the listener's family
        metrics_when(topo, lambda m: denied(m) >= 1, "the denied IPv6 SYN counted")


def test_ipv6_stateless(topo: LbTopology, tmp_path: Path) -> None:
    """`nat: stateless` over IPv6: the kernel's pick is userspace Maglev's, the backend port is
    rewritten both ways (VIP port 80, backends V6_PORT), replies come from the VIP (the client's
    connected socket takes nothing else), nothing is tracked, every SYN is counted exactly once."""
    text = yaml.safe_dump({
        "listeners": [{"name": "web", "bind": f"[{VIP6}]:80", "pool": "web", "dataplane": "kernel",
                       "kernel": {"slots": 13, "nat": "stateless", "snat": "none"}}],
        "pools": [{"name": "web", "algorithm": "maglev", "hash_key": "source_ip_port",
                   "maglev_table_size": 13,
                   "backends": [{"address": f"[{backend6(i)}]:{V6_PORT}", "name": name}
                                for i, name in enumerate(topo.names)]}],
        "admin": {"bind": "127.0.0.1:9900"},
    })
    with ipv6(topo), pointsman(topo, tmp_path, text):
        seen: Counter[str] = Counter()
        for i in range(24):
            port = 48000 + i
            name, peer = answer6(topo, CLIENT6, port).split()
            assert name == maglev_choice(topo, 13, CLIENT6, port, "source_ip_port")
            assert peer == CLIENT6  # no SNAT
            seen[name] += 1
        assert set(seen) == set(topo.names)
        tracked = topo.lb.run("conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-dst", VIP6, check=False)
        assert tracked.strip() == ""
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 24,
                             "24 SYNs counted")
        assert found("pointsman_kernel_new_connections_total") == 24
        for name in topo.names:
            assert found("pointsman_kernel_backend_new_connections_total", backend=name) == seen[name]


# --- bind lists and port ranges ------------------------------------------------------------------------

VIP2 = "10.99.100.2"


def get(topo: LbTopology, address: str, port: int) -> str:
    with topo.client.socket() as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect((address, port))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), data[:200]
    return body.decode().split()[0]


def test_port_range_is_one_rule_and_a_bind_list_serves_every_address(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    text = config(topo, algorithm="round_robin", bind=[f"{VIP}:30000-30100", f"{VIP2}:80"])  # type: ignore[arg-type]
    with pointsman(topo, tmp_path, text):
        dnat = topo.lb.run("nft", "list", "chain", "inet", "pointsman", "l_web_dnat")
        assert dnat.count("tcp dport 30000-30100 dnat") == 1  # one DNAT rule for the range
        assert f"ip daddr {VIP2} tcp dport 80 dnat" in dnat
        # Three ports of the range, round robin across them: one rule, one counter, so every
        # backend takes an equal share whichever port a client picked.
        seen = Counter(get(topo, VIP, port) for _ in range(4) for port in (30000, 30050, 30100))
        assert seen == Counter({name: 4 for name in topo.names}), seen
        assert {get(topo, VIP2, 80) for _ in range(3)} == set(topo.names)

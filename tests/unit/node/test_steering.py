"""Source steering: the classic BPF program, run by a small interpreter here, computes the
documented hash of the source address (masked to its prefix) modulo the group; `needs_steering`
picks the listeners that keep per-client state; and the kernel really steers by it."""

from __future__ import annotations

import ipaddress
import random
import select
import socket
import struct
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.config.loader import load_text
from pointsman.config.model import Config, ListenerConfig
from pointsman.node import steering
from pointsman.node.steering import (
    GOLDEN,
    SKF_NET_OFF,
    Instruction,
    bpf_program,
    needs_steering,
    source_prefix,
)

# --- a classic BPF interpreter for the instructions bpf_program emits --------------------------------

# Opcodes written out from include/uapi/linux/filter.h and bpf_common.h (not taken from the module).
LD_W_ABS = 0x00 | 0x00 | 0x20
ALU = 0x04
RET_A = 0x06 | 0x10
MISC_TAX = 0x07 | 0x00
ALU_OPS = {0x50: "and", 0xA0: "xor", 0x20: "mul", 0x70: "rsh", 0x90: "mod"}
SRC_K, SRC_X = 0x00, 0x08
U32 = 0xFFFFFFFF


class BpfAbort(Exception):
    """The kernel ends the program with 0 here (a load out of the packet, a division by 0)."""


def run_bpf(program: list[Instruction], ip_header: bytes) -> int:
    """What the kernel computes for a packet whose network header is `ip_header`."""
    assert 0 < len(program) <= 4096
    a = x = 0
    for code, jt, jf, k in program:
        assert (jt, jf) == (0, 0), "the steering program never jumps"
        if code == LD_W_ABS:
            offset = k - (1 << 32) if k & 0x80000000 else k  # k is a signed 32-bit offset
            assert offset < 0 and offset >= SKF_NET_OFF, f"a load not relative to the IP header: {k:#x}"
            start = offset - SKF_NET_OFF
            if start + 4 > len(ip_header):
                raise BpfAbort(f"load at {start} past a {len(ip_header)} byte header")
            (a,) = struct.unpack_from("!I", ip_header, start)
        elif code & 0x07 == ALU:
            op = ALU_OPS[code & 0xF0]
            source = code & 0x08
            assert code & ~0xF8 == ALU, f"unknown ALU code {code:#x}"
            operand = x if source == SRC_X else k
            if op == "and":
                a &= operand
            elif op == "xor":
                a ^= operand
            elif op == "mul":
                a = (a * operand) & U32
            elif op == "rsh":
                a >>= operand & 31
            else:
                if operand == 0:
                    raise BpfAbort("modulo 0")
                a %= operand
        elif code == MISC_TAX:
            x = a
        elif code == RET_A:
            return a
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("the program does not end with RET")


def ipv4_header(source: str, destination: str = "10.99.0.10") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 0x1234, 0x4000, 64, 6, 0xBEEF,
                       ipaddress.IPv4Address(source).packed, ipaddress.IPv4Address(destination).packed)


def ipv6_header(source: str, destination: str = "2001:db8::10") -> bytes:
    return struct.pack("!IHBB16s16s", 0x60012345, 40, 6, 64, ipaddress.IPv6Address(source).packed,
                       ipaddress.IPv6Address(destination).packed)


def header_for(source: str) -> bytes:
    return ipv6_header(source) if ":" in source else ipv4_header(source)


def family_of(source: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in source else socket.AF_INET


def reference(source: str, prefix: int, groups: int) -> int:
    """The documented hash: the source masked to its prefix, its 32-bit words XORed together,
    times the golden-ratio constant (mod 2^32), the top 16 bits, modulo the group size."""
    network = ipaddress.ip_network(f"{source}/{prefix}", strict=False)
    masked = network.network_address.packed
    folded = 0
    for i in range(0, len(masked), 4):
        folded ^= int.from_bytes(masked[i:i + 4], "big")
    return (((folded * 0x9E3779B1) & U32) >> 16) % groups


def steer(source: str, prefix: int, groups: int) -> int:
    return run_bpf(bpf_program(family_of(source), prefix, groups), header_for(source))


# --- the program against the reference ---------------------------------------------------------------


def test_the_constants_are_the_kernel_s() -> None:
    assert steering.SO_ATTACH_REUSEPORT_CBPF == 51
    assert steering.SO_DETACH_REUSEPORT_BPF == 68
    assert SKF_NET_OFF == -0x100000
    assert GOLDEN == 0x9E3779B1


EDGES_V4 = ["0.0.0.0", "255.255.255.255", "127.0.0.1", "10.0.0.0", "192.0.2.255"]
EDGES_V6 = ["::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::1", "::ffff:192.0.2.1",
            "2001:db8::", "fe80::1:2:3:4"]


@pytest.mark.parametrize("version", [4, 6])
def test_the_program_equals_the_reference(version: int) -> None:
    rng = random.Random(version)
    bits = 32 if version == 4 else 128
    sources = [*(EDGES_V4 if version == 4 else EDGES_V6),
               *(str(ipaddress.ip_address(rng.getrandbits(bits) if version == 6 else
                                          ipaddress.IPv4Address(rng.getrandbits(32))))
                 for _ in range(80))]
    prefixes = sorted({0, 1, bits // 2, bits - 1, bits, *(rng.randint(0, bits) for _ in range(6))})
    for groups in (1, 2, 3, 7, 65535):
        for prefix in prefixes:
            program = bpf_program(socket.AF_INET if version == 4 else socket.AF_INET6, prefix, groups)
            for source in sources:
                result = run_bpf(program, header_for(source))
                assert result == reference(source, prefix, groups), (source, prefix, groups)
                assert 0 <= result < groups


@settings(max_examples=50, deadline=None)
@given(st.ip_addresses(), st.integers(0, 128), st.integers(1, 1 << 16))
def test_the_program_equals_the_reference_hypothesis(
        address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int, groups: int) -> None:
    source = str(address)
    prefix = min(prefix, address.max_prefixlen)
    result = steer(source, prefix, groups)
    assert result == reference(source, prefix, groups)
    assert 0 <= result < groups


def test_the_program_reads_only_the_source_address() -> None:
    """Destination, TTL, checksum, flow label: none of them moves a source to another worker."""
    for source in ("198.51.100.7", "2001:db8:1:2:3:4:5:6"):
        family = family_of(source)
        program = bpf_program(family, 128 if family == socket.AF_INET6 else 32, 7)
        if family == socket.AF_INET6:
            headers = [ipv6_header(source, dest) for dest in ("2001:db8::1", "fd00::99")]
            headers.append(b"\x61\xff\xff\xff" + ipv6_header(source)[4:])  # another flow label
        else:
            headers = [ipv4_header(source, dest) for dest in ("10.0.0.1", "192.0.2.200")]
            headers.append(ipv4_header(source)[:8] + b"\x01\x11\x00\x00" + ipv4_header(source)[12:])
        assert len({run_bpf(program, header) for header in headers}) == 1


@pytest.mark.parametrize(("family", "prefix", "loads"), [
    (socket.AF_INET, 32, 1), (socket.AF_INET, 24, 1), (socket.AF_INET, 0, 1),
    (socket.AF_INET6, 128, 4), (socket.AF_INET6, 64, 2), (socket.AF_INET6, 56, 2),
    (socket.AF_INET6, 33, 2), (socket.AF_INET6, 32, 1),
])
def test_the_program_loads_only_the_words_the_prefix_covers(family: socket.AddressFamily,
                                                           prefix: int, loads: int) -> None:
    program = bpf_program(family, prefix, 4)
    assert sum(1 for code, *_ in program if code == LD_W_ABS) == loads


def test_groups_must_be_positive() -> None:
    with pytest.raises(ValueError):
        bpf_program(socket.AF_INET, 32, 0)


@pytest.mark.parametrize(("family", "prefix", "base", "step"), [
    (socket.AF_INET, 24, "203.0.113.0", 1),  # one /24
    (socket.AF_INET, 16, "172.16.0.0", 257),  # one /16
    (socket.AF_INET6, 64, "2001:db8:aa:bb::", 0x1_0000_0001),  # one /64
    (socket.AF_INET6, 56, "2001:db8:aa:bb00::", 0x100_0000_0000_0001),  # one /56
    (socket.AF_INET6, 128, "2001:db8::5", 0),  # one address
])
def test_addresses_of_one_prefix_share_an_index(family: socket.AddressFamily, prefix: int,
                                                base: str, step: int) -> None:
    start = int(ipaddress.ip_address(base))
    network = ipaddress.ip_network(f"{base}/{prefix}")
    sources = [str(ipaddress.ip_address(start + i * step)) for i in range(200)
               if ipaddress.ip_address(start + i * step) in network]
    assert sources and all(ipaddress.ip_address(s) in network for s in sources)
    for groups in (2, 3, 8):
        assert {steer(s, prefix, groups) for s in sources} == {reference(base, prefix, groups)}


def test_prefix_zero_sends_everything_to_one_index() -> None:
    rng = random.Random(3)
    sources = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(100)]
    assert {steer(s, 0, 4) for s in sources} == {0}


def _chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


# Critical values of the chi-square distribution at p = 1e-6 (df = groups - 1): a fair spread
# exceeds them once in a million runs; the sources are seeded, so the test is deterministic.
CHI_SQUARE_LIMIT = {2: 23.9, 3: 27.6, 4: 30.7, 8: 42.0}
SPREAD_SOURCES = 3000


def _spread_sources(kind: str, rng: random.Random) -> tuple[list[bytes], socket.AddressFamily, int]:
    """IP headers of many sources of one kind, the family and the prefix hashed."""
    if kind == "v4-random":
        return [ipv4_header(str(ipaddress.IPv4Address(rng.getrandbits(32))))
                for _ in range(SPREAD_SOURCES)], socket.AF_INET, 32
    if kind == "v4-one-/16":  # clients of one network, consecutive addresses
        return [ipv4_header(str(ipaddress.IPv4Address(0xAC100000 + i)))
                for i in range(SPREAD_SOURCES)], socket.AF_INET, 32
    if kind == "v6-random-/64":
        return [ipv6_header(str(ipaddress.IPv6Address(rng.getrandbits(128))))
                for _ in range(SPREAD_SOURCES)], socket.AF_INET6, 64
    # consecutive /64s of one /48, as the per-source limits count them
    base = int(ipaddress.IPv6Address("2001:db8:7::"))
    return [ipv6_header(str(ipaddress.IPv6Address(base + (i << 64) + rng.getrandbits(64))))
            for i in range(SPREAD_SOURCES)], socket.AF_INET6, 64


@pytest.mark.parametrize("kind", ["v4-random", "v4-one-/16", "v6-random-/64", "v6-one-/48"])
def test_many_sources_spread_evenly(kind: str) -> None:
    headers, family, prefix = _spread_sources(kind, random.Random(len(kind)))
    for groups, limit in CHI_SQUARE_LIMIT.items():
        program = bpf_program(family, prefix, groups)
        counts = [0] * groups
        for header in headers:
            counts[run_bpf(program, header)] += 1
        assert _chi_square(counts) < limit, (groups, counts)


# --- which listeners are steered -----------------------------------------------------------------------


def config_for(listener: dict[str, Any], pool: dict[str, Any],
               other_pools: list[dict[str, Any]] | None = None) -> Config:
    listener = {"name": "l", "bind": "127.0.0.1:8000", "pool": "p", **listener}
    data = {
        "listeners": [{k: v for k, v in listener.items() if v is not None}],
        "pools": [{"name": "p", "backends": [{"address": "127.0.0.1:9001"}], **pool},
                  *(other_pools or [])],
    }
    return load_text(yaml.safe_dump(data), "steering.yaml")


CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("round_robin", {}, {}, False),
    ("least_connections", {}, {"algorithm": "least_connections"}, False),
    ("listener-wide rate", {"limits": {"new_connections_per_second": 100}}, {}, False),
    ("affinity", {}, {"affinity": {"timeout": "1m"}}, True),
    ("affinity by source ip and port", {}, {"affinity": {"key": "source_ip_port"}}, True),
    ("per-source limit", {"limits": {"max_connections_per_source": 5}}, {}, True),
    ("per-source rate", {"limits": {"new_connections_per_second_per_source": 2.5}}, {}, True),
    ("source_hash", {}, {"algorithm": "source_hash"}, True),
    ("maglev source_ip", {}, {"algorithm": "maglev", "hash_key": "source_ip"}, True),
    ("maglev default key", {}, {"algorithm": "maglev"}, True),
    ("maglev source_ip_port", {}, {"algorithm": "maglev", "hash_key": "source_ip_port"}, False),
]


@pytest.mark.parametrize(("listener", "pool", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_needs_steering(listener: dict[str, Any], pool: dict[str, Any], expected: bool) -> None:
    config = config_for(listener, pool)
    assert needs_steering(config.listeners[0], config) is expected


def test_a_tls_route_to_a_pool_with_affinity_needs_steering() -> None:
    config = config_for({"default_pool": "p", "pool": None,
                         "tls_routes": [{"server_names": ["a.example"], "pool": "sticky"}]},
                        {}, [{"name": "sticky", "affinity": {},
                              "backends": [{"address": "127.0.0.1:9002"}]}])
    assert needs_steering(config.listeners[0], config)


def _listener(config: Config) -> ListenerConfig:
    return config.listeners[0]


def test_source_prefix() -> None:
    limited = _listener(config_for({"limits": {"max_connections_per_source": 5, "source_prefix_v4": 24,
                                               "source_prefix_v6": 48}}, {}))
    assert source_prefix(limited, socket.AF_INET) == 24
    assert source_prefix(limited, socket.AF_INET6) == 48
    rated = _listener(config_for({"limits": {"new_connections_per_second_per_source": 1}}, {}))
    assert source_prefix(rated, socket.AF_INET) == 32
    assert source_prefix(rated, socket.AF_INET6) == 64  # the default source_prefix_v6
    sticky = _listener(config_for({"limits": {"source_prefix_v4": 8}}, {"affinity": {}}))
    assert source_prefix(sticky, socket.AF_INET) == 32  # affinity keys on the whole address
    assert source_prefix(sticky, socket.AF_INET6) == 128


# --- the kernel steers by it --------------------------------------------------------------------------

SOURCES = [f"127.0.0.{i}" for i in range(2, 22)]


def _reuseport_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _accept_from(listeners: list[socket.socket], timeout: float = 5.0) -> tuple[int, str]:
    """Which listener the one pending connection is queued on, and its source address."""
    ready, _, _ = select.select(listeners, [], [], timeout)
    assert len(ready) == 1, f"{len(ready)} listeners have a connection queued"
    conn, peer = ready[0].accept()
    conn.close()
    return listeners.index(ready[0]), str(peer[0])


def test_the_kernel_steers_each_source_to_one_socket() -> None:
    config = config_for({}, {"affinity": {}})
    first = _reuseport_listener(0)
    port = first.getsockname()[1]
    listeners = [first, _reuseport_listener(port)]
    try:
        for sock in listeners:  # each worker attaches the program to its own socket
            steering.attach(sock, _listener(config), groups=2)
        seen: dict[str, set[int]] = {source: set() for source in SOURCES}
        for _ in range(5):
            for source in SOURCES:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                    client.bind((source, 0))
                    client.settimeout(5.0)
                    client.connect(("127.0.0.1", port))
                    index, peer = _accept_from(listeners)
                assert peer == source
                seen[source].add(index)
        assert all(len(indexes) == 1 for indexes in seen.values()), seen
        used = {next(iter(indexes)) for indexes in seen.values()}
        assert used == {0, 1}
        # The index is the program's: the kernel takes its result as the socket's place in the
        # group (the order the sockets joined it).
        assert {s: next(iter(i)) for s, i in seen.items()} == {s: reference(s, 32, 2) for s in SOURCES}
        # Detached, the kernel spreads by its own hash again (and detaching twice is harmless).
        for sock in listeners:
            steering.detach(sock)
            steering.detach(sock)
    finally:
        for sock in listeners:
            sock.close()

"""pointsman's jhash against the running kernel's `jhash ... mod N seed S`.

How: in a fresh namespace, an output chain sets `ct mark set jhash <key> mod <M> seed <S>` for
datagrams to port P; we send from many source addresses and ports on loopback and read the marks
back with `conntrack -L`. Each mark must equal `nft_jhash` of the same key: this is how the golden
vectors in tests/unit/kernel/test_jhash.py were made, repeated on whatever kernel runs the tests.
"""

from __future__ import annotations

import random
import re
import socket

import pytest

from pointsman.balance.hashing import source_key
from pointsman.kernel.jhash import DEFAULT_SEED, nft_jhash, registers, source_key_fields

from .netns_support import namespace, nftables_unavailable_reason

_reason = nftables_unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

U32_MAX = 0xFFFFFFFF
# dport: (key expression, hash key, modulus, seed)
RULES = {
    9000: ("ip saddr . th sport", "source_ip_port", 4093, DEFAULT_SEED),  # stateless's slot hash
    9001: ("ip saddr", "source_ip", U32_MAX, DEFAULT_SEED),
    9002: ("ip saddr . udp sport", "source_ip_port", U32_MAX, DEFAULT_SEED),
    9003: ("ip saddr . udp sport", "source_ip_port", 4093, DEFAULT_SEED),
    9004: ("ip6 saddr", "source_ip", U32_MAX, 0x12345678),
    9005: ("ip6 saddr . udp sport", "source_ip_port", 65537, DEFAULT_SEED),
    9006: ("ip6 saddr . th sport", "source_ip_port", 4093, DEFAULT_SEED),
}
V6_SOURCES = [f"fd00:99::{i:x}" for i in range(1, 9)]
_ENTRY = re.compile(r"src=(\S+) dst=\S+ sport=(\d+) dport=(\d+) .*mark=(\d+)")


def test_kernel_marks_equal_python_jhash() -> None:
    rng = random.Random(20240609)
    with namespace("jhash") as ns:
        ns.sysctl("net.ipv6.conf.lo.disable_ipv6", "0")
        for address in V6_SOURCES:
            ns.run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        rules = "".join(f"add rule inet t out udp dport {port} ct mark set jhash {expr} mod {mod} "
                        f"seed 0x{seed:x}\n" for port, (expr, _, mod, seed) in RULES.items())
        ns.run("nft", "add table inet t\nadd chain inet t out { type filter hook output priority 0 ; }\n"
               + rules)
        sent = 0
        used: set[tuple[str, int]] = set()
        for port in RULES:
            v6 = port >= 9004
            for _ in range(40):
                if v6:
                    source = rng.choice(V6_SOURCES)
                else:
                    source = f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                sport = rng.randrange(1024, 65536)
                if (source, sport) in used:
                    continue
                used.add((source, sport))
                family = socket.AF_INET6 if v6 else socket.AF_INET
                with ns.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.bind((source, sport))
                    sock.sendto(b"x", ("::1" if v6 else "127.0.0.1", port))
                sent += 1
        listing = ns.run("conntrack", "-L")
    checked = 0
    for line in listing.splitlines():
        match = _ENTRY.search(line)
        if match is None or int(match.group(3)) not in RULES:
            continue
        source = match.group(1)
        sport, dport, mark = (int(match.group(i)) for i in (2, 3, 4))
        _, hash_key, modulus, seed = RULES[dport]
        key = source_key(source, sport, hash_key)
        assert nft_jhash(registers(key, source_key_fields(key)), modulus, seed) == mark, line
        checked += 1
    assert checked == sent >= 150

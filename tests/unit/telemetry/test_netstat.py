"""The /proc/net/netstat parser against text captured from a real kernel, and broken layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.telemetry import netstat
from pointsman.telemetry.netstat import NetstatError, SynCounters, parse, syn_counters

# Captured with `cp /proc/net/netstat` on Linux 6.18 (Debian 12 userland) after a test had
# overflowed a listen(4) socket: TcpExt, IpExt and MPTcpExt sections, 135/18/76 counters.
CAPTURED = Path(__file__).with_name("netstat-linux-6.18.txt")


def test_captured_text_parses_into_its_sections() -> None:
    sections = parse(CAPTURED.read_text())
    assert set(sections) == {"TcpExt", "IpExt", "MPTcpExt"}
    assert len(sections["TcpExt"]) == 135
    assert len(sections["IpExt"]) == 18
    assert sections["IpExt"]["InOctets"] == 2110214297


def test_captured_syn_counters() -> None:
    counters = syn_counters(parse(CAPTURED.read_text()))
    assert counters == SynCounters(listen_overflows=131, listen_drops=131, syn_retrans=109,
                                   syncookies_sent=0, syncookies_recv=0, syncookies_failed=0)


def test_an_older_kernel_without_a_counter_reads_zero() -> None:
    text = ("TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n"
            "TcpExt: 7 3 11 12\n")
    assert syn_counters(parse(text)) == SynCounters(11, 12, 0, 7, 3, 0)


def test_no_tcpext_section_reads_zero() -> None:
    assert syn_counters(parse("IpExt: InOctets\nIpExt: 5\n")) == SynCounters(0, 0, 0, 0, 0, 0)


def test_counters_past_64_bits_of_int_stay_exact() -> None:
    big = 2**64 - 1
    assert parse(f"TcpExt: ListenDrops\nTcpExt: {big}\n") == {"TcpExt": {"ListenDrops": big}}


@pytest.mark.parametrize(("text", "why"), [
    ("TcpExt: A B\n", "pairs"),
    ("TcpExt: A B\nIpExt: 1 2\n", "followed by"),
    ("TcpExt: A B\nTcpExt: 1\n", "2 names but 1 values"),
    ("TcpExt: A B\nTcpExt: 1 x\n", "not an integer"),
    ("A B\n1 2\n", "prefix"),
    ("Tcp Ext: A\nTcp Ext: 1\n", "prefix"),
])
def test_malformed_layouts_are_refused(text: str, why: str) -> None:
    with pytest.raises(NetstatError, match=why):
        parse(text)


def test_read_of_a_missing_or_broken_file_is_none(tmp_path: Path) -> None:
    assert netstat.read(tmp_path / "absent") is None
    broken = tmp_path / "netstat"
    broken.write_text("TcpExt: A\n")
    assert netstat.read(broken) is None


def test_read_of_this_hosts_file() -> None:
    if not netstat.PATH.exists():
        pytest.skip("no /proc/net/netstat (not Linux)")
    counters = netstat.read()
    assert counters is not None
    assert counters.listen_drops >= counters.listen_overflows >= 0


names = st.lists(st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,20}", fullmatch=True), min_size=1,
                 max_size=30, unique=True)


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z]{1,10}", fullmatch=True), names), max_size=4,
                unique_by=lambda s: s[0]),
       st.integers(min_value=0, max_value=2**64 - 1))
def test_any_well_formed_text_round_trips(sections: list[tuple[str, list[str]]], value: int) -> None:
    text = "".join(f"{name}: {' '.join(counters)}\n{name}: {' '.join([str(value)] * len(counters))}\n"
                   for name, counters in sections)
    assert parse(text) == {name: dict.fromkeys(counters, value) for name, counters in sections}

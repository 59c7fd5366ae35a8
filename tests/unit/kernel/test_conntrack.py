"""conntrack tool arguments and output, without running it."""

from __future__ import annotations

from pathlib import Path

from pointsman.kernel.conntrack import ConntrackUsage, flow_filter, in_range, live_lines, parse_count, usage
from pointsman.kernel.plan import spec_for

from .helpers import listener, pool


def test_flow_filter() -> None:
    spec = spec_for(listener(), pool())
    assert flow_filter(spec) == ["-p", "tcp", "-f", "ipv4", "--orig-dst", "10.99.100.1",
                                 "--orig-port-dst", "80"]
    assert flow_filter(spec, ("10.99.11.2", 8080))[-4:] == [
        "--reply-src", "10.99.11.2", "--reply-port-src", "8080"]


def test_parse_count() -> None:
    assert parse_count("conntrack v1.4.7 (conntrack-tools): 12 flow entries have been deleted.\n") == 12
    assert parse_count("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been shown.\n") == 0
    assert parse_count("conntrack: command not found") == 0


def test_live_lines_skip_entries_waiting_to_expire() -> None:
    listing = (
        "tcp      6 431999 ESTABLISHED src=10.99.1.2 dst=10.99.100.1 sport=1 dport=80 ...\n"
        "tcp      6 119 TIME_WAIT src=10.99.1.2 dst=10.99.100.1 sport=2 dport=80 ...\n"
        "tcp      6 9 CLOSE src=10.99.1.2 dst=10.99.100.1 sport=3 dport=80 ...\n"
        "udp      17 29 src=10.99.1.2 dst=10.99.1.1 sport=4 dport=53 [UNREPLIED] ...\n"
        "\n"
    )
    assert live_lines(listing) == 2


def test_usage(tmp_path: Path) -> None:
    assert usage(tmp_path) is None
    (tmp_path / "nf_conntrack_count").write_text("42\n")
    (tmp_path / "nf_conntrack_max").write_text("262144\n")
    assert usage(tmp_path) == ConntrackUsage(42, 262144)


def test_a_port_range_is_filtered_by_address_then_by_the_listing() -> None:
    spec = spec_for(listener(bind=["10.99.100.1:30000-30002", "10.99.100.2:80"]), pool())
    ranged, single = spec.entries
    assert flow_filter(spec, entry=ranged) == ["-p", "tcp", "-f", "ipv4", "--orig-dst", "10.99.100.1"]
    assert flow_filter(spec, entry=single)[-2:] == ["--orig-port-dst", "80"]
    line = "tcp      6 431999 ESTABLISHED src=10.99.1.2 dst=10.99.100.1 sport=40000 dport={} src=..."
    assert in_range(line.format(30002), ranged) and not in_range(line.format(30003), ranged)
    assert not in_range("garbage", ranged)

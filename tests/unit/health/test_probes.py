"""ProbeSpec validation and the no-network probe types; real sockets live in tests/interop."""

from __future__ import annotations

import pytest

from pointsman.health.probes import PROBE_TYPES, ProbeSpec, probe


def test_probe_types() -> None:
    assert {"tcp", "send_expect", "http", "tls", "udp", "exec", "agent", "none"} == PROBE_TYPES


@pytest.mark.parametrize(
    "kw",
    [
        dict(type="icmp"),
        dict(timeout=0),
        dict(timeout=-1.0),
        dict(type="udp"),  # no payload
        dict(type="http", http_expect_status=()),
        dict(type="http", http_path="healthz"),
        dict(type="http", http_host="a b"),
    ],
)
def test_spec_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProbeSpec(**kw)  # type: ignore[arg-type]


async def test_none_always_passes_without_connecting() -> None:
    result = await probe(ProbeSpec(type="none"), "192.0.2.1", 9)  # TEST-NET-1: never routed
    assert result.ok and result.detail == "no check"

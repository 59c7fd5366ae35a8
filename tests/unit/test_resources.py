"""The pure parts of `pointsman.proxy.resources`: which errors are ours, the rate-limited log,
the descriptor budget and what a config needs, and the preamble's per-source rule."""

from __future__ import annotations

import errno
import logging
import textwrap

import pytest

from pointsman.config.loader import load_text
from pointsman.proxy.preamble import Preamble
from pointsman.proxy.resources import (
    FD_MARGIN,
    LOG_INTERVAL,
    ErrorLog,
    FdBudget,
    descriptors_needed,
    errno_name,
    fd_reserve,
    is_local,
)


@pytest.mark.parametrize("number", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                    errno.EADDRNOTAVAIL, errno.EADDRINUSE])
def test_shortages_of_ours_are_local(number: int) -> None:
    assert is_local(OSError(number, "x"))


@pytest.mark.parametrize("number", [errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                                    errno.ENETUNREACH, errno.ECONNRESET])
def test_backend_faults_are_not_local(number: int) -> None:
    assert not is_local(OSError(number, "x"))
    assert not is_local(TimeoutError())


def test_errno_names() -> None:
    assert errno_name(errno.EMFILE) == "EMFILE"
    assert errno_name(None) == "unknown"
    assert errno_name(99999) == "99999"


def test_the_log_says_once_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    log = ErrorLog()
    with caplog.at_level(logging.WARNING, "pointsman.resources"):
        assert log.note("lb", "socket", "EMFILE", now=100.0)
        assert not any(log.note("lb", "socket", "EMFILE", now=100.0 + i) for i in range(5))
        assert log.note("lb", "connect", "EMFILE", now=101.0)  # another key: its own interval
        assert log.note("lb", "socket", "EMFILE", now=100.0 + LOG_INTERVAL)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "(5 more since the last message)" in lines[2]
    assert "not a backend fault" in lines[0]


def test_fd_reserve_bounds() -> None:
    assert fd_reserve(256) == 16
    assert fd_reserve(64 * 100) == 100
    assert fd_reserve(1 << 20) == 256


def test_budget_room() -> None:
    budget = FdBudget()
    budget.cap = 10
    budget.used = 8
    assert budget.room()  # 8 + 2 <= 10
    budget.used = 9
    assert not budget.room() and budget.room(1)


def config(text: str) -> object:
    return load_text(textwrap.dedent(text), "t.yaml")


def test_descriptors_needed_per_worker_share() -> None:
    cfg = config("""
        listeners:
          - {name: a, bind: "127.0.0.1:7000", pool: p, max_connections: 1000}
          - {name: b, bind: "127.0.0.1:7001", pool: p, max_connections: 100,
             proxy_protocol: {accept: required}}
          - {name: u, bind: "127.0.0.1:7002", pool: p, protocol: udp, udp: {max_sessions: 300}}
        pools:
          - {name: p, backends: [{address: "127.0.0.1:7009"}]}
    """)
    # a: 2 x 1000; b: 2 x (100 + 10 pending); u: 300 sessions.
    assert descriptors_needed(cfg, 1) == FD_MARGIN + 2000 + 220 + 300  # type: ignore[arg-type]
    assert descriptors_needed(cfg, 2) == FD_MARGIN + 1000 + 2 * (50 + 10) + 150  # type: ignore[arg-type]


@pytest.mark.parametrize(("accept", "trusted", "replaces"), [
    ("off", True, False),  # TLS routing only: the TCP peer is the client
    ("optional", False, False),  # an untrusted peer's header is refused
    ("required", False, False),
    ("optional", True, True),  # a trusted proxy: the client is in the header
    ("required", True, True),
])
def test_per_source_limits_wait_for_the_header_only_when_it_would_be_believed(
        accept: str, trusted: bool, replaces: bool) -> None:
    assert Preamble(accept, trusted, (), "p").may_replace_peer is replaces

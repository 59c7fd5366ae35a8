"""The engine contract: error classification, decisions, the record layout, engine choice."""

from __future__ import annotations

import errno
import struct

import pytest

from pointsman.proxy import engine as engines
from pointsman.proxy.engine.api import (
    EARLY_DATA_MAX,
    RECORD,
    End,
    Op,
    ReadPreamble,
    Status,
    classify,
    iter_records,
)


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                 errno.EADDRNOTAVAIL])
@pytest.mark.parametrize("op", [Op.SOCKET, Op.BIND, Op.CONNECT])
def test_resource_errors_are_ours(op: Op, err: int) -> None:
    assert classify(op, err) is Status.LOCAL


@pytest.mark.parametrize("err", [errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                                 errno.ENETUNREACH, errno.ECONNRESET])
def test_the_backends_failures_are_the_backends(err: int) -> None:
    assert classify(Op.CONNECT, err) is Status.BACKEND


def test_a_source_address_in_use_is_ours_only_at_bind() -> None:
    assert classify(Op.BIND, errno.EADDRINUSE) is Status.LOCAL
    assert classify(Op.CONNECT, errno.EADDRINUSE) is Status.BACKEND


def test_read_preamble_is_bounded() -> None:
    ReadPreamble(EARLY_DATA_MAX, 1.0, 1, 2)
    for bad in (0, EARLY_DATA_MAX + 1):
        with pytest.raises(ValueError):
            ReadPreamble(bad, 1.0, 1, 2)


def test_record_layout_is_fixed() -> None:
    """Native order, no padding: the compiled engine writes this layout with a C struct."""
    assert RECORD.format == "=QiBBHQQqqqqqq" and RECORD.size == 80
    packed = RECORD.pack(7, -1, End.REFUSED, 3, 0xFFFF, 1, 2, 3, 4, 5, 6, 1, 2)
    (record,) = iter_records(packed)
    assert record.conn_id == 7 and record.backend == -1 and record.reason == End.REFUSED
    assert record.detail == 0xFFFF and record.ended == 6 and record.listener == 1
    assert record.connected == 4 and record.attempt == 2
    assert struct.calcsize("=QiBBHQQ") == 32


def test_engine_choice_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engines.ENV, "python")
    assert engines.engine_name() == "python"
    monkeypatch.setenv(engines.ENV, "")
    assert engines.engine_name() == ("cython" if engines.compiled_available() else "python")
    monkeypatch.setenv(engines.ENV, "turbo")
    with pytest.raises(ValueError, match="POINTSMAN_ENGINE"):
        engines.engine_name()
    monkeypatch.setenv(engines.ENV, "cython")
    if engines.compiled_available():
        assert engines.engine_name() == "cython"
    else:
        with pytest.raises(RuntimeError, match="not built"):
            engines.engine_name()


def test_hold_is_a_decision_both_engines_offer_resume_for() -> None:
    from pointsman.proxy.engine.api import HOLD, Hold
    from pointsman.proxy.engine.pyengine import PyEngine

    assert isinstance(HOLD, Hold) and repr(HOLD) == "Hold()"
    assert engines.Hold is Hold
    assert callable(PyEngine.resume)
    if engines.compiled_available():
        from pointsman.proxy.engine._engine import CEngine
        assert callable(CEngine.resume)

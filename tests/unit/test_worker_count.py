"""How many workers a config runs: the config, else POINTSMAN_WORKERS, else one per CPU."""

from __future__ import annotations

import os

import pytest

from pointsman.config.workers import worker_count
from tests.unit.config_support import load

PLAIN = """
    listeners: [{name: a, bind: "127.0.0.1:1", pool: p}]
    pools: [{name: p, backends: [{address: "127.0.0.1:2"}]}]
"""


def test_the_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POINTSMAN_WORKERS", "3")
    assert worker_count(load(PLAIN + "    workers: 2\n")) == 2
    assert worker_count(load(PLAIN)) == 3


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_variable_is_not_given(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("POINTSMAN_WORKERS", value)
    assert worker_count(load(PLAIN)) == (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_wrong_variable_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("POINTSMAN_WORKERS", value)
    with pytest.raises(ValueError, match=f"POINTSMAN_WORKERS must be a positive integer .*{value!r}"):
        worker_count(load(PLAIN))

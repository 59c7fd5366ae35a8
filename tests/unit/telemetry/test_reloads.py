"""`ReloadHistory` counts reload outcomes and keeps the last one (the node records into it)."""

from __future__ import annotations

from pointsman.telemetry.reloads import ReloadHistory


def test_outcomes_are_counted_and_the_last_one_is_kept() -> None:
    history = ReloadHistory()
    assert history == ReloadHistory(0, 0, True, None)  # start: a good config, no reload yet
    history.record(True, 10.0)
    history.record(False, 11.0)
    assert (history.accepted, history.refused, history.last_ok, history.last_at) == (1, 1, False, 11.0)
    history.record(False, 12.0)
    history.record(True, 13.0)
    assert (history.accepted, history.refused, history.last_ok, history.last_at) == (2, 2, True, 13.0)

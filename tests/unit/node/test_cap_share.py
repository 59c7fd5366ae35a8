"""Per-worker shares of backend caps and queue bounds (node.roles.share_of / cap_share)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pointsman.config.loader import load_text
from pointsman.node.roles import cap_share, share_of

CONFIG = """
listeners:
  - {name: pg, bind: "127.0.0.1:6432", pool: pg}
pools:
  - name: pg
    backend_max_connections: 5
    queue: {max: 7, timeout: 3s}
    backends:
      - {address: "127.0.0.1:5432", name: a}
      - {address: "127.0.0.1:5433", name: b, max_connections: 1}
  - name: plain
    backends: [{address: "127.0.0.1:5434"}]
"""


@given(total=st.integers(1, 10_000), workers=st.integers(1, 64))
def test_shares_add_up_exactly_and_none_is_zero(total: int, workers: int) -> None:
    shares = [cap_share(total, workers, i) for i in range(workers)]
    assert min(shares) >= 1
    assert max(shares) - min(shares) <= 1
    assert sum(shares) == max(total, workers)  # exact, or 1 each below the worker count


def test_share_of_splits_caps_and_queue_per_worker() -> None:
    config = load_text(CONFIG, "<t>")
    assert share_of(config, 1, 0) == config or share_of(config, 1, 0).pools == config.pools
    parts = [share_of(config, 2, i).pools[0] for i in range(2)]
    assert [p.backend_max_connections for p in parts] == [3, 2]
    assert [p.queue.max for p in parts] == [4, 3]
    assert [p.queue.timeout for p in parts] == [3.0, 3.0]
    assert [[p.backend_cap(b) for b in p.backends] for p in parts] == [[3, 1], [2, 1]]
    assert share_of(config, 2, 1).pools[1] is config.pools[1]  # no cap: untouched

"""Config of backend caps and the pool queue: defaults, validation with file/line/field, and the
listeners that cannot enforce a cap (UDP, the kernel data plane)."""

from __future__ import annotations

import pytest

from pointsman.config.loader import ConfigError, load_text

BASE = """
listeners:
  - {{name: lb, bind: "127.0.0.1:8080", pool: p{listener}}}
pools:
  - name: p
{pool}
    backends:
      - {{address: "127.0.0.1:9001"{backend}}}
      - {{address: "127.0.0.1:9002"}}
"""


def config(pool: str = "", backend: str = "", listener: str = "") -> str:
    return BASE.format(pool=pool, backend=backend, listener=listener)


def test_defaults_no_cap_and_a_queue_ready() -> None:
    pool = load_text(config(), "t.yaml").pools[0]
    assert pool.backend_max_connections is None
    assert [pool.backend_cap(b) for b in pool.backends] == [None, None]
    assert (pool.queue.max, pool.queue.timeout) == (1000, 5.0)


def test_backend_cap_wins_over_the_pools() -> None:
    pool = load_text(config("    backend_max_connections: 10\n    queue: {max: 0, timeout: 250ms}",
                            ", max_connections: 3"), "t.yaml").pools[0]
    assert [pool.backend_cap(b) for b in pool.backends] == [3, 10]
    assert (pool.queue.max, pool.queue.timeout) == (0, 0.25)


@pytest.mark.parametrize(("pool", "backend", "field", "line"), [
    ("    backend_max_connections: 0", "", "pools[0].backend_max_connections", 6),
    ("", ", max_connections: -1", "pools[0].backends[0].max_connections", 8),
    ("    queue: {max: -1}", "", "pools[0].queue.max", 6),
    ("    queue: {timeout: 0s}", "", "pools[0].queue.timeout", 6),
    ("    queue: {size: 3}", "", "pools[0].queue.size", 6),
])
def test_bad_values_name_file_line_and_field(pool: str, backend: str, field: str,
                                             line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(config(pool, backend), "t.yaml")
    assert f"t.yaml:{line}: {field}" in str(caught.value)


@pytest.mark.parametrize(("listener", "what"), [(", protocol: udp", "UDP sessions"),
                                                (", dataplane: kernel", "kernel data plane")])
def test_caps_refused_where_they_cannot_be_enforced(listener: str, what: str) -> None:
    with pytest.raises(ConfigError, match=f"listeners\\[0\\].pool: .*{what}"):
        load_text(config("", ", max_connections: 3", listener), "t.yaml")

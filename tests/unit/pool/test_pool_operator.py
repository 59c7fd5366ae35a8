"""Pool snapshots with backups, panic and agent replies; `route` down fallback chains. No I/O:
configs in, snapshots and counters out."""

from __future__ import annotations

from typing import Any

from pointsman.config.model import PoolConfig
from pointsman.health.dialects import AgentReply
from pointsman.health.probes import ProbeResult
from pointsman.pool.events import AgentScale
from pointsman.pool.pool import Pool
from pointsman.pool.state import BackendState


def pool_config(name: str = "p", backends: list[dict[str, Any]] | None = None,
                **extra: Any) -> PoolConfig:
    backends = backends or [{"address": "127.0.0.1:1", "name": "a"},
                            {"address": "127.0.0.1:2", "name": "b"}]
    return PoolConfig.model_validate({"name": name, "backends": backends, **extra})


def serving(pool: Pool) -> dict[str, float]:
    return {b.id: b.effective_weight for b in pool.snapshot.backends if b.effective_weight > 0}


def down(pool: Pool, *ids: str) -> None:
    for backend in ids:
        pool.health_verdict(backend, False, "test")


def test_backups_take_over_and_hand_back() -> None:
    pool = Pool(pool_config(backends=[
        {"address": "127.0.0.1:1", "name": "a"},
        {"address": "127.0.0.1:2", "name": "b", "weight": 3},
        {"address": "127.0.0.1:3", "name": "spare1", "backup": True},
        {"address": "127.0.0.1:4", "name": "spare2", "backup": True, "weight": 2},
    ], algorithm="weighted_round_robin"))
    assert serving(pool) == {"a": 1.0, "b": 3.0} and pool.snapshot.mode == "primary"
    down(pool, "a")
    assert serving(pool) == {"b": 3.0}
    down(pool, "b")
    assert serving(pool) == {"spare1": 1.0, "spare2": 2.0} and pool.snapshot.mode == "backup"
    picks = [pool.snapshot.picker.pick(b"") for _ in range(30)]
    assert sorted(pool.snapshot.backends[i].id for i in picks if i is not None).count("spare2") == 20
    pool.health_verdict("a", True, "test")
    assert serving(pool) == {"a": 1.0} and pool.snapshot.mode == "primary"
    assert [b.backup for b in pool.snapshot.backends] == [False, False, True, True]


def test_panic_mode_in_the_snapshot() -> None:
    backends = [{"address": f"127.0.0.1:{i}", "name": f"b{i}"} for i in range(1, 5)]
    check = {"type": "tcp"}
    pool = Pool(pool_config(backends=backends, panic_threshold="50%", health_check=check))
    down(pool, "b1", "b2")
    assert pool.snapshot.mode == "primary" and pool.snapshot.available == 2  # 2 of 4: not below
    down(pool, "b3")
    assert pool.snapshot.panic and pool.snapshot.available == 4
    pool.maintenance("b4")
    assert pool.snapshot.panic and serving(pool) == {"b1": 1.0, "b2": 1.0, "b3": 1.0}  # not b4
    pool.drain("b1")
    pool.drain("b2")
    pool.drain("b3")
    assert pool.snapshot.mode == "none" and pool.snapshot.available == 0  # no eligible one left
    for backend in ("b1", "b2", "b3", "b4"):
        pool.enable(backend)
    pool.reconfigure(pool_config(backends=backends, health_check=check))  # panic off again
    assert pool.snapshot.mode == "primary" and serving(pool) == {"b4": 1.0}


def test_route_follows_the_fallback_chain_and_counts() -> None:
    a = Pool(pool_config("a", fallback_pool="b"))
    b = Pool(pool_config("b", fallback_pool="c"))
    c = Pool(pool_config("c"))
    pools = {"a": a, "b": b, "c": c}
    assert a.route(pools) is a and a.fallbacks == 0
    down(a, "a", "b")
    assert a.route(pools) is b and a.fallbacks == 1
    down(b, "a", "b")
    assert a.route(pools) is c and a.fallbacks == 2
    down(c, "a", "b")
    assert a.route(pools) is None and a.fallbacks == 2
    assert b.fallbacks == 0  # counted where the connection arrived


def test_route_without_fallback_or_with_a_missing_pool() -> None:
    a = Pool(pool_config("a", fallback_pool="gone"))
    down(a, "a", "b")
    assert a.route({"a": a}) is None
    lone = Pool(pool_config("lone"))
    down(lone, "a", "b")
    assert lone.route({"lone": lone}) is None


def agent(pool: Pool, backend: str, reply: AgentReply) -> None:
    pool.record_check(backend, ProbeResult(reply.state != "down", 0.001, str(reply), reply,
                                           reply.state is not None))


def test_agent_percentages_scale_the_weight() -> None:
    pool = Pool(pool_config(backends=[{"address": "127.0.0.1:1", "name": "a", "weight": 4},
                                      {"address": "127.0.0.1:2", "name": "b"}],
                            health_check={"type": "agent", "port": 9}))
    agent(pool, "a", AgentReply(percent=50))
    assert serving(pool) == {"a": 2.0, "b": 1.0}
    agent(pool, "a", AgentReply(state="up"))  # no percentage: the last one stays (HAProxy)
    assert serving(pool)["a"] == 2.0
    pool.set_weight("a", 10)  # the operator's weight is the base the agent scales
    assert serving(pool)["a"] == 5.0
    agent(pool, "b", AgentReply(percent=0))
    assert serving(pool) == {"a": 5.0}
    pool.reconfigure(pool_config(backends=[{"address": "127.0.0.1:1", "name": "a", "weight": 4},
                                           {"address": "127.0.0.1:2", "name": "b"}]))
    assert serving(pool) == {"a": 4.0, "b": 1.0}  # agent gone: its scale goes


def test_agent_admin_words_move_the_backend_on_change_only() -> None:
    pool = Pool(pool_config(health_check={"type": "agent", "port": 9}))
    seen: list[tuple[str, str]] = []
    pool.subscribe(lambda _p, backend, t: seen.append((backend, t.new.value)))
    agent(pool, "a", AgentReply(admin="ready"))
    assert seen == []  # "ready" from the start is no change
    pool.drain("a", "operator")
    agent(pool, "a", AgentReply(admin="ready", state="up"))
    assert pool.member("a").machine.state is BackendState.DRAINING  # the operator's drain stands
    agent(pool, "a", AgentReply(admin="maint"))
    agent(pool, "a", AgentReply(admin="maint"))
    assert pool.member("a").machine.state is BackendState.MAINTENANCE
    agent(pool, "a", AgentReply(admin="ready"))
    assert pool.member("a").machine.state is BackendState.UP
    assert seen == [("a", "draining"), ("a", "maintenance"), ("a", "up")]
    assert [t.reason for t in pool.member("a").machine.history][-2:] == ["agent: maint", "agent: ready"]


def test_agent_weight_reaches_the_sink_for_worker_mirrors() -> None:
    pool = Pool(pool_config(health_check={"type": "agent", "port": 9}))
    sent: list[object] = []
    pool.sink = sent.append
    agent(pool, "a", AgentReply(percent=75))
    assert AgentScale("p", "a", 0.75) in sent
    mirror = Pool(pool_config(health_check={"type": "agent", "port": 9}), mirror=True)
    mirror.set_agent_scale("a", 0.75)
    assert serving(mirror) == serving(pool)

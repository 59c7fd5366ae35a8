"""Engine targets per pool snapshot (pointsman/proxy/targets.py): made once per backend and
address, kept across snapshots that change nothing about them, with the pool's settings."""

from __future__ import annotations

from typing import Any

import yaml

from pointsman.config.loader import load_text
from pointsman.config.model import PoolConfig
from pointsman.pool.pool import Pool
from pointsman.proxy.engine.pyengine import PyTarget
from pointsman.proxy.targets import PoolTargets, settings


class Targets:
    """Makes the pure-Python engine's targets (parsing only: no socket, no loop)."""

    def __init__(self) -> None:
        self.made: list[PyTarget] = []

    def target(self, backend: int, host: str, port: int, **options: Any) -> PyTarget:
        options.setdefault("source", None)
        options.setdefault("nodelay", True)
        options.pop("load", None)  # shared loads are the engine's (none here)
        made = PyTarget(backend, host, port, **options)
        self.made.append(made)
        return made


def pool_config(**extra: Any) -> PoolConfig:
    pool = {"name": "p", "backends": [{"address": "127.0.0.1:8001"},
                                      {"address": "127.0.0.1:8002"}], **extra}
    text = yaml.safe_dump({"listeners": [{"name": "lb", "bind": "127.0.0.1:9000", "pool": "p"}],
                           "pools": [pool]})
    return load_text(text, "<test>").pools[0]


def test_settings_keep_the_shorter_fin_timeout_and_zero_copy() -> None:
    config = pool_config(idle_timeout="60s", half_close_timeout="5s", zero_copy="auto",
                         zero_copy_after=4096)
    assert settings(config)["half_close_timeout"] == 5.0
    assert settings(config)["splice_after"] == 4096
    # A FIN timeout longer than the idle timeout: the idle timeout rules after a FIN too.
    assert settings(pool_config(idle_timeout="1s", half_close_timeout="30s"))["half_close_timeout"] == 0
    assert settings(pool_config(zero_copy="off"))["splice_after"] is None
    assert settings(pool_config(source={"mode": "transparent"}))["transparent"] is True


def test_targets_follow_snapshots_and_are_kept_when_nothing_changed() -> None:
    engine = Targets()
    pool = Pool(pool_config())
    targets = PoolTargets(engine)  # type: ignore[arg-type]
    first = targets.of(pool.snapshot)
    assert [slot.id for slot in first if slot] == [b.id for b in pool.snapshot.backends]
    assert len(engine.made) == 2 and targets.plain
    assert targets.of(pool.snapshot) is first  # the same snapshot: nothing made
    pool.drain(pool.snapshot.backends[0].id)  # a new snapshot, same addresses
    again = targets.of(pool.snapshot)
    assert [s.target if s else None for s in again] == [s.target if s else None for s in first]
    assert len(engine.made) == 2
    ids = {t.backend for t in engine.made}
    assert len(ids) == 2 and all(i > 0 for i in ids)


def test_a_new_pool_config_makes_new_targets_with_new_ids() -> None:
    engine = Targets()
    pool = Pool(pool_config())
    targets = PoolTargets(engine)  # type: ignore[arg-type]
    before = {s.target.backend for s in targets.of(pool.snapshot) if s}
    pool.reconfigure(pool_config(connect_timeout="500ms", proxy_protocol={"send": "v1"}))
    after = targets.of(pool.snapshot)
    assert {s.target.backend for s in after if s}.isdisjoint(before)
    assert all(s and s.target.connect_ns == 500_000_000 for s in after)
    assert not targets.plain  # a PROXY header to send: not the fast path


def test_a_backend_whose_address_cannot_be_used_has_no_slot() -> None:
    class Refusing(Targets):
        def target(self, backend: int, host: str, port: int, **options: Any) -> PyTarget:
            if port == 8002:
                raise ValueError("not usable")
            return super().target(backend, host, port, **options)

    targets = PoolTargets(Refusing())  # type: ignore[arg-type]
    slots = targets.of(Pool(pool_config()).snapshot)
    assert [slot is None for slot in slots] == [False, True]

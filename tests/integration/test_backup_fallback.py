"""Backup backends, fallback pools and panic mode through real sockets.

Health is made to fail on purpose through `health_check_address` sidecars, so a backend can be
"down" while its traffic port still answers: that is how panic mode ("regardless of health") is
seen for real. Connections say which backend served them (NamedBackend greetings).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

from pointsman.config.loader import load_text
from pointsman.config.model import ListenerConfig, PoolConfig
from pointsman.pool.pool import Pool
from pointsman.pool.state import BackendState
from pointsman.proxy.udp import UdpListener
from pointsman.telemetry.flow import RejectReason
from tests.integration.peers import (
    NamedBackend,
    ask_name,
    config_text,
    listen_address,
    named_backends,
    tcp_stats,
)
from tests.integration.udp_support import udp_clients, udp_echo
from tests.support import LOOPBACK, free_port, running, wait_for

DOWN, UP = BackendState.DOWN, BackendState.UP
SETTLE = 10.0
FAST_CHECK = {"type": "tcp", "interval": "0.1s", "timeout": "0.1s", "rise": 1, "fall": 1}


async def names(address: str, count: int) -> Counter[str]:
    return Counter([await ask_name(address) for _ in range(count)])


async def wait_states(pool: Pool, states: dict[str, BackendState]) -> None:
    await wait_for(lambda: all(pool.member(b).machine.state is s for b, s in states.items()),
                   SETTLE, what=f"states {states}")


async def test_backups_serve_only_while_no_primary_is_available() -> None:
    async with named_backends("a", "b", "c", "d") as (a, b, c, d):
        listen = listen_address()
        text = config_text([{"name": "lb", "bind": listen, "pool": "p"}], [{
            "name": "p", "backends": [a.config(), b.config(), c.config(backup=True),
                                      d.config(backup=True)],
            "health_check": FAST_CHECK, "passive": {"consecutive_failures": 0}}])
        async with running(text) as runtime:
            pool = runtime.pools["p"]
            assert await names(listen, 8) == Counter({"a": 4, "b": 4})
            a.stop_listening()
            await wait_states(pool, {"a": DOWN})
            assert await names(listen, 4) == Counter({"b": 4})  # one primary left: no backup
            b.stop_listening()
            await wait_states(pool, {"b": DOWN})
            assert pool.snapshot.mode == "backup"
            assert await names(listen, 8) == Counter({"c": 4, "d": 4})  # balanced among backups
            a.listen()
            await wait_states(pool, {"a": UP})
            assert await names(listen, 4) == Counter({"a": 4})
            assert tcp_stats(runtime).rejected[RejectReason.NO_BACKEND] == 0


async def test_fallback_pool_takes_new_connections_and_is_counted() -> None:
    async with named_backends("a", "sorry") as (a, sorry):
        listen = listen_address()
        pools = [{"name": "p", "backends": [a.config()], "health_check": FAST_CHECK,
                  "fallback_pool": "s"},
                 {"name": "s", "backends": [sorry.config()]}]
        text = config_text([{"name": "lb", "bind": listen, "pool": "p"}], pools)
        async with running(text) as runtime:
            p = runtime.pools["p"]
            assert await names(listen, 3) == Counter({"a": 3}) and p.fallbacks == 0
            a.stop_listening()
            await wait_states(p, {"a": DOWN})
            assert await names(listen, 5) == Counter({"sorry": 5})
            assert p.fallbacks == 5 and runtime.pools["s"].fallbacks == 0
            # Reload without fallback_pool: the empty pool refuses again.
            del pools[0]["fallback_pool"]
            await runtime.apply(load_text(config_text([{"name": "lb", "bind": listen,
                                                        "pool": "p"}], pools), "<reload>"))
            before = tcp_stats(runtime).rejected[RejectReason.NO_BACKEND]
            reader, writer = await asyncio.open_connection(*listen.rsplit(":", 1))
            assert await reader.read(10) == b""  # refused: closed without a greeting
            writer.close()
            await wait_for(lambda: tcp_stats(runtime).rejected[RejectReason.NO_BACKEND] == before + 1,
                           SETTLE, what="the refusal counted")


async def test_panic_spreads_over_unhealthy_backends() -> None:
    async with named_backends("a", "b", "c", "d") as peers:
        sidecars = [NamedBackend(f"check-{p.name}") for p in peers]
        for sidecar in sidecars:
            sidecar.listen()
        try:
            listen = listen_address()
            pool_config = {
                "name": "p", "panic_threshold": "50%", "health_check": FAST_CHECK,
                "backends": [p.config(health_check_address=s.address)
                             for p, s in zip(peers, sidecars, strict=True)],
                "passive": {"consecutive_failures": 0}}
            text = config_text([{"name": "lb", "bind": listen, "pool": "p"}], [pool_config])
            async with running(text) as runtime:
                pool = runtime.pools["p"]
                for sidecar in sidecars[1:]:
                    sidecar.stop_listening()  # b, c, d fail their checks but still serve
                await wait_states(pool, {"b": DOWN, "c": DOWN, "d": DOWN})
                assert pool.snapshot.panic
                assert await names(listen, 8) == Counter({"a": 2, "b": 2, "c": 2, "d": 2})
                await runtime.apply(load_text(config_text(
                    [{"name": "lb", "bind": listen, "pool": "p"}],
                    [{**pool_config, "panic_threshold": 0}]), "<reload>"))
                assert pool.snapshot.mode == "primary"
                assert await names(listen, 4) == Counter({"a": 4})  # panic off: health rules
        finally:
            for sidecar in sidecars:
                await sidecar.close()


async def test_udp_sessions_follow_the_fallback_pool() -> None:
    """The UDP hook, with the listener given the pools (the runtime wiring is the lead's)."""
    loop = asyncio.get_running_loop()
    async with udp_echo() as primary, udp_echo() as sorry:
        main_pool = Pool(PoolConfig.model_validate({
            "name": "p", "fallback_pool": "s",
            "backends": [{"address": primary.address, "name": "primary"}]}))
        sorry_pool = Pool(PoolConfig.model_validate({
            "name": "s", "backends": [{"address": sorry.address, "name": "sorry"}]}))
        port = free_port(kind=socket.SOCK_DGRAM)
        config = ListenerConfig.model_validate({"name": "u", "bind": f"{LOOPBACK}:{port}",
                                                "protocol": "udp", "pool": "p"})
        listener = UdpListener(config, main_pool, loop, pools={"p": main_pool, "s": sorry_pool})
        await listener.start()
        try:
            async with udp_clients((LOOPBACK, port), 2) as (first, second):
                await first.request(b"one")
                assert primary.count == 1 and sorry.count == 0
                main_pool.health_verdict("primary", False, "test")
                await second.request(b"two")  # a new session: the fallback pool
                assert sorry.count == 1 and main_pool.fallbacks == 1
                session = listener.sessions[second.local]
                assert session.pool is sorry_pool and session.backend_id == "sorry"
                await second.request(b"three")  # stays in the fallback pool, counted once
                assert sorry.count == 2 and main_pool.fallbacks == 1
                await first.request(b"four")  # the first session moves there too
                assert sorry.count == 3 and main_pool.fallbacks == 2
                main_pool.health_verdict("primary", True, "test")
                await second.request(b"five")  # the primary is back: sessions return to it
                await first.request(b"six")
                assert (primary.count, sorry.count) == (3, 3)
                assert listener.sessions[second.local].pool is main_pool
        finally:
            listener.stop_accepting()
            listener.close_all()

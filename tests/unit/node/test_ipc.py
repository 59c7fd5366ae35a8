"""The control <-> worker protocol: every message round-trips, the decoder refuses what is not
a message (without running anything), the handshake refuses another version, and a Channel
carries frames in order over a real socketpair."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import pickle
import socket
import struct
import textwrap
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from pointsman.config.addresses import HostPort
from pointsman.config.loader import load_text
from pointsman.config.model import Config
from pointsman.node import ipc
from pointsman.node.activation import PassedSocket
from pointsman.node.ipc import (
    IPC_VERSION,
    AgentScaleSet,
    ApplyConfig,
    Channel,
    CloseConnections,
    ConfigApplied,
    IpcError,
    ListenerAcl,
    PoolEvent,
    Ready,
    Signal,
    Start,
    StartFailed,
    StatsReport,
    Stop,
    Stopped,
    WeightSet,
    check_version,
    decode,
    encode,
)
from pointsman.pool.events import (
    AgentScale,
    BackendDecisions,
    BackendEvent,
    PassiveSignal,
    PoolState,
    WeightChange,
)
from pointsman.pool.state import BackendState, Event
from pointsman.telemetry.flow import DropReason, EndReason, RejectReason
from pointsman.telemetry.process import ProcessFigures
from pointsman.telemetry.stats import BackendStats, ListenerStats, PoolStats
from pointsman.telemetry.udp_stats import UdpListenerStats

CONFIG = textwrap.dedent("""
    shutdown_grace: 12s
    workers: 2
    admin:
      bind: "127.0.0.1:9901"
    flow_log:
      path: "-"
      sample: 0.5
    shedding:
      max_connections: 5000
      max_loop_lag: 250ms
    listeners:
      - name: web
        bind: "127.0.0.1:8080"
        pool: web
        max_connections: 2000
        limits:
          max_connections_per_source: 20
          new_connections_per_second_per_source: 5
          source_prefix_v6: 56
      - name: tls
        bind: "[::1]:8443"
        default_pool: web
        tls_routes:
          - server_names: ["db.example"]
            pool: db
        proxy_protocol:
          accept: optional
          trusted_sources: ["10.0.0.0/8"]
      - name: dns
        bind: "127.0.0.1:5353"
        protocol: udp
        pool: dns
        udp:
          session_timeout: 10s
          responses: 1
    pools:
      - name: web
        algorithm: maglev
        maglev_table_size: 251
        slow_start: 30s
        affinity:
          timeout: 5m
        health_check:
          type: http
          interval: 1s
          timeout: 500ms
          http:
            path: /healthz
            expect_status: [200, 204]
        backends:
          - address: "127.0.0.1:9001"
            name: a
            weight: 3
          - address: "127.0.0.1:9002"
            name: b
          - address: "[::1]:9003"
      - name: db
        algorithm: least_connections
        health_check:
          type: send_expect
          send: "PING\\r\\n"
          expect: "+PONG"
        passive:
          consecutive_failures: 3
          base_ejection: 10s
        proxy_protocol:
          send: v2
        backends:
          - address: "127.0.0.1:6379"
            name: redis-1
          - address: "127.0.0.1:6380"
            name: redis-2
      - name: dns
        algorithm: source_hash
        health_check:
          type: udp
          send_hex: "00"
        backends:
          - address: "127.0.0.1:53"
""")


@functools.cache
def config() -> Config:
    """Loaded once (configs are immutable; the loader takes tens of milliseconds)."""
    return load_text(CONFIG, "ipc-test.yaml")


def listener_stats() -> ListenerStats:
    stats = ListenerStats(1000)
    stats.accepted, stats.active, stats.bytes_in, stats.bytes_out = 120, 7, 4096, 81920
    stats.connect_failed, stats.retried, stats.spliced, stats.source_port_failures = 3, 2, 1, 1
    stats.rejected.update({RejectReason.TABLE_FULL: 4, RejectReason.SOURCE_CONNECTION_LIMIT: 9})
    stats.ended.update({EndReason.CLIENT_FIN: 100, EndReason.BACKEND_RESET: 6})
    for value in (0.0002, 0.003, 0.04, 2.0):
        stats.ttfb.observe(value)
    for value in (0.5, 12.0, 4000.0):
        stats.duration.observe(value)
    return stats


def udp_stats() -> UdpListenerStats:
    stats = UdpListenerStats(500)
    stats.sessions, stats.sessions_created = 3, 40
    stats.sessions_ended.update({"idle_timeout": 30, "responses": 7})
    stats.datagrams_in, stats.datagrams_out, stats.bytes_in, stats.bytes_out = 90, 80, 9000, 8000
    stats.drops.update({DropReason.NO_BACKEND: 2, DropReason.SEND_FAILED: 1})
    return stats


def backend_stats(seed: int) -> BackendStats:
    stats = BackendStats()
    stats.active, stats.total, stats.connect_failures = seed, 10 * seed, seed // 2
    stats.bytes_in, stats.bytes_out = 1000 * seed, 2000 * seed
    stats.connect_time.observe(0.0001 * seed)
    stats.connect_time.observe(0.02)
    return stats


def samples() -> dict[type, object]:
    """One realistic instance of every message type."""
    cfg = config()
    figures = ProcessFigures("worker-1", 4242, 1_700_000_000.5, 12.25, 48 << 20, 37, 1024, 0.003)
    decisions = (
        PoolState("web", (BackendDecisions("a", BackendState.UP, True, False, 3),
                          BackendDecisions("b", BackendState.DOWN, False, True, 1),
                          BackendDecisions("[::1]:9003", BackendState.DRAINING, True, False, 0))),
        PoolState("db", (BackendDecisions("redis-1", BackendState.EJECTED, True, True, 1),
                         BackendDecisions("redis-2", BackendState.MAINTENANCE, False, False, 1))),
        PoolState("dns", (BackendDecisions("127.0.0.1:53", BackendState.UP, True, False, 1),)),
    )
    return {
        Start: Start(IPC_VERSION, 1, 2, cfg, decisions,
                     (ListenerAcl("web", "deny", ("192.0.2.0/24", "2001:db8::/32")),),
                     (PassedSocket(3, "web", "tcp", HostPort("127.0.0.1", 8080)),
                      PassedSocket(4, "pointsman.socket", None, None))),
        PoolEvent: PoolEvent(BackendEvent("web", "b", Event.HEALTH_DOWN, "health check failed: 503")),
        WeightSet: WeightSet(WeightChange("web", "a", 7)),
        AgentScaleSet: AgentScaleSet(AgentScale("web", "a", 0.75)),
        ListenerAcl: ListenerAcl("web", "allow", ("127.0.0.0/8",)),
        CloseConnections: CloseConnections("web", "a", EndReason.DRAIN_TIMEOUT),
        ApplyConfig: ApplyConfig(3, cfg),
        Stop: Stop(12.0),
        Ready: Ready(IPC_VERSION, 1, 4242),
        StartFailed: StartFailed(1, "[Errno 98] Address already in use: 127.0.0.1:8080"),
        Signal: Signal(PassiveSignal("db", "redis-1", ok=False)),
        StatsReport: StatsReport(
            index=1,
            listeners={"web": listener_stats(), "tls": ListenerStats(10), "dns": udp_stats()},
            accepting=frozenset({"web", "dns"}),
            backends={("web", "a"): backend_stats(3), ("db", "redis-2"): backend_stats(8)},
            process=figures,
            flow_log_dropped=17,
            ages={("web", "web"): 12.5, ("tls", "db"): 0.0},
            at=123.25,
            pools={"web": pool_stats(4)},
        ),
        ConfigApplied: ConfigApplied(3, 1, ("cannot bind 127.0.0.1:8081: in use", "second")),
        Stopped: Stopped(1),
    }


def pool_stats(seed: int) -> PoolStats:
    stats = PoolStats()
    stats.queued, stats.queued_total = seed, seed * 10
    stats.queue_wait.observe(seed / 10)
    return stats


def plain(value: object) -> object:
    """A structural picture of `value` that == compares completely: the classes without __eq__
    (statistics, histograms) become (type, fields), Counter keys keep their type (an enum key
    that came back as a str is a difference)."""
    if isinstance(value, Counter):
        return ("Counter", sorted((type(k).__name__, str(k), n) for k, n in value.items()))
    if isinstance(value, enum.Enum):
        return (type(value).__name__, value.value)
    if isinstance(value, Config):
        return value  # pydantic: == compares every field
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,
                {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        return ("mapping", sorted(((repr(k), plain(v)) for k, v in value.items()), key=repr))
    if isinstance(value, frozenset | set):
        return (type(value).__name__, sorted(map(repr, value)))
    if isinstance(value, tuple | list):
        return (type(value).__name__, [plain(v) for v in value])
    slots = getattr(type(value), "__slots__", None)
    if slots is not None:
        return (type(value).__name__, {name: plain(getattr(value, name)) for name in slots})
    return value


def framed(message: ipc.Message) -> bytes:
    frame = encode(message)
    (size,) = struct.unpack("!I", frame[:4])
    assert size == len(frame) - 4
    return frame[4:]


# --- the message list ------------------------------------------------------------------------------


def _module_dataclasses() -> set[type]:
    return {obj for obj in vars(ipc).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj)
            and obj.__module__ == ipc.__name__}


def test_every_dataclass_of_the_module_is_a_message() -> None:
    """A message type added to ipc.py but forgotten in MESSAGES (or in the unions) fails here."""
    declared = _module_dataclasses()
    assert declared, "introspection found no dataclass in pointsman.node.ipc"
    assert set(ipc.MESSAGES) == declared
    assert len(ipc.MESSAGES) == len(declared)
    to_worker = set(typing.get_args(ipc.ToWorker))
    to_control = set(typing.get_args(ipc.ToControl))
    assert not to_worker & to_control
    assert to_worker | to_control == declared
    assert set(typing.get_args(ipc.Message)) == declared


def test_messages_are_frozen_and_typed() -> None:
    for cls in ipc.MESSAGES:
        params = getattr(cls, "__dataclass_params__")  # noqa: B009
        assert params.frozen, cls.__name__
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert hints[f.name] is not typing.Any, f"{cls.__name__}.{f.name} is Any"


def test_the_samples_cover_every_message() -> None:
    assert set(samples()) == set(ipc.MESSAGES)


@pytest.mark.parametrize("cls", ipc.MESSAGES, ids=lambda cls: cls.__name__)
def test_round_trip(cls: type) -> None:
    message = samples()[cls]
    assert isinstance(message, cls)
    decoded = decode(framed(typing.cast(ipc.Message, message)))
    assert type(decoded) is cls
    assert plain(decoded) == plain(message)


def test_round_trip_keeps_the_config_exact() -> None:
    start = samples()[Start]
    assert isinstance(start, Start)
    decoded = decode(framed(start))
    assert isinstance(decoded, Start)
    assert decoded.config == start.config
    web = decoded.config.pool("web")
    assert [b.address.host for b in web.backends] == ["127.0.0.1", "127.0.0.1", "::1"]
    assert web.health_check is not None and web.health_check.http.expect_status == [200, 204]
    assert decoded.config.listeners[0].limits.source_prefix_v6 == 56
    assert decoded.pools[1].backends[0].state is BackendState.EJECTED


def test_round_trip_keeps_counter_keys_and_histograms() -> None:
    report = samples()[StatsReport]
    assert isinstance(report, StatsReport)
    decoded = decode(framed(report))
    assert isinstance(decoded, StatsReport)
    web = decoded.listeners["web"]
    assert isinstance(web, ListenerStats)
    assert all(type(k) is RejectReason for k in web.rejected)
    assert all(type(k) is EndReason for k in web.ended)
    assert web.rejected[RejectReason.SOURCE_CONNECTION_LIMIT] == 9
    assert web.ttfb.count == 4 and web.ttfb.counts == listener_stats().ttfb.counts
    assert web.duration.bounds == listener_stats().duration.bounds
    dns = decoded.listeners["dns"]
    assert isinstance(dns, UdpListenerStats)
    assert all(type(k) is DropReason for k in dns.drops)
    assert decoded.backends[("db", "redis-2")].connect_time.count == 2


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(IpcError, match="not a message"):
        encode(PassiveSignal("web", "a", ok=True))  # type: ignore[arg-type]
    with pytest.raises(IpcError, match="not a message"):
        encode(("start", 1))  # type: ignore[arg-type]


def test_encode_refuses_an_oversize_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc, "MAX_FRAME", 1000)
    encode(Stopped(1))
    with pytest.raises(IpcError, match="over the 1000 byte frame limit"):
        encode(StartFailed(0, "x" * 2000))


# --- what the decoder refuses ----------------------------------------------------------------------


def test_decode_refuses_a_pickle_of_a_non_message() -> None:
    for value in (PassiveSignal("web", "a", ok=False), {"kind": "start"}, ("ready", 1, 2), 42,
                  listener_stats()):
        with pytest.raises(IpcError, match="not a message"):
            decode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


class _Call:
    """Pickles as a call of `target(*args)` (what an attacker's pickle looks like)."""

    def __init__(self, target: Callable[..., object], *args: object) -> None:
        self.target = target
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.target, self.args


def _global_call(module: str, name: str, *args: object) -> bytes:
    """A protocol-4 pickle calling module.name(*args), written opcode by opcode (so `name` can
    be any string, a dotted path included)."""
    out = b"\x80\x04"
    for text in (module, name):
        data = text.encode()
        out += pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    out += pickle.STACK_GLOBAL
    out += pickle.dumps(args, protocol=4)[2:-1]  # the argument tuple, without PROTO and STOP
    return out + pickle.REDUCE + pickle.STOP


def _marker_command(marker: Path) -> str:
    return f"touch {marker}"


def test_decode_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    import os

    marker = tmp_path / "ran"
    payload = pickle.dumps(_Call(os.system, _marker_command(marker)), protocol=2)
    assert b"system" in payload
    with pytest.raises(IpcError, match="refusing"):
        decode(payload)
    # The same call wrapped inside a real message: refused too, before the message is built.
    wrapped = pickle.dumps(StartFailed(0, _Call(os.system, _marker_command(marker))))  # type: ignore[arg-type]
    with pytest.raises(IpcError, match="refusing"):
        decode(wrapped)
    assert not marker.exists()


@pytest.mark.parametrize(("module", "name"), [
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("collections", "namedtuple"),  # an allowed module, but a function
    ("copyreg", "add_extension"),
    ("pointsman.config.loader", "load_file"),  # our own functions are not classes either
    ("pointsman.node.roles", "os.system"),  # a dotted path to a function through our module
])
def test_decode_refuses_globals_outside_the_allowed_set(module: str, name: str,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(IpcError, match="refusing"):
        decode(_global_call(module, name, _marker_command(marker)))
    assert not marker.exists()


def test_decode_refuses_a_dotted_path_to_a_class_without_calling_it(tmp_path: Path) -> None:
    """pointsman.kernel.conntrack imports subprocess, so "subprocess.Popen" is reachable from
    it by a dotted name (pickle protocol 4 resolves dotted names), and Popen is a class: the
    "classes only" rule alone would let a REDUCE call it and run a command."""
    marker = tmp_path / "ran"
    payload = _global_call("pointsman.kernel.conntrack", "subprocess.Popen", ["touch", str(marker)])
    with pytest.raises(IpcError, match=r"refusing pointsman\.kernel\.conntrack\.subprocess\.Popen"):
        decode(payload)
    assert not marker.exists()
    # A dotted path to one of our own classes is refused as well: messages never need one.
    with pytest.raises(IpcError, match="refusing"):
        decode(_global_call("pointsman.node.ipc", "Stopped.__class__", "x"))


def test_decode_does_not_import_a_module_that_runs_code() -> None:
    try:
        with pytest.raises(IpcError):
            decode(_global_call("pointsman.__main__", "Nothing", 1))
    except SystemExit as exc:
        pytest.fail(f"decode raised SystemExit({exc.code}) from importing pointsman.__main__")


def test_decode_refuses_a_truncated_frame() -> None:
    payload = framed(typing.cast(ipc.Message, samples()[StatsReport]))
    for cut in (0, 1, 2, len(payload) // 2, len(payload) - 1):
        with pytest.raises(IpcError):
            decode(payload[:cut])


def test_decode_refuses_garbage() -> None:
    for payload in (b"\x00\x01\x02", b"not a pickle at all", b"\x80\x05" + b"\xff" * 10):
        with pytest.raises(IpcError):
            decode(payload)


# --- version ------------------------------------------------------------------------------------------


def test_check_version() -> None:
    check_version(IPC_VERSION)
    for other in (IPC_VERSION - 1, IPC_VERSION + 1, 0):
        with pytest.raises(IpcError, match=f"version {other}"):
            check_version(other)


# --- channel over a real socketpair ------------------------------------------------------------------


async def _pair() -> tuple[Channel, Channel]:
    left, right = socket.socketpair()
    return await Channel.open(left), await Channel.open(right)


def _many(count: int) -> Iterator[ipc.Message]:
    for i in range(count):
        kind = i % 4
        if kind == 0:
            yield Signal(PassiveSignal("web", f"b{i}", ok=bool(i % 3)))
        elif kind == 1:
            yield WeightSet(WeightChange("web", f"b{i}", i % 1000))
        elif kind == 2:
            yield ConfigApplied(i, 0, ())
        else:
            yield StartFailed(i, "x" * (i * 37 % 5000))  # frames of varied sizes


async def test_channel_carries_many_frames_in_order() -> None:
    left, right = await _pair()
    try:
        sent = list(_many(2000))

        async def send_all() -> None:
            for n, message in enumerate(sent):
                left.send(message)
                if n % 100 == 0:
                    await left.drain()
            await left.drain()

        async def receive_all() -> list[ipc.Message]:
            return [await right.receive() for _ in sent]

        async with asyncio.timeout(20):
            _, received = await asyncio.gather(send_all(), receive_all())
        assert received == sent
        # Both directions work on one pair.
        right.send(Stopped(3))
        async with asyncio.timeout(5):
            assert await left.receive() == Stopped(3)
    finally:
        left.close()
        right.close()


async def test_channel_reports_eof_when_the_peer_closes() -> None:
    left, right = await _pair()
    left.send(Stop(1.5))
    await left.drain()
    left.close()
    async with asyncio.timeout(5):
        assert await right.receive() == Stop(1.5)  # what was sent before the close arrives
        with pytest.raises(EOFError):
            await right.receive()
    right.close()
    with pytest.raises(ConnectionError):
        right.send(Stopped(0))


async def test_channel_reports_eof_inside_a_truncated_frame() -> None:
    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours)
    frame = encode(Stopped(4))
    theirs.sendall(frame[:-3])
    theirs.close()
    async with asyncio.timeout(5):
        with pytest.raises(EOFError):
            await channel.receive()
    channel.close()


async def test_channel_refuses_an_oversize_frame_without_reading_it() -> None:
    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours)
    theirs.sendall(struct.pack("!I", ipc.MAX_FRAME + 1))  # and no payload: it must not wait for it
    try:
        async with asyncio.timeout(5):
            with pytest.raises(IpcError, match="over the"):
                await channel.receive()
    finally:
        theirs.close()
        channel.close()


async def test_channel_refuses_a_frame_that_is_not_a_message(tmp_path: Path) -> None:
    import os

    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours)
    marker = tmp_path / "ran"
    for payload in (pickle.dumps(("ready", 1)), pickle.dumps(_Call(os.system, f"touch {marker}"))):
        theirs.sendall(struct.pack("!I", len(payload)) + payload)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(IpcError, match="not a message"):
                await channel.receive()
            with pytest.raises(IpcError, match="refusing"):
                await channel.receive()
    finally:
        theirs.close()
        channel.close()
    assert not marker.exists()


def test_union_aliases_are_unions() -> None:
    for alias in (ipc.ToWorker, ipc.ToControl, ipc.Message):
        assert isinstance(alias, types.UnionType)

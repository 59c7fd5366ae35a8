"""Keeps ExaBGP's announcements equal to what `decision.decide` says, for as long as pointsman runs.

It reacts to pool snapshots (`Pool.watch`), to operator drain/resume and to reload, recomputes the
decisions, and sends ExaBGP only the difference. It owns the ExaBGP speaker: starts it, restarts it
with backoff when it dies (from an empty RIB: a new ExaBGP announces nothing until told), and on
stop withdraws every VIP, waits for ExaBGP's acknowledgement, then stops it.

Runs in the process that owns pool state: "single", or "control" with workers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from pointsman.bgp.decision import Decision, NodeView, Route, decide, desired, plan
from pointsman.bgp.exabgp import Kind, Message, command_line
from pointsman.bgp.speaker import ExaBgpSpeaker, SpeakerError, State
from pointsman.config.model import BgpConfig, ListenerConfig
from pointsman.node.tasks import Tasks
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.telemetry.eventlog import record_bgp, record_bgp_session

log = logging.getLogger("pointsman.bgp")

RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after the n-th consecutive failure; then the last
ACK_TIMEOUT = 2.0  # ExaBGP acknowledges a command in milliseconds; this bounds drain and stop


class _Listener(Protocol):
    @property
    def accepting(self) -> bool: ...

    @property
    def config(self) -> ListenerConfig: ...


class Node(Protocol):
    """What the announcer reads from the runtime (the runtime satisfies it)."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def listeners(self) -> Mapping[str, _Listener]: ...


SpeakerFactory = Callable[
    [BgpConfig, Callable[[], None], Callable[[Message], None], Callable[[str], None]], ExaBgpSpeaker]


class Announcer:
    def __init__(self, config: BgpConfig, node: Node,
                 speaker_factory: SpeakerFactory = ExaBgpSpeaker, tasks: Tasks | None = None) -> None:
        self.config = config
        self.node = node
        self.drained = False
        self.stopping = False
        self.restarts = 0
        self.decisions: tuple[Decision, ...] = ()
        self.changed_at: dict[str, float] = {}  # prefix -> wall time its decision last changed
        # Sessions established now, and how often an established one went down (any cause: the
        # peer, the network, ExaBGP dying or restarted); kept across ExaBGP restarts.
        self.sessions_up: set[str] = set()
        self.session_flaps: Counter[str] = Counter()
        self._factory = speaker_factory
        self._speaker: ExaBgpSpeaker | None = None
        self._told: dict[str, Route] = {}  # what the running ExaBGP was asked to announce
        self._failures = 0  # consecutive, reset when a session comes up
        self._loop = asyncio.get_running_loop()
        self._watched: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._dirty = asyncio.Event()  # a pool published: decide again (in the decider task)
        self._node_tasks = tasks or Tasks()
        self._restart_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, retry: bool = False) -> None:
        """Watch the pools and start ExaBGP. When ExaBGP cannot be run: raise SpeakerError, or
        with `retry` log it and try again with backoff (a reload must not fail half-applied)."""
        self.watch_pools()
        self._sync()
        self._node_tasks.spawn("bgp:decide", self._decide_forever, kind="bgp")
        await self._start_or_retry(retry)

    async def reconfigure(self, config: BgpConfig) -> None:
        """Reload: new VIPs only re-decide; new peers, ASN or router id restart ExaBGP."""
        old, self.config = self.config, config
        self.watch_pools()
        if _session_settings(old) != _session_settings(config):
            log.info("bgp: session settings changed: restarting ExaBGP (sessions reset)")
            if self._restart_handle is not None:
                self._restart_handle.cancel()
                self._restart_handle = None
            if self._speaker is not None:
                await self._speaker.stop()
            self._sessions_lost()
            self._told = {}
            await self._start_or_retry(True)
        self._sync()

    async def stop(self) -> None:
        """Withdraw everything, wait (bounded) for ExaBGP's acknowledgement, stop ExaBGP."""
        self.stopping = True
        await self._node_tasks.stop("bgp:decide")
        if self._restart_handle is not None:
            self._restart_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sync()
        self._closed = True
        speaker, self._speaker = self._speaker, None
        if speaker is None:
            return
        if speaker.state is State.RUNNING and not await speaker.wait_acked(ACK_TIMEOUT):
            log.warning("bgp: ExaBGP did not acknowledge the withdrawals in %.0fs", ACK_TIMEOUT)
        await speaker.stop()

    async def drain(self) -> bool:
        """Withdraw every VIP until `resume`; True once ExaBGP acknowledged the withdrawals."""
        self.drained = True
        log.info("bgp: node drained by operator")
        return await self._sync_and_wait()

    async def resume(self) -> bool:
        self.drained = False
        log.info("bgp: node resumed by operator")
        return await self._sync_and_wait()

    async def _sync_and_wait(self) -> bool:
        self._sync()
        speaker = self._speaker
        return speaker is not None and await speaker.wait_acked(ACK_TIMEOUT)

    # --- reacting to state ---------------------------------------------------------------------

    def watch_pools(self) -> None:
        for pool in self.node.pools.values():
            if pool not in self._watched:
                self._watched.add(pool)
                pool.watch(self._snapshot_published)

    def _snapshot_published(self, snapshot: PoolSnapshot) -> None:
        """Called inside the pool's publication: the decider coalesces a burst into one decision."""
        if not self._closed:
            self._dirty.set()

    async def _decide_forever(self) -> None:
        """A task of the node's supervisor, so a bug in deciding is logged, counted and the
        decider restarted (the next publication decides again)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._sync()

    def _view(self) -> NodeView:
        node = self.node
        return NodeView(
            available={name: pool.snapshot.available for name, pool in node.pools.items()},
            accepting={name: lst.accepting for name, lst in node.listeners.items()},
            listener_pools={name: tuple(lst.config.pool_names) for name, lst in node.listeners.items()},
            drained=self.drained,
            stopping=self.stopping,
        )

    def _sync(self) -> None:
        """Decide, log what changed, send ExaBGP the difference (if it is listening)."""
        if self._closed:
            return
        decisions = decide(self.config, self._view())
        self._note_changes(decisions)
        self.decisions = decisions
        speaker = self._speaker
        if speaker is None or speaker.state is not State.RUNNING:
            return
        wanted = desired(decisions)
        commands = plan(self._told, wanted)
        if speaker.send([command_line(c) for c in commands]):
            self._told = wanted

    def _note_changes(self, decisions: tuple[Decision, ...]) -> None:
        before = {d.vip.prefix: (d.route, d.reason) for d in self.decisions}
        now = time.time()
        for decision in decisions:
            prefix = decision.vip.prefix
            if before.get(prefix) != (decision.route, decision.reason):
                self.changed_at[prefix] = now
                log.info("bgp: %s", decision.describe())
                record_bgp(decision)

    # --- the speaker ---------------------------------------------------------------------------

    async def _start_speaker(self) -> None:
        speaker = self._factory(self.config, self._speaker_running, self._speaker_message,
                                self._speaker_failed)
        self._speaker = speaker
        await speaker.start()

    def _speaker_running(self) -> None:
        self._told = {}  # a new ExaBGP holds no routes
        self._sync()

    def _speaker_message(self, message: Message) -> None:
        peer = _address(message.peer) if message.peer else None
        if message.kind is Kind.PEER_UP:
            self._failures = 0
            if peer and peer not in self.sessions_up:
                self.sessions_up.add(peer)
                record_bgp_session(peer, True)
        elif message.kind is Kind.PEER_DOWN and peer in self.sessions_up:
            self.sessions_up.discard(peer)
            self.session_flaps[peer] += 1
            record_bgp_session(peer, False, "the peer or the network")

    def _sessions_lost(self) -> None:
        """ExaBGP is gone (died, or stopped for new session settings): so are its sessions."""
        self.session_flaps.update(self.sessions_up)
        for peer in sorted(self.sessions_up):
            record_bgp_session(peer, False, "ExaBGP stopped")
        self.sessions_up.clear()

    def _speaker_failed(self, reason: str) -> None:
        if self.stopping:
            return
        self._sessions_lost()
        self._own(self._recover())

    async def _recover(self) -> None:
        """Stop what is left of the failed ExaBGP now; start a new one after a backoff."""
        if self._speaker is not None:
            await self._speaker.stop()
        delay = RESTART_DELAYS[min(self._failures, len(RESTART_DELAYS) - 1)]
        self._failures += 1
        log.warning("bgp: restarting ExaBGP in %.0fs", delay)
        self._restart_handle = self._loop.call_later(delay, self._own_restart)

    def _own_restart(self) -> None:
        self._restart_handle = None
        self._own(self._restart())

    async def _restart(self) -> None:
        self.restarts += 1
        await self._start_or_retry(True)

    async def _start_or_retry(self, retry: bool) -> None:
        try:
            await self._start_speaker()
        except SpeakerError as exc:
            if not retry:
                raise
            log.error("bgp: %s", exc)
            self._speaker_failed(str(exc))

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        """Every task has an owner: this set, cancelled and awaited by `stop`."""
        task: asyncio.Task[None] = self._loop.create_task(coro, name="bgp:speaker")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- reading -------------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """A cheap snapshot for the admin API."""
        speaker = self._speaker
        return {
            "drained": self.drained,
            "stopping": self.stopping,
            "restarts": self.restarts,
            "speaker": speaker.statistics() if speaker is not None else None,
            "sessions": {peer: peer in self.sessions_up for peer in self._peers()},
            "session_flaps": {peer: self.session_flaps[peer] for peer in self._peers()},
            "vips": [
                {
                    "prefix": d.vip.prefix,
                    "pool": d.vip.pool,
                    "listener": d.vip.listener,
                    "announced": d.announced,
                    "next_hop": d.route.next_hop if d.route is not None else None,
                    "reason": d.reason.value,
                    "available": d.available,
                    "since": self.changed_at.get(d.vip.prefix),
                }
                for d in self.decisions
            ],
        }


    def _peers(self) -> list[str]:
        return [_address(peer.address) for peer in self.config.peers]


def _address(text: str) -> str:
    """One spelling per address (ExaBGP and the config may write an IPv6 address differently)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _session_settings(config: BgpConfig) -> tuple[object, ...]:
    """What ExaBGP's config file holds (VIPs and next hops are sent through the API instead)."""
    return (config.asn, config.router_id, config.peers, config.exabgp_command)


"""Socket activation: listening sockets that systemd (or anything speaking its protocol) passes in.

The protocol (sd_listen_fds(3)): the sockets are descriptors 3, 4, ... (`SD_LISTEN_FDS_START`),
`LISTEN_FDS` says how many, `LISTEN_PID` names the process they are meant for (a child that
inherited the environment must not take them), and `LISTEN_FDNAMES` names each one, colon-
separated (`FileDescriptorName=` in the .socket unit; systemd's default is the unit's name).

A passed socket belongs to a listener when it is named after it (`FileDescriptorName=web`), or,
unnamed after any listener, when it is bound to one of the listener's addresses with the
listener's protocol. A socket named after a listener must be bound to one of its addresses: the
config and the .socket unit disagreeing is an error, not a guess. Sockets that no listener takes
stay open (a reload may add their listener) and are logged once.

Because systemd holds the sockets across restarts of the service, connections that arrive while
pointsman restarts wait in the kernel's backlog and are served by the new process: nothing is
refused. With workers, the control process receives the sockets and passes each to every worker
(`pass_fds`, and `ipc.Start.sockets`), so all workers accept on the same socket: the kernel hands
each connection to one of them. There is no SO_REUSEPORT group then, so client steering
(`node.steering`) does not apply to a passed socket.

The pure half (`parse_environment`, `assign`) takes values; `Inherited` does the I/O.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pointsman.config.addresses import HostPort
from pointsman.config.model import Config, ListenerConfig

log = logging.getLogger("pointsman.activation")

SD_LISTEN_FDS_START = 3
VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# sd_listen_fds(3) has no bound; past this many the variable is a mistake, not a socket list.
MAX_PASSED = 4096

Protocol = Literal["tcp", "udp"]


class ActivationError(OSError):
    """The passed sockets and the config disagree (the message names the socket and listener).
    An OSError, so that start and reload refuse it as they refuse an address they cannot bind."""


@dataclass(frozen=True, slots=True)
class PassedSocket:
    """One descriptor systemd passed: its number, name, and what it is bound to (None: not an
    IP socket we can serve, e.g. a unix socket)."""

    fd: int
    name: str
    protocol: Protocol | None
    address: HostPort | None

    def describe(self) -> str:
        bound = f"{self.address}/{self.protocol}" if self.address is not None else "not an IP socket"
        return f"fd {self.fd} ({self.name or 'unnamed'}, {bound})"


def parse_environment(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """(fd, name) of each passed descriptor, [] when none are meant for process `pid`. A
    malformed variable is an ActivationError (systemd never writes one; a hand-made one must
    not be half-used)."""
    count_text = environ.get("LISTEN_FDS")
    if not count_text:
        return []
    pid_text = environ.get("LISTEN_PID", "")
    if not pid_text.isdigit() or int(pid_text) != pid:
        return []  # meant for another process (we inherited the environment)
    if not count_text.isdigit() or not 0 < int(count_text) <= MAX_PASSED:
        raise ActivationError(f"LISTEN_FDS={count_text!r}: expected a count of descriptors")
    count = int(count_text)
    names_text = environ.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else [""] * count
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} descriptors, LISTEN_FDS says "
                              f"{count}")
    return [(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def _same_address(wanted: HostPort, got: HostPort) -> bool:
    if wanted.port != got.port:
        return False
    try:
        return ipaddress.ip_address(wanted.host) == ipaddress.ip_address(got.host)
    except ValueError:
        return wanted.host == got.host


@dataclass(frozen=True, slots=True)
class Assignment:
    """Which passed socket serves which (listener, address): fds by key, and what is left."""

    fds: Mapping[tuple[str, HostPort], int] = field(default_factory=dict)
    unused: tuple[PassedSocket, ...] = ()


def assign(listeners: Iterable[ListenerConfig], passed: Sequence[PassedSocket]) -> Assignment:
    """Match passed sockets to listener addresses (pure). Raises ActivationError when a socket
    named after a listener is not bound to one of its addresses (or has the wrong protocol)."""
    wanted = [lst for lst in listeners if lst.dataplane != "kernel"]
    names = {lst.name for lst in wanted}
    fds: dict[tuple[str, HostPort], int] = {}
    used: set[int] = set()
    problems = []
    for listener in wanted:
        named = [s for s in passed if s.name == listener.name]
        for sock in named:
            address = _address_of(listener, sock)
            if address is None:
                problems.append(f"listener {listener.name}: the passed socket {sock.describe()} "
                                f"is named after it but is not {listener.protocol} on one of its "
                                f"addresses ({listener.bind})")
                continue
            fds[listener.name, address] = sock.fd
            used.add(sock.fd)
    for listener in wanted:
        for sock in passed:
            if sock.fd in used or sock.name in names:
                continue
            address = _address_of(listener, sock)
            if address is not None and (listener.name, address) not in fds:
                fds[listener.name, address] = sock.fd
                used.add(sock.fd)
    if problems:
        raise ActivationError("; ".join(problems))
    return Assignment(fds, tuple(s for s in passed if s.fd not in used))


def _address_of(listener: ListenerConfig, sock: PassedSocket) -> HostPort | None:
    """The listener's address `sock` is bound to (with the listener's protocol), if any."""
    if sock.address is None or sock.protocol != listener.protocol:
        return None
    return next((a for a in listener.addresses if _same_address(a, sock.address)), None)


def inspect(fd: int, name: str) -> PassedSocket:
    """What descriptor `fd` is: its socket type and bound address (I/O: getsockname)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise ActivationError(f"passed descriptor {fd} ({name or 'unnamed'}) is not usable: "
                              f"{exc.strerror or exc}") from None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return PassedSocket(fd, name, None, None)
        kinds: dict[socket.SocketKind, Protocol] = {socket.SOCK_STREAM: "tcp",
                                                    socket.SOCK_DGRAM: "udp"}
        protocol = kinds.get(sock.type)
        host, port = sock.getsockname()[:2]
    return PassedSocket(fd, name, protocol, HostPort(str(host), int(port)))


class Inherited:
    """The sockets passed to this process, kept open (never closed) for its whole life: a
    listener gets a duplicate of one (closing it on a reload or at shutdown leaves the passed
    socket, and the connections queued on it, to systemd and to the next listener)."""

    def __init__(self, sockets: Sequence[PassedSocket] = ()) -> None:
        self.sockets = tuple(sockets)
        self.assignment = Assignment()
        self._warned: set[int] = set()

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Inherited:
        """Take the sockets the environment passes to this process, and remove the variables
        (children, such as workers and exec health checks, must not see them)."""
        env = os.environ if environ is None else environ
        passed = parse_environment(env, os.getpid())
        for variable in VARIABLES:
            env.pop(variable, None)
        sockets = []
        for fd, name in passed:
            os.set_inheritable(fd, False)  # workers get them by pass_fds, nothing else does
            sockets.append(inspect(fd, name))
        return cls(sockets)

    def __bool__(self) -> bool:
        return bool(self.sockets)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(s.fd for s in self.sockets)

    def held(self, config: Config) -> list[tuple[HostPort, str]]:
        """The (address, protocol) pairs of `config` that passed sockets serve: `run`'s preflight
        does not try to bind those."""
        found = assign(config.listeners, self.sockets)
        protocols = {lst.name: lst.protocol for lst in config.listeners}
        return [(address, protocols[name]) for name, address in found.fds]

    def prepare(self, config: Config) -> None:
        """Match the sockets to `config`'s listeners (at start and before each reload binds).
        ActivationError when a named socket does not fit its listener."""
        if not self.sockets:
            return
        self.assignment = assign(config.listeners, self.sockets)
        for sock in self.assignment.unused:
            if sock.fd not in self._warned:
                self._warned.add(sock.fd)
                log.warning("socket activation: no listener takes the passed socket %s; it is "
                            "kept for a reload that adds one", sock.describe())

    def take(self, listener: str, address: HostPort) -> socket.socket | None:
        """A new socket object (a duplicate descriptor) for a passed socket serving `address`
        of `listener`, non-blocking; None when none was passed for it."""
        fd = self.assignment.fds.get((listener, address))
        if fd is None:
            return None
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        return sock

    def covers(self, listener: str, address: HostPort) -> bool:
        return (listener, address) in self.assignment.fds

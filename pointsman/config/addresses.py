"""Socket addresses as operators write them: "host:port", "[v6]:port"."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class HostPort:
    """An address as written (host may be a name until resolved)."""

    host: str
    port: int
    written: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        """The address as the operator wrote it (a resolved name keeps its name)."""
        if self.written is not None:
            return self.written
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_host_port(value: object) -> HostPort:
    """Parse "host:port" or "[v6]:port"; the port is mandatory and 1-65535 (0 allowed nowhere)."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address inside [], got {value!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(f"write IPv6 addresses as [addr]:port, got {value!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected a port between 1 and 65535, got {value!r}")
    return HostPort(host, int(port_text))


def resolve(address: HostPort) -> HostPort:
    """Resolve a host name once, at load time, to its first address (IP literals pass through)."""
    if address.is_ip:
        return address
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {address.host!r}: {exc.strerror}") from None
    sockaddr = infos[0][4]
    return HostPort(str(sockaddr[0]), address.port, written=str(address))


# --- listener binds: several addresses, port ranges -------------------------------------------------

# A range opens one socket per port in every worker; past this many a typo ("1-65535") would
# exhaust descriptors. The kernel data plane takes one address and one port for now.
MAX_BIND_PORTS = 1024


@dataclass(frozen=True, slots=True)
class BindRange:
    """One entry of a listener's `bind`: an address and a port, or a range of ports (inclusive)."""

    host: str
    first: int
    last: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{host}:{ports}"

    @property
    def addresses(self) -> tuple[HostPort, ...]:
        return tuple(HostPort(self.host, port) for port in range(self.first, self.last + 1))


class Binds(tuple[BindRange, ...]):
    """A listener's `bind` as written: one entry ("0.0.0.0:443"), several, or port ranges
    ("0.0.0.0:30000-30100"). Each port of each entry is its own listening socket. `str()` is
    what operators wrote (entries joined by ", "); `addresses` expands every socket address."""

    __slots__ = ()

    def __str__(self) -> str:
        return ", ".join(str(entry) for entry in self)

    def __repr__(self) -> str:
        return f"Binds({str(self)!r})"

    @property
    def addresses(self) -> tuple[HostPort, ...]:
        """Every address a socket is bound to, in the order written."""
        return tuple(address for entry in self for address in entry.addresses)

    @property
    def single(self) -> HostPort:
        """The one address of a bind that has exactly one (the kernel data plane's VIP)."""
        addresses = self.addresses
        if len(addresses) != 1:
            raise ValueError(f"expected one address and one port, got {self}")
        return addresses[0]

    def as_written(self) -> str | list[str]:
        """The YAML/JSON value this bind reads back from: a string for one entry, else a list."""
        return str(self[0]) if len(self) == 1 else [str(entry) for entry in self]


def parse_bind_range(value: object) -> BindRange:
    """"host:port", "[v6]:port", or either with a port range "first-last" (first <= last)."""
    if isinstance(value, BindRange):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected host:port or host:first-last, got {value!r}")
    text = value.strip()
    head, sep, ports = text.rpartition(":")
    if sep and "-" in ports:
        first_text, _, last_text = ports.partition("-")
        start = parse_host_port(f"{head}:{first_text}")
        end = parse_host_port(f"{head}:{last_text}")
        if end.port < start.port:
            raise ValueError(f"port range {ports} ends before it starts, in {value!r}")
        if end.port - start.port + 1 > MAX_BIND_PORTS:
            raise ValueError(f"port range {ports} has {end.port - start.port + 1} ports; at most "
                             f"{MAX_BIND_PORTS} per listener (each port is a socket per worker)")
        return BindRange(start.host, start.port, end.port)
    address = parse_host_port(text)
    return BindRange(address.host, address.port, address.port)


def binds_of(value: object) -> Binds:
    """A `bind` value that was validated elsewhere (a tuple of entries), or written as a string."""
    if isinstance(value, Binds):
        return value
    if isinstance(value, str):
        return Binds((parse_bind_range(value),))
    if isinstance(value, tuple | list):
        return Binds(entry if isinstance(entry, BindRange) else parse_bind_range(entry)
                     for entry in value)
    raise ValueError(f"expected host:port or a list of them, got {value!r}")

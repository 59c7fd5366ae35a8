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

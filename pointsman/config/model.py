"""The typed, frozen config an operator writes (YAML), validated by pydantic.

Key names here are the public interface: later features add keys, never rename them. Cross-object
rules (unique names, references to pools) live in `semantics.py` so each error can name its path.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    model_validator,
)

from pointsman.config.addresses import (
    BindRange,
    Binds,
    HostPort,
    parse_bind_range,
    parse_host_port,
)
from pointsman.config.durations import parse_duration, parse_fraction
from pointsman.protect.acl import canonical as _acl_prefix


def _ip_address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None


def _ip_network(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"expected an address or prefix such as 10.0.0.0/8, got {value!r}") from None


def _host_prefix(value: object) -> str:
    """A VIP is one address: "10.99.0.10", "10.99.0.10/32" or "2001:db8::10/128"."""
    try:
        network = ipaddress.ip_network(str(value), strict=True)
    except ValueError:
        raise ValueError(f"expected an address or a /32 or /128 prefix, got {value!r}") from None
    if network.num_addresses != 1:
        raise ValueError(f"a VIP is one address: expected a /32 or /128, got {value!r}")
    return str(network)


def _bind_entries(value: object) -> object:
    """A string is one entry (its error is the field's); a list is validated entry by entry, so
    an error names the entry (`bind[1]`) and its line."""
    if isinstance(value, str):
        return (parse_bind_range(value),)
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected host:port, host:first-last or a list of them, got {value!r}")
    return value


def _acl_network(value: object) -> str:
    """An allow/deny entry: host bits cleared, an IPv4-mapped prefix stored as IPv4."""
    return _acl_prefix(value)


def _off_switch(value: object) -> object:
    """YAML 1.1 reads an unquoted `off` (also `no`, `false`) as False: where the reference writes
    `off`, take the boolean as the word."""
    return "off" if value is False else value


def _on_means_auto(value: object) -> object:
    """`zero_copy: on` (or `true`, `yes`) has one meaning: the automatic switch to splice."""
    if value is True:
        return "auto"
    return _off_switch(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Fraction = Annotated[float, BeforeValidator(parse_fraction)]
Address = Annotated[HostPort, BeforeValidator(parse_host_port), PlainSerializer(str)]
IPAddress = Annotated[str, BeforeValidator(_ip_address)]
Network = Annotated[str, BeforeValidator(_ip_network)]
HostPrefix = Annotated[str, BeforeValidator(_host_prefix)]
AclNetwork = Annotated[str, BeforeValidator(_acl_network)]
BindEntry = Annotated[BindRange, PlainValidator(parse_bind_range), PlainSerializer(str)]
# `bind`: "host:port", "host:first-last", or a list of them (see config.addresses.Binds).
# Validated as a tuple (so an error names the entry, `bind[1]`), then made a `Binds`.
if TYPE_CHECKING:
    Bind = Binds
else:
    Bind = Annotated[tuple[BindEntry, ...], BeforeValidator(_bind_entries), Field(min_length=1),
                     AfterValidator(Binds), PlainSerializer(Binds.as_written)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]

# Kept equal to pointsman.balance.ALGORITHMS by tests/unit/test_config.py.
Algorithm = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "power_of_two",
    "source_hash",
    "maglev",
]
HashKey = Literal["source_ip", "source_ip_port"]


class Strict(BaseModel):
    """Base: unknown keys are errors and validated objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(Strict):
    address: Address
    name: Name | None = None
    weight: int = Field(default=1, ge=0, le=1000)
    # Serves only while no primary (non-backup) backend of the pool is available (HAProxy).
    backup: bool = False
    # Probe this host:port instead of the backend (a sidecar, an agent); wins over the pool's
    # health_check.address and health_check.port for this backend.
    health_check_address: Address | None = None
    # Concurrent connections this backend takes (HAProxy `maxconn` on a server); None: the
    # pool's backend_max_connections. Past it the backend is not picked; see the pool's queue.
    max_connections: int | None = Field(default=None, ge=1)

    @property
    def id(self) -> str:
        """Stable identity: the configured name, else the address as written."""
        return self.name or str(self.address)


class AffinityConfig(Strict):
    key: HashKey = "source_ip"
    timeout: Duration = 600.0
    max_entries: int = Field(default=100_000, ge=1)


class HttpCheckConfig(Strict):
    path: str = "/"
    expect_status: list[int] = Field(default_factory=lambda: [200])
    host: str | None = None


class TlsCheckConfig(Strict):
    server_name: str | None = None
    verify: bool = False


class HealthCheckConfig(Strict):
    type: Literal["tcp", "send_expect", "http", "tls", "udp", "exec", "agent", "none"] = "tcp"
    interval: Duration = 2.0
    timeout: Duration = 1.0
    rise: int = Field(default=2, ge=1)
    fall: int = Field(default=3, ge=1)
    jitter: Fraction = 0.1
    port: int | None = Field(default=None, ge=1, le=65535)
    address: Address | None = None  # probe this host:port for every backend (not with port)
    command: list[str] | None = None  # exec: argv, run without a shell
    send: str | None = None
    send_hex: str | None = None
    expect: str | None = None
    expect_regex: str | None = None
    http: HttpCheckConfig = Field(default_factory=HttpCheckConfig)
    tls: TlsCheckConfig = Field(default_factory=TlsCheckConfig)


class PassiveConfig(Strict):
    consecutive_failures: int = Field(default=5, ge=0)
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0


class TlvConfig(Strict):
    authority: bool = False  # the client's SNI, when it sent one
    unique_id: bool = False  # a random per-connection id (16 bytes)


class PoolProxyProtocolConfig(Strict):
    send: Annotated[Literal["off", "v1", "v2"], BeforeValidator(_off_switch)] = "off"
    tlvs: TlvConfig = Field(default_factory=TlvConfig)


class SourceConfig(Strict):
    mode: Literal["default", "transparent"] = "default"
    addresses: list[IPAddress] = Field(default_factory=list)


class DnsDiscoveryConfig(Strict):
    srv: str | None = None  # e.g. _pg._tcp.db.example: targets and ports from SRV records
    name: str | None = None  # A/AAAA name; backends on `port`
    port: int | None = Field(default=None, ge=1, le=65535)
    resolver: Address | None = None  # default: the system resolver
    min_ttl: Duration = 1.0  # re-resolve no faster than this, whatever the record TTL says


class KubernetesDiscoveryConfig(Strict):
    namespace: str = "default"
    service: str
    port_name: str | None = None


class DiscoveryConfig(Strict):
    dns: DnsDiscoveryConfig | None = None
    kubernetes: KubernetesDiscoveryConfig | None = None
    etcd_members: bool = False  # backends registered under <prefix>members/<pool>/


# Past this a drain timeout means "never" anyway (and a timer that far out overflows some loops).
MAX_DRAIN_TIMEOUT = 30 * 86400.0
# The same bound for max_connection_duration.
MAX_CONNECTION_DURATION = MAX_DRAIN_TIMEOUT
# The kernel's bounds on TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT (include/net/tcp.h).
MAX_KEEPALIVE_SECONDS = 32767
MAX_KEEPALIVE_COUNT = 127


def _keepalive_seconds(value: object) -> int:
    """TCP_KEEPIDLE and TCP_KEEPINTVL take whole seconds, 1 to 32767: say so rather than round."""
    seconds = parse_duration(value)
    if seconds != int(seconds) or not 1 <= seconds <= MAX_KEEPALIVE_SECONDS:
        raise ValueError(f"must be whole seconds from 1s to {MAX_KEEPALIVE_SECONDS}s (the kernel "
                         f"counts keepalive time in seconds), got {seconds:g}s")
    return int(seconds)


def _keepalive_switch(value: object) -> object:
    """`tcp_keepalive: off` (or false) is the default, no keepalive; `on` (or true) the defaults."""
    if value is False or value == "off":
        return None
    if value is True or value == "on":
        return {}
    return value


KeepaliveSeconds = Annotated[int, BeforeValidator(_keepalive_seconds)]


class TcpKeepaliveConfig(Strict):
    """SO_KEEPALIVE: after `idle` without a byte, a probe every `interval`; `count` unanswered
    probes and the connection ends as `keepalive_timeout` (the other side gets a reset)."""

    idle: KeepaliveSeconds = 60
    interval: KeepaliveSeconds = 10
    count: int = Field(default=6, ge=1, le=MAX_KEEPALIVE_COUNT)


TcpKeepalive = Annotated[TcpKeepaliveConfig | None, BeforeValidator(_keepalive_switch)]


class QueueConfig(Strict):
    # Connections waiting for a slot when every eligible backend is at its max_connections
    # (0: none wait, a full pool refuses at once as queue_full), and how long one waits before
    # it is refused as queue_timeout. Only pools with capped backends ever queue.
    max: int = Field(default=1000, ge=0, le=1_000_000)
    timeout: Annotated[Duration, Field(gt=0)] = 5.0


class PoolConfig(Strict):
    name: Name
    algorithm: Algorithm = "round_robin"
    backends: list[BackendConfig] = Field(min_length=1)
    connect_timeout: Duration = 2.0
    idle_timeout: Duration = 300.0
    # Once either side has sent its FIN: close after this long without a byte moving (HAProxy's
    # client-fin/server-fin). 0: half-closed connections wait for idle_timeout like the others.
    half_close_timeout: Duration = 30.0
    retries: int = Field(default=2, ge=0, le=100)
    hash_key: HashKey = "source_ip"
    maglev_table_size: int = Field(default=65537, ge=3, le=1_000_003)
    slow_start: Duration = 0.0
    affinity: AffinityConfig | None = None
    health_check: HealthCheckConfig | None = None
    passive: PassiveConfig = Field(default_factory=PassiveConfig)
    on_down: Literal["keep_sessions", "close_sessions"] = "keep_sessions"
    initial_state: Literal["up", "down"] = "up"
    proxy_protocol: PoolProxyProtocolConfig = Field(default_factory=PoolProxyProtocolConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    discovery: DiscoveryConfig | None = None
    # Zero-copy (splice) for bulk streams: a connection switches after this many bytes; off keeps
    # every connection on the transport path.
    zero_copy: Annotated[Literal["off", "auto"], BeforeValidator(_on_means_auto)] = "auto"
    zero_copy_after: int = Field(default=1 << 20, ge=0)
    # New connections go to this pool while this one has no backend to offer (a sorry server,
    # another region); chains are followed, cycles are config errors.
    fallback_pool: Name | None = None
    # Envoy's panic mode: below this fraction of available primaries, balance over every primary
    # not drained or in maintenance, whatever its health. 0 (default) is off: see docs/config.md.
    panic_threshold: Fraction = 0.0
    # After a drain, the backend's remaining connections are closed this long after it began
    # (`drain_timeout`); None waits for them to end. `pointsman drain --timeout` overrides it.
    drain_timeout: Annotated[Duration, Field(le=MAX_DRAIN_TIMEOUT)] | None = None
    # The default max_connections of this pool's backends (None: no cap), and the queue where
    # new connections wait while every eligible backend is at its cap.
    backend_max_connections: int | None = Field(default=None, ge=1)
    queue: QueueConfig = Field(default_factory=QueueConfig)

    def backend_cap(self, backend: BackendConfig) -> int | None:
        """The cap in force for one of this pool's backends (its own, else the pool's)."""
        if backend.max_connections is not None:
            return backend.max_connections
        return self.backend_max_connections

    # Keepalive on the sockets to this pool's backends (new connections; off by default).
    tcp_keepalive: TcpKeepalive = None
    # Connections through this pool older than this are cut, a reset both ways (Envoy's
    # max_connection_duration); None: no bound. A reload applies a new value to open ones too.
    max_connection_duration: Annotated[Duration, Field(gt=0, le=MAX_CONNECTION_DURATION)] | None = None


class UdpConfig(Strict):
    session_timeout: Duration = 30.0
    max_sessions: int = Field(default=100_000, ge=1)
    responses: int = Field(default=0, ge=0)
    per_packet: bool = False


class ListenerProxyProtocolConfig(Strict):
    accept: Annotated[Literal["off", "required", "optional"], BeforeValidator(_off_switch)] = "off"
    # Sources allowed to send a header; None trusts every source (only for listeners that
    # nothing but trusted proxies can reach: the header sets the client address).
    trusted_sources: list[Network] | None = None
    timeout: Duration = 5.0


class PreambleConfig(Strict):
    # Connections still reading a PROXY header or ClientHello, bounded apart from the table;
    # None: 10% of max_connections (at least 1).
    max_pending: int | None = Field(default=None, ge=1)


class TlsRouteConfig(Strict):
    server_names: list[str] = Field(default_factory=list)
    alpn: list[str] = Field(default_factory=list)
    pool: Name


class LimitsConfig(Strict):
    max_connections_per_source: int | None = Field(default=None, ge=1)
    new_connections_per_second: float | None = Field(default=None, gt=0)
    new_connections_per_second_per_source: float | None = Field(default=None, gt=0)
    source_prefix_v4: int = Field(default=32, ge=0, le=32)
    source_prefix_v6: int = Field(default=64, ge=0, le=128)
    max_sources: int = Field(default=100_000, ge=1)  # bounded per-source table


InterfaceName = Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[^/\s:]+$")]
"""A network interface's name as Linux allows it (IFNAMSIZ - 1 bytes, no '/', ':' or space)."""


class KernelListenerConfig(Strict):
    # conntrack: DNAT with a conntrack entry per flow (flows keep their backend); stateless:
    # notrack, every packet rewritten from the slot map (see docs/kernel.md for the conditions).
    nat: Literal["conntrack", "stateless"] = "conntrack"
    snat: Literal["masquerade", "none"] = "masquerade"  # none: backends route replies via us
    slots: int = Field(default=4093, ge=3, le=1_000_003)  # prime: the kernel Maglev table size
    # nftables: the nf_tables table (docs/kernel.md); tc: nat stateless as a BPF program at
    # clsact ingress of `interfaces` (the ones the clients' and the backends' packets arrive on).
    datapath: Literal["nftables", "tc"] = "nftables"
    interfaces: list[InterfaceName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> KernelListenerConfig:
        if self.datapath == "tc" and self.nat != "stateless":
            raise ValueError("datapath: tc needs nat: stateless (the BPF program keeps no flow state)")
        if self.datapath == "tc" and not self.interfaces:
            raise ValueError("datapath: tc needs interfaces: the ones the clients' packets to the VIP "
                             "and the backends' replies arrive on (the program runs at their ingress)")
        if self.interfaces and self.datapath != "tc":
            raise ValueError("interfaces is for datapath: tc (nftables sees every interface)")
        if self.nat == "stateless" and self.snat != "none":
            raise ValueError(
                "nat: stateless needs snat: none (with no conntrack entry nothing records which "
                "client a reply to the load balancer's own address belongs to, so the source "
                "cannot be rewritten; backends must see the client and route their replies "
                "through the load balancer)")
        return self


class ListenerConfig(Strict):
    name: Name
    bind: Bind
    protocol: Literal["tcp", "udp"] = "tcp"
    pool: Name | None = None
    max_connections: int = Field(default=10_000, ge=1)
    backlog: int = Field(default=1024, ge=1)
    udp: UdpConfig = Field(default_factory=UdpConfig)
    proxy_protocol: ListenerProxyProtocolConfig = Field(
        default_factory=ListenerProxyProtocolConfig)
    tls_routes: list[TlsRouteConfig] = Field(default_factory=list)
    default_pool: Name | None = None
    inspect_timeout: Duration = 5.0
    preamble: PreambleConfig = Field(default_factory=PreambleConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    dataplane: Literal["proxy", "kernel"] = "proxy"
    kernel: KernelListenerConfig = Field(default_factory=KernelListenerConfig)
    # Source lists, checked before anything is read (deny wins; an empty allow list is none).
    allow: list[AclNetwork] = Field(default_factory=list)
    deny: list[AclNetwork] = Field(default_factory=list)
    acl_on: Literal["peer", "proxy_header"] = "peer"
    # Keepalive on accepted client sockets (new connections; off by default).
    tcp_keepalive: TcpKeepalive = None

    @property
    def addresses(self) -> tuple[HostPort, ...]:
        """Every address this listener listens on (each port of a range is one)."""
        return self.bind.addresses

    @property
    def fallback_pool(self) -> str:
        """The pool for connections no TLS route takes (`default_pool`, else `pool`)."""
        name = self.default_pool or self.pool
        assert name is not None, "the loader requires pool or default_pool"
        return name

    @property
    def preamble_max_pending(self) -> int:
        """The preamble budget in force: the configured one, else 10% of the table."""
        if self.preamble.max_pending is not None:
            return self.preamble.max_pending
        return max(1, self.max_connections // 10)

    @property
    def pool_names(self) -> list[str]:
        return [self.fallback_pool, *(route.pool for route in self.tls_routes)]


class AdminTlsConfig(Strict):
    """HTTPS for the admin listener; with `client_ca_file`, mutual TLS: a client must present a
    certificate that CA signed (the handshake fails otherwise)."""

    cert_file: str  # PEM: the server certificate, then any intermediates
    key_file: str
    client_ca_file: str | None = None


class AdminTokenConfig(Strict):
    """A named bearer token: the audit log says which token made each call."""

    name: Name
    file: str
    role: Literal["read", "write"]  # write implies read


DEFAULT_TOKEN_NAME = "default"  # the name of admin.token_file in the audit log
READ_TOKEN_NAME = "read"  # the name of admin.read_token_file in the audit log


class AdminConfig(Strict):
    bind: Address = Field(default_factory=lambda: parse_host_port("127.0.0.1:9900"))
    token_file: str | None = None  # a write token named "default"
    read_token_file: str | None = None  # a read token named "read": reads then need a token
    tokens: list[AdminTokenConfig] = Field(default_factory=list)
    tls: AdminTlsConfig | None = None

    @property
    def token_names(self) -> list[str]:
        named = [t.name for t in self.tokens]
        return ([DEFAULT_TOKEN_NAME] if self.token_file else []) + (
            [READ_TOKEN_NAME] if self.read_token_file else []) + named

    @property
    def has_tokens(self) -> bool:
        """Any token at all: then every mutating call needs a write token."""
        return bool(self.token_names)

    @model_validator(mode="after")
    def _check(self) -> AdminConfig:
        seen: set[str] = set()
        for name in self.token_names:
            if name in seen:
                raise ValueError(f"token name {name!r} is used twice (token_file is named "
                                 f"{DEFAULT_TOKEN_NAME!r}, read_token_file {READ_TOKEN_NAME!r})")
            seen.add(name)
        return self


class FlowLogConfig(Strict):
    enabled: bool = True
    path: str = "-"  # "-" is stderr
    sample: Fraction = 1.0
    queue_size: int = Field(default=10_000, ge=1)


class SheddingConfig(Strict):
    max_connections: int | None = Field(default=None, ge=1)  # across all listeners
    max_loop_lag: Duration | None = None


class BgpPeerConfig(Strict):
    address: IPAddress
    asn: int = Field(ge=1, le=4_294_967_295)  # 4-octet AS numbers (RFC 6793)
    port: int = Field(default=179, ge=1, le=65535)
    hold_time: Duration = 90.0  # 0 (no keepalives) or 3-65535 s (RFC 4271 section 4.2)
    local_address: IPAddress | None = None  # default: the address the kernel picks

    @model_validator(mode="after")
    def _check(self) -> BgpPeerConfig:
        if self.hold_time != 0 and not 3 <= self.hold_time <= 65535:
            raise ValueError("hold_time must be 0 or between 3s and 65535s (RFC 4271 4.2)")
        if self.local_address is not None and _family(self.local_address) != _family(self.address):
            raise ValueError("local_address and address must be the same IP version")
        return self


class BgpVipConfig(Strict):
    prefix: HostPrefix
    pool: Name | None = None  # announced while this pool has min_available backends ...
    listener: Name | None = None  # ... or while this listener accepts and one of its pools does
    min_available: int = Field(default=1, ge=1)
    next_hop: Literal["self"] | IPAddress | None = None  # default: bgp.next_hop

    @model_validator(mode="after")
    def _check(self) -> BgpVipConfig:
        if (self.pool is None) == (self.listener is None):
            raise ValueError("a VIP needs exactly one of pool or listener")
        if self.next_hop not in (None, "self") and _family(self.next_hop) != _family(self.prefix):
            raise ValueError("next_hop must be the same IP version as prefix")
        return self


class BgpConfig(Strict):
    asn: int = Field(ge=1, le=4_294_967_295)
    router_id: IPAddress
    peers: list[BgpPeerConfig] = Field(min_length=1)
    vips: list[BgpVipConfig] = Field(min_length=1)
    next_hop: Literal["self"] | IPAddress = "self"
    exabgp_command: list[str] | None = None  # default: this Python with "-m exabgp"

    @model_validator(mode="after")
    def _check(self) -> BgpConfig:
        if _family(self.router_id) != 4:
            raise ValueError("router_id must be an IPv4 address (RFC 4271: a 4-octet BGP Identifier)")
        families = {_family(peer.address) for peer in self.peers}
        for i, vip in enumerate(self.vips):
            if _family(vip.prefix) not in families:
                raise ValueError(f"vips[{i}]: no peer of the same IP version as {vip.prefix}; "
                                 "it would never be announced")
        seen: set[str] = set()
        for i, vip in enumerate(self.vips):
            if vip.prefix in seen:
                raise ValueError(f"vips[{i}]: duplicate prefix {vip.prefix}")
            seen.add(vip.prefix)
        return self


def _family(address: str) -> int:
    return ipaddress.ip_network(address, strict=False).version


class NodeConfig(Strict):
    """This node's identity as operators see it (status page, `pointsman status`). A fleet node
    takes its name from its node file instead; without either, the host name is used."""

    name: Name


class Config(Strict):
    listeners: list[ListenerConfig] = Field(min_length=1)
    pools: list[PoolConfig] = Field(min_length=1)
    shutdown_grace: Duration = 30.0
    workers: int | None = Field(default=None, ge=1, le=256)  # None: one per CPU
    shedding: SheddingConfig = Field(default_factory=SheddingConfig)
    admin: AdminConfig | None = None  # absent: no admin listener
    flow_log: FlowLogConfig | None = None  # absent: no flow log
    bgp: BgpConfig | None = None  # absent: no VIP announcement
    node: NodeConfig | None = None  # absent: the fleet node name, else the host name
    # Runtime changes (API weights, drains, added/removed backends, allow/deny lists) are written
    # here and read back at start, like HAProxy's server-state-file. Absent: kept in memory only.
    state_file: str | None = None

    def pool(self, name: str) -> PoolConfig:
        return next(p for p in self.pools if p.name == name)

"""How a connection or UDP session ended: one enum, used as flow-log field and metric label."""

from __future__ import annotations

import enum


class EndReason(enum.StrEnum):
    CLIENT_FIN = "client_fin"
    BACKEND_FIN = "backend_fin"
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"  # a FIN, then nothing moved for half_close_timeout
    CONNECT_FAILED = "connect_failed"
    SHUTDOWN = "shutdown"
    CLOSED_BY_OPERATOR = "closed_by_operator"
    BACKEND_DOWN = "backend_down"  # on_down: close_sessions cut it when its backend left service
    DRAIN_TIMEOUT = "drain_timeout"  # its backend was still draining drain_timeout after the drain
    INTERNAL_ERROR = "internal_error"  # a bug of ours cut it (logged with its traceback)
    # One side's socket failed with ETIMEDOUT: tcp_keepalive probes went unanswered (or the
    # kernel gave up retransmitting); the other side got a reset.
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    MAX_CONNECTION_DURATION = "max_connection_duration"  # open longer than its pool allows


class RejectReason(enum.StrEnum):
    """Why a connection was refused before any backend carried it. A refused connection is
    counted here once and never in EndReason: accepted = rejected + ended + active."""

    TABLE_FULL = "table_full"
    NO_BACKEND = "no_backend"
    SHUTTING_DOWN = "shutting_down"
    SHED_CONNECTIONS = "shed_connections"  # process-wide connection bound (load shedding)
    SHED_LOOP_LAG = "shed_loop_lag"  # event loop too late (load shedding)
    RATE_LIMITED = "rate_limited"  # listener new-connection rate
    SOURCE_RATE_LIMITED = "source_rate_limited"
    SOURCE_CONNECTION_LIMIT = "source_connection_limit"
    BAD_PROXY_HEADER = "bad_proxy_header"
    PROXY_HEADER_MISSING = "proxy_header_missing"
    PROXY_HEADER_UNTRUSTED = "proxy_header_untrusted"
    BAD_CLIENT_HELLO = "bad_client_hello"
    INSPECT_TIMEOUT = "inspect_timeout"  # no complete PROXY header / ClientHello in time
    DENIED = "denied"  # the listener's allow/deny lists refuse the source
    PREAMBLE_EVICTED = "preamble_evicted"  # the oldest preamble, closed for a newer one
    LOCAL_RESOURCE = "local_resource"  # we ran out of descriptors, buffers or source ports
    INTERNAL_ERROR = "internal_error"  # a bug of ours refused it (logged with its traceback)
    # Appended at the end: proxy/codes.py numbers refusal codes by this order.
    QUEUE_FULL = "queue_full"  # every eligible backend at its cap and the pool's queue full
    QUEUE_TIMEOUT = "queue_timeout"  # waited queue.timeout in the pool's queue for a slot


class DropReason(enum.StrEnum):
    """Why a UDP datagram was dropped."""

    TABLE_FULL = "table_full"
    NO_BACKEND = "no_backend"
    SEND_FAILED = "send_failed"
    BACKEND_REFUSED = "backend_refused"
    DENIED = "denied"  # the listener's allow/deny lists refuse the source
    LOCAL_RESOURCE = "local_resource"  # no socket for a new session: our shortage, not the backend's


class UdpEndReason(enum.StrEnum):
    """How a UDP session ended."""

    IDLE_TIMEOUT = "idle_timeout"
    RESPONSES = "responses"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_REFUSED = "backend_refused"
    SHUTDOWN = "shutdown"
    DENIED = "denied"  # its source was denied (allow/deny lists changed) while it was open
    DRAIN_TIMEOUT = "drain_timeout"  # its backend was still draining drain_timeout after the drain
    CLOSED_BY_OPERATOR = "closed_by_operator"  # maintenance with close

"""The one error a protocol parser raises: the peer broke the protocol.

Parsers in this package have exactly three outcomes: a value, None for "need more data", or a
`ProtocolError`. Its `reason` is a short snake_case string enum because it becomes a metric label
and the flow record's end reason, so the set of values must stay small and stable.

Our own mistakes (a builder called with a port of 70000, say) are not protocol errors: they raise
`ValueError`, so a bug on our side never shows up in the peer-error metrics.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a peer's bytes were rejected. Values are metric labels: never rename one."""

    # PROXY protocol (v1 text and v2 binary)
    BAD_SIGNATURE = "bad_signature"  # the stream does not start with a PROXY header
    BAD_VERSION = "bad_version"  # v2 version nibble is not 2
    BAD_COMMAND = "bad_command"  # v2 command is neither LOCAL nor PROXY
    BAD_FAMILY = "bad_family"  # v1 protocol word or v2 family/transport byte not in the spec
    BAD_ADDRESS = "bad_address"  # address not valid for the announced family
    BAD_PORT = "bad_port"  # v1 port not a decimal in 0..65535 without leading zeros
    BAD_SYNTAX = "bad_syntax"  # v1 line grammar: spaces, field count, bare CR/LF, non-ASCII
    BAD_CRC = "bad_crc"  # v2 CRC32C TLV does not match the header
    BAD_TLV = "bad_tlv"  # v2 TLV overruns the header or breaks its type's size rule
    # Shared
    TOO_LONG = "too_long"  # exceeds our named cap before the message is complete
    BAD_LENGTH = "bad_length"  # a length field holds a value the spec forbids
    TRUNCATED = "truncated"  # an inner length runs past the end of its container
    # TLS ClientHello peek
    NOT_TLS = "not_tls"  # first bytes are not a TLS record header
    NOT_HANDSHAKE = "not_handshake"  # a TLS record, but not of the handshake content type
    NOT_CLIENT_HELLO = "not_client_hello"  # a handshake message other than ClientHello
    BAD_EXTENSION = "bad_extension"  # duplicate or malformed extension we decode
    BAD_SERVER_NAME = "bad_server_name"  # SNI host_name is not a valid ASCII host name


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol; the connection should be refused.

    `detail` is for humans (logs, debugging) and may contain numbers; `reason` is for machines.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail

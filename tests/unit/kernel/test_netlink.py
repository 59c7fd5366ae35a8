"""The netlink counter dump, parsed from bytes laid out as the kernel sends them."""

from __future__ import annotations

import struct

import pytest

from pointsman.kernel import netlink
from pointsman.kernel.netlink import (
    CounterValue,
    DumpInterrupted,
    NetlinkError,
    encode_dump_request,
    parse_dump,
)

NEWOBJ = (netlink.NFNL_SUBSYS_NFTABLES << 8) | netlink.NFT_MSG_NEWOBJ


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def message(kind: int, body: bytes, flags: int = 0x2) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body


def counter(name: str, packets: int, nbytes: int, obj_type: int = netlink.NFT_OBJECT_COUNTER) -> bytes:
    data = attr(netlink.NFTA_COUNTER_BYTES, struct.pack(">Q", nbytes)) + attr(
        netlink.NFTA_COUNTER_PACKETS, struct.pack(">Q", packets))
    body = (struct.pack("=BBH", 1, 0, 0)
            + attr(netlink.NFTA_OBJ_TABLE, b"pointsman\0")
            + attr(netlink.NFTA_OBJ_NAME, name.encode() + b"\0")
            + attr(netlink.NFTA_OBJ_TYPE, struct.pack(">I", obj_type))
            + attr(netlink.NFTA_OBJ_DATA | 0x8000, data))  # NLA_F_NESTED, as the kernel sets it
    return message(NEWOBJ, body)


def test_request_layout() -> None:
    request = encode_dump_request("pointsman", 7)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq, pid) == (len(request), 0x0A13, 0x301, 7, 0)
    assert request[16:20] == bytes([1, 0, 0, 0])  # NFPROTO_INET, NFNETLINK_V0
    assert b"pointsman\0" in request
    assert len(request) % 4 == 0


def test_parse_counters_across_reads() -> None:
    into: dict[str, CounterValue] = {}
    assert not parse_dump(counter("l_web_new", 3, 180) + counter("l_web_in", 10, 1500), into)
    assert parse_dump(counter("l_web_out", 9, 9000) + message(netlink.NLMSG_DONE, b"\0" * 4), into)
    assert into == {"l_web_new": CounterValue(3, 180), "l_web_in": CounterValue(10, 1500),
                    "l_web_out": CounterValue(9, 9000)}


def test_other_object_types_are_skipped() -> None:
    into: dict[str, CounterValue] = {}
    parse_dump(counter("quota", 1, 1, obj_type=2), into)
    assert into == {}


def test_error_message() -> None:
    with pytest.raises(NetlinkError) as info:
        parse_dump(message(netlink.NLMSG_ERROR, struct.pack("=i", -2) + bytes(16)), {})
    assert info.value.errno == 2


def test_interrupted_dump() -> None:
    with pytest.raises(DumpInterrupted):
        parse_dump(message(NEWOBJ, b"", flags=netlink.NLM_F_DUMP_INTR), {})


def test_truncated_input_is_refused() -> None:
    with pytest.raises(ValueError, match="overruns"):
        parse_dump(counter("x", 1, 1)[:-4], {})

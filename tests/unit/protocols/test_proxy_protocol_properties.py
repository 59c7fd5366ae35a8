"""PROXY protocol properties: builder -> parser round trips, prefixes, and fuzzing.

The fuzz contract is the module's: parse() returns None or (header, consumed), or raises
ProtocolError; any other exception is a bug.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from pointsman.protocols.errors import ProtocolError
from pointsman.protocols.proxy_protocol import (
    MAX_V2_LENGTH,
    TLV_CRC32C,
    V2_SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    Transport,
    build_v1,
    build_v2,
    parse,
)

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
transports = st.sampled_from([Transport.STREAM, Transport.DGRAM])
# Any type but CRC32C (which the builder adds itself); values short enough that ten of them plus a
# UNIX address block stay under MAX_V2_LENGTH and under the 128-byte unique ID limit.
tlvs = st.lists(
    st.tuples(st.integers(0, 0xFF).filter(lambda t: t != TLV_CRC32C), st.binary(max_size=100)),
    max_size=10,
)
_path_chars = st.characters(codec="utf-8", exclude_characters="\x00")  # no surrogates
filesystem_paths = st.text(_path_chars, max_size=40)
abstract_names = st.text(_path_chars, min_size=1, max_size=40).map(lambda name: "\x00" + name)
unix_paths = st.one_of(filesystem_paths, abstract_names).filter(lambda path: len(path.encode()) <= 108)


def _parse_all(data: bytes) -> ProxyHeader:
    result = parse(data)
    assert result is not None
    header, consumed = result
    assert consumed == len(data)
    return header


def _outcome_is_legal(data: bytes) -> None:
    try:
        result = parse(data)
    except ProtocolError:
        return
    if result is not None:
        header, consumed = result
        assert isinstance(header, ProxyHeader)
        assert 0 < consumed <= len(data)
        assert consumed <= MAX_V2_LENGTH


# --- round trips -------------------------------------------------------------------------------


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports)
def test_v1_round_trip(addresses: tuple[str, str], sport: int, dport: int) -> None:
    source, destination = addresses
    line = build_v1((source, sport), (destination, dport))
    header = _parse_all(line)
    family = Family.INET if ":" not in source else Family.INET6
    assert header == ProxyHeader(
        1, Command.PROXY, family, Transport.STREAM, (source, sport), (destination, dport)
    )


@given(ipv4, ipv6, ports, ports)
def test_v1_mixed_families_round_trip_as_mapped_ipv6(
    source: str, destination: str, sport: int, dport: int
) -> None:
    header = _parse_all(build_v1((source, sport), (destination, dport)))
    assert header.family is Family.INET6
    assert isinstance(header.source, tuple)
    mapped = ipaddress.IPv6Address(header.source[0]).ipv4_mapped
    assert mapped == ipaddress.IPv4Address(source)


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    transports,
    tlvs,
    st.booleans(),
)
def test_v2_inet_round_trip(
    addresses: tuple[str, str],
    sport: int,
    dport: int,
    transport: Transport,
    tlv_list: list[tuple[int, bytes]],
    crc: bool,
) -> None:
    source, destination = addresses
    built = build_v2(Command.PROXY, transport, (source, sport), (destination, dport), tlv_list, crc)
    header = _parse_all(built)
    assert header.family is (Family.INET if ":" not in source else Family.INET6)
    assert header.transport is transport
    assert header.source == (source, sport)
    assert header.destination == (destination, dport)
    expected = (*tlv_list, (TLV_CRC32C, built[-4:])) if crc else tuple(tlv_list)
    assert header.tlvs == expected


@given(unix_paths, unix_paths, transports, tlvs, st.booleans())
def test_v2_unix_round_trip(
    source: str,
    destination: str,
    transport: Transport,
    tlv_list: list[tuple[int, bytes]],
    crc: bool,
) -> None:
    header = _parse_all(build_v2(Command.PROXY, transport, source, destination, tlv_list, crc))
    assert (header.family, header.transport) == (Family.UNIX, transport)
    assert (header.source, header.destination) == (source, destination)


@given(tlvs, st.booleans())
def test_v2_local_round_trip(tlv_list: list[tuple[int, bytes]], crc: bool) -> None:
    header = _parse_all(build_v2(Command.LOCAL, Transport.UNSPEC, None, None, tlv_list, crc))
    assert header.command is Command.LOCAL
    assert header.source is header.destination is None
    assert header.tlvs[: len(tlv_list)] == tuple(tlv_list)


# --- prefixes and trailing bytes ---------------------------------------------------------------

valid_headers = st.one_of(
    st.builds(
        lambda s, d, sp, dp: build_v1((s, sp), (d, dp)),
        st.one_of(ipv4, ipv6),
        st.one_of(ipv4, ipv6),
        ports,
        ports,
    ),
    st.builds(
        lambda s, d, sp, dp, t, tl, c: build_v2(Command.PROXY, t, (s, sp), (d, dp), tl, c),
        st.one_of(ipv4, ipv6),
        st.one_of(ipv4, ipv6),
        ports,
        ports,
        transports,
        tlvs,
        st.booleans(),
    ),
    st.builds(
        lambda s, d, t, tl, c: build_v2(Command.PROXY, t, s, d, tl, c),
        unix_paths,
        unix_paths,
        transports,
        tlvs,
        st.booleans(),
    ),
)


@given(valid_headers, st.data())
def test_every_strict_prefix_needs_more(header: bytes, data: st.DataObject) -> None:
    end = data.draw(st.integers(0, len(header) - 1))
    assert parse(header[:end]) is None


@given(valid_headers, st.binary(max_size=64))
def test_trailing_bytes_are_never_consumed(header: bytes, trailing: bytes) -> None:
    alone = parse(header)
    assert alone is not None
    assert parse(header + trailing) == alone
    assert alone[1] == len(header)


# --- fuzzing -----------------------------------------------------------------------------------

prefixed_noise = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda tail: V2_SIGNATURE + tail),
    st.binary(max_size=120).map(lambda tail: b"PROXY " + tail),
    st.text(st.sampled_from("TCP46UNKOW0123456789abcdef.: \r\n"), max_size=110).map(
        lambda tail: b"PROXY " + tail.encode()
    ),
)


@given(prefixed_noise)
def test_fuzz_random_bytes(data: bytes) -> None:
    _outcome_is_legal(data)


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_headers))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 0xFF))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[at]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@given(mutated_headers())
def test_fuzz_mutated_headers(data: bytes) -> None:
    _outcome_is_legal(data)


@given(mutated_headers())
def test_fuzz_mutated_headers_incrementally(data: bytes) -> None:
    """Feeding a growing buffer never changes an earlier verdict: None, then a result or error."""
    for end in range(len(data) + 1):
        try:
            result = parse(data[:end])
        except ProtocolError:
            return
        if result is not None:
            assert parse(data) == result
            return

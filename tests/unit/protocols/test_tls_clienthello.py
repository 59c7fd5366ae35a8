"""TLS ClientHello peek: extraction, reassembly, every error reason, the cap, name matching.

Hellos are built field by field in hello_builder.py (RFC 8446 4.1.2); one is a real capture.
"""

from __future__ import annotations

import pytest

from pointsman.protocols.errors import ProtocolError, Reason
from pointsman.protocols.tls_clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloReader,
    looks_like_tls,
    match_server_name,
    parse_client_hello,
)
from tests.unit.protocols.hello_builder import (
    alpn,
    client_hello,
    client_hello_body,
    extension,
    handshake,
    records,
    sni,
    supported_versions,
    u16,
    vec8,
    vec16,
)

# Captured on loopback from `openssl s_client -connect 127.0.0.1:PORT -servername x.example
# -alpn h2,http/1.1` (OpenSSL 3.0.x, Debian 12) by a socket that recorded the first bytes.
OPENSSL_HELLO = bytes.fromhex(
    "16030101480100014403034fc165e8e23f829548eb1662cbd8ab2e4e50f804118feb60d96cce18aecafdbc20"
    "b7e189c54346e6b885cefecf58afcd61897e317d20f26ee723a3c4a445f8b0da003e130213031301c02cc030"
    "009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d"
    "003c0035002f00ff010000bd0000000e000c000009782e6578616d706c65000b000403000102000a00160014"
    "001d0017001e0019001801000101010201030104002300000010000e000c02683208687474702f312e310016"
    "000000170000000d002a0028040305030603080708080809080a080b08040805080604010501060103030301"
    "0302040205020602002b0009080304030303020301002d00020101003300260024001d00209bf969d5151265"
    "f57a4fc3b0185c0e92a325c063f663d8df539af337cb476a0d"
)

DEFAULT_HELLO = client_hello()


def parsed(data: bytes) -> ClientHello:
    hello = parse_client_hello(data)
    assert hello is not None
    return hello


def reason_of(data: bytes) -> Reason:
    with pytest.raises(ProtocolError) as info:
        parse_client_hello(data)
    return info.value.reason


def with_extensions(*extensions: bytes) -> bytes:
    return client_hello(extensions=list(extensions))


# --- extraction --------------------------------------------------------------------------------


def test_default_hello_is_post_quantum_sized() -> None:
    assert 1800 <= len(DEFAULT_HELLO) <= 2200


def test_extracts_routing_fields() -> None:
    assert parsed(DEFAULT_HELLO) == ClientHello(
        server_name="www.example.com",
        alpn=("h2", "http/1.1"),
        legacy_version=0x0303,
        supported_versions=(0x0304, 0x0303),
        record_bytes=len(DEFAULT_HELLO),
    )


def test_openssl_capture() -> None:
    assert parsed(OPENSSL_HELLO) == ClientHello(
        server_name="x.example",
        alpn=("h2", "http/1.1"),
        legacy_version=0x0303,
        supported_versions=(0x0304, 0x0303, 0x0302, 0x0301),
        record_bytes=len(OPENSSL_HELLO),
    )


def test_server_name_is_lowercased_and_loses_its_trailing_dot() -> None:
    assert parsed(client_hello(server_name=b"WWW.Example.COM.")).server_name == "www.example.com"


def test_underscores_and_idna_labels_are_accepted() -> None:
    name = b"_acme.xn--bcher-kva.example"
    assert parsed(client_hello(server_name=name)).server_name == name.decode()


def test_no_extensions_at_all() -> None:
    # A TLS 1.0-1.2 hello may end after compression methods (RFC 5246 7.4.1.2).
    body = u16(0x0301) + bytes(32) + vec8(b"") + vec16(u16(0x002F)) + vec8(b"\x00")
    hello = parsed(records(handshake(body)))
    assert (hello.server_name, hello.alpn, hello.supported_versions) == (None, (), ())
    assert hello.legacy_version == 0x0301


def test_no_sni_no_alpn() -> None:
    hello = parsed(with_extensions(supported_versions(0x0304)))
    assert hello.server_name is None
    assert hello.alpn == ()


def test_unknown_name_type_is_skipped() -> None:
    assert parsed(with_extensions(sni(b"opaque", name_type=7))).server_name is None


def test_alpn_keeps_order_and_escapes_non_utf8() -> None:
    hello = parsed(with_extensions(alpn(b"http/1.1", b"\xff\xfe", b"h2")))
    assert hello.alpn == ("http/1.1", "\udcff\udcfe", "h2")
    assert hello.alpn[1].encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_grease_versions_are_reported_as_sent() -> None:
    hello = parsed(with_extensions(supported_versions(0x7A7A, 0x0304)))
    assert hello.supported_versions == (0x7A7A, 0x0304)


def test_bytes_after_the_hello_are_ignored() -> None:
    # A TLS 1.3 middlebox-compatibility change_cipher_spec record, then early data.
    trailing = records(b"\x01", content_type=20) + records(b"early", content_type=23)
    assert parsed(DEFAULT_HELLO + trailing) == parsed(DEFAULT_HELLO)


# --- reassembly --------------------------------------------------------------------------------


@pytest.mark.parametrize("record_size", [1, 7, 100, 512, 1024])
def test_hello_split_across_records(record_size: int) -> None:
    data = client_hello(record_size=record_size)
    hello = parsed(data)
    assert hello.server_name == "www.example.com"
    assert hello.record_bytes == len(data)


def test_record_bytes_counts_up_to_the_record_that_completed_the_hello() -> None:
    message = handshake(client_hello_body())
    data = records(message + b"\x00" * 10)  # hello plus junk in the same record
    assert parsed(data).record_bytes == len(data)


@pytest.mark.parametrize("record_size", [2**14, 300])
def test_byte_by_byte_gives_none_until_complete(record_size: int) -> None:
    data = client_hello(record_size=record_size)
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is None, end
    assert parse_client_hello(data) == parsed(data)


@pytest.mark.parametrize("record_size", [2**14, 1, 300])
def test_reader_fed_byte_by_byte(record_size: int) -> None:
    data = client_hello(record_size=record_size)
    reader = ClientHelloReader()
    results = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == parsed(data)


def test_reader_repeats_its_result_and_its_error() -> None:
    reader = ClientHelloReader()
    hello = reader.feed(DEFAULT_HELLO)
    assert hello is not None
    assert reader.feed(b"more bytes") is hello
    broken = ClientHelloReader()
    with pytest.raises(ProtocolError):
        broken.feed(b"GET /")
    with pytest.raises(ProtocolError):
        broken.feed(DEFAULT_HELLO)


# --- errors, one reason at a time --------------------------------------------------------------


def _body_replacing(old: bytes, new: bytes) -> bytes:
    body = client_hello_body()
    assert body.count(old) == 1
    return records(handshake(body.replace(old, new)))


ERRORS: list[tuple[str, bytes, Reason]] = [
    ("plain http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Reason.NOT_TLS),
    ("first byte alone", b"G", Reason.NOT_TLS),
    ("SSL 2 compatible hello", bytes.fromhex("802e0100020015"), Reason.NOT_TLS),
    ("record version major 2", b"\x16\x02\x00", Reason.NOT_TLS),
    ("ssh banner", b"SSH-2.0-OpenSSH_9.6\r\n", Reason.NOT_TLS),
    ("application data record first", records(b"hello", content_type=23), Reason.NOT_HANDSHAKE),
    ("alert record first", records(b"\x02\x28", content_type=21), Reason.NOT_HANDSHAKE),
    (
        "alert interleaved between hello fragments",
        client_hello(record_size=1000)[:1005] + records(b"\x02\x28", content_type=21),
        Reason.NOT_HANDSHAKE,
    ),
    ("server hello", records(handshake(client_hello_body(), msg_type=2)), Reason.NOT_CLIENT_HELLO),
    (
        "handshake type seen in the first fragment byte",
        b"\x16\x03\x01\x00\x10\x0b",
        Reason.NOT_CLIENT_HELLO,
    ),
    ("zero-length record", b"\x16\x03\x01\x00\x00", Reason.BAD_LENGTH),
    ("record over 2^14", b"\x16\x03\x01\x40\x01", Reason.BAD_LENGTH),
    ("session id of 33", client_hello(session_id=bytes(33)), Reason.BAD_LENGTH),
    ("odd cipher_suites", client_hello(cipher_suites=b"\x13\x01\x13"), Reason.BAD_LENGTH),
    ("no cipher_suites", client_hello(cipher_suites=b""), Reason.BAD_LENGTH),
    ("no compression methods", client_hello(compression=b""), Reason.BAD_LENGTH),
    (
        "bytes after the extensions block",
        records(handshake(client_hello_body() + b"\x00")),
        Reason.BAD_LENGTH,
    ),
    ("empty body", records(handshake(b"")), Reason.TRUNCATED),
    (
        "cipher_suites longer than the body",
        records(handshake(u16(0x0303) + bytes(32) + b"\x00" + b"\xff\xff\x13\x01")),
        Reason.TRUNCATED,
    ),
    (
        "extension longer than the extensions block",
        records(handshake(client_hello_body(extensions=[u16(0) + u16(50) + b"short"]))),
        Reason.TRUNCATED,
    ),
    ("duplicate extension", with_extensions(alpn(b"h2"), alpn(b"h2")), Reason.BAD_EXTENSION),
    ("two host_names", with_extensions(sni(b"a.example", b"b.example")), Reason.BAD_EXTENSION),
    ("empty server_name_list", with_extensions(extension(0, vec16(b""))), Reason.BAD_EXTENSION),
    ("empty sni extension", with_extensions(extension(0, b"")), Reason.BAD_EXTENSION),
    ("empty host_name", with_extensions(sni(b"")), Reason.BAD_EXTENSION),
    (
        "sni list shorter than its extension",
        with_extensions(extension(0, vec16(b"\x00" + vec16(b"a.example")) + b"\x00")),
        Reason.BAD_EXTENSION,
    ),
    (
        "sni name overruns its list",
        with_extensions(extension(0, vec16(b"\x00\x00\x20abc"))),
        Reason.BAD_EXTENSION,
    ),
    ("empty ALPN name", with_extensions(alpn(b"h2", b"")), Reason.BAD_EXTENSION),
    ("empty ALPN list", with_extensions(extension(16, vec16(b""))), Reason.BAD_EXTENSION),
    (
        "odd supported_versions",
        with_extensions(extension(43, vec8(b"\x03\x04\x03"))),
        Reason.BAD_EXTENSION,
    ),
    ("empty supported_versions", with_extensions(extension(43, vec8(b""))), Reason.BAD_EXTENSION),
    ("space in host name", client_hello(server_name=b"bad name.example"), Reason.BAD_SERVER_NAME),
    (
        "non-ASCII host name",
        client_hello(server_name="bü.example".encode()),
        Reason.BAD_SERVER_NAME,
    ),
    ("NUL in host name", client_hello(server_name=b"a.example\x00.evil"), Reason.BAD_SERVER_NAME),
    ("empty label", client_hello(server_name=b"a..example"), Reason.BAD_SERVER_NAME),
    ("just a dot", client_hello(server_name=b"."), Reason.BAD_SERVER_NAME),
    ("IPv6 literal", client_hello(server_name=b"::1"), Reason.BAD_SERVER_NAME),
    ("64-byte label", client_hello(server_name=b"a" * 64 + b".example"), Reason.BAD_SERVER_NAME),
    (
        "254-character name",
        client_hello(server_name=b".".join([b"a" * 63] * 3) + b"." + b"b" * 62),
        Reason.BAD_SERVER_NAME,
    ),
    (
        "handshake length over the cap, refused from its 4-byte header",
        b"\x16\x03\x01\x00\x04" + b"\x01" + (MAX_CLIENT_HELLO - 3).to_bytes(3, "big"),
        Reason.TOO_LONG,
    ),
    (
        "a 16 KiB record plus its header is over the cap",
        b"\x16\x03\x01\x40\x00",
        Reason.TOO_LONG,
    ),
]


@pytest.mark.parametrize(("name", "data", "reason"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name: str, data: bytes, reason: Reason) -> None:
    assert reason_of(data) is reason


def test_every_tls_reason_is_exercised() -> None:
    tls_reasons = {
        Reason.NOT_TLS,
        Reason.NOT_HANDSHAKE,
        Reason.NOT_CLIENT_HELLO,
        Reason.BAD_LENGTH,
        Reason.TRUNCATED,
        Reason.BAD_EXTENSION,
        Reason.BAD_SERVER_NAME,
        Reason.TOO_LONG,
    }
    assert {reason for _, _, reason in ERRORS} == tls_reasons


def test_longest_valid_host_name_is_accepted() -> None:
    name = b".".join([b"a" * 63] * 3) + b"." + b"b" * 61  # 253 characters
    assert parsed(client_hello(server_name=name)).server_name == name.decode()


def test_largest_hello_under_the_cap_is_accepted() -> None:
    # One record: 5-byte header + 4-byte handshake header + body == MAX_CLIENT_HELLO exactly.
    base = len(client_hello(padding=0))
    data = client_hello(padding=MAX_CLIENT_HELLO - base)
    assert len(data) == MAX_CLIENT_HELLO
    assert parsed(data).server_name == "www.example.com"
    assert reason_of(client_hello(padding=MAX_CLIENT_HELLO - base + 1)) is Reason.TOO_LONG


def test_tiny_records_count_against_the_cap() -> None:
    # A 3.5 KiB hello in 1-byte records takes 6x the bytes: refused before it is all buffered.
    data = client_hello(record_size=1, padding=2000)
    assert 3 * 1024 < len(data) // 6 < MAX_CLIENT_HELLO
    assert reason_of(data) is Reason.TOO_LONG
    assert parse_client_hello(data[: MAX_CLIENT_HELLO - 1]) is None


# --- looks_like_tls and name matching ----------------------------------------------------------


def test_looks_like_tls() -> None:
    assert looks_like_tls(DEFAULT_HELLO[0])
    assert looks_like_tls(OPENSSL_HELLO[0])
    for first in b"GPSCH\x00\x80\x17\x15":
        assert not looks_like_tls(first)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("www.example.com", "www.example.com", True),
        ("WWW.Example.com", "www.example.COM", True),
        ("www.example.com.", "www.example.com", True),
        ("www.example.com", "www.example.com.", True),
        ("www.example.com", "example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "A.EXAMPLE.COM", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "a.example.org", False),
        ("*.example.com", "aexample.com", False),
        ("a*.example.com", "ab.example.com", False),
        ("*", "localhost", False),
        ("", "", False),
        ("*.", "a.", False),
    ],
)
def test_match_server_name(pattern: str, name: str, expected: bool) -> None:
    assert match_server_name(pattern, name) is expected

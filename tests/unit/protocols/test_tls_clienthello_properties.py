"""ClientHello properties: any record split or segmentation gives the same answer; fuzzing.

The fuzz contract is the module's: None, a ClientHello, or ProtocolError; anything else is a bug.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pointsman.protocols.errors import ProtocolError
from pointsman.protocols.tls_clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloReader,
    parse_client_hello,
)
from tests.unit.protocols.hello_builder import (
    client_hello,
    client_hello_body,
    handshake,
    records,
)

host_names = st.from_regex(r"[a-z0-9_-]{1,20}(\.[a-z0-9_-]{1,20}){0,4}", fullmatch=True)
protocols = st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5)
hellos = st.builds(
    lambda name, alpn, padding, size: client_hello(
        server_name=name.encode(), protocols=alpn, padding=padding, record_size=size
    ),
    host_names,
    protocols,
    st.integers(0, 600),
    st.integers(1, 2**14),
)


def _outcome_is_legal(data: bytes) -> None:
    try:
        result = parse_client_hello(data)
    except ProtocolError:
        return
    assert result is None or isinstance(result, ClientHello)
    if result is not None:
        assert result.record_bytes <= MAX_CLIENT_HELLO


@given(host_names, protocols, st.integers(1, 2**14))
def test_fields_survive_any_record_size(name: str, alpn: list[bytes], size: int) -> None:
    data = client_hello(server_name=name.encode(), protocols=alpn, record_size=size)
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.server_name == name
    assert hello.alpn == tuple(p.decode("utf-8", "surrogateescape") for p in alpn)
    assert hello.record_bytes == len(data)


@given(hellos, st.data())
def test_any_segmentation_gives_the_one_shot_result(data: bytes, draw: st.DataObject) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=20)))
    reader = ClientHelloReader()
    results = [reader.feed(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    expected = parse_client_hello(data)
    assert expected is not None
    first = next(i for i, result in enumerate(results) if result is not None)
    assert results[:first] == [None] * first  # None until the hello is complete...
    assert all(result == expected for result in results[first:])  # ...then the same answer


@given(hellos, st.data())
def test_every_strict_prefix_needs_more(data: bytes, draw: st.DataObject) -> None:
    assert parse_client_hello(data[: draw.draw(st.integers(0, len(data) - 1))]) is None


@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _outcome_is_legal(data)


@given(st.binary(max_size=600))
def test_fuzz_random_handshake_bodies(body: bytes) -> None:
    _outcome_is_legal(records(handshake(body)))


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    options = draw(st.sampled_from([{"padding": 0}, {"padding": 0, "record_size": 50}, {}]))
    data = bytearray(client_hello(**options))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
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


@given(mutated_hellos())
def test_fuzz_mutated_hellos(data: bytes) -> None:
    _outcome_is_legal(data)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """Mutate inside the body and fix up the outer lengths, to reach the extension parsers."""
    body = bytearray(client_hello_body(padding=0))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(body) - 1))
        body[at] = draw(st.integers(0, 0xFF))
    return records(handshake(bytes(body)))


@given(mutated_bodies())
def test_fuzz_mutated_bodies(data: bytes) -> None:
    _outcome_is_legal(data)

"""IPv6: a listener on [::1] in front of a backend on [::1]."""

from __future__ import annotations

import pytest

from tests.support import (
    LOOPBACK6,
    close_writer,
    connect,
    echo_backend,
    free_port,
    has_ipv6,
    hostport,
    one_pool_config,
    read_all,
    roundtrip,
    running,
    wait_for,
)

pytestmark = pytest.mark.skipif(not has_ipv6(), reason="::1 is not available here")


async def test_ipv6_listener_and_backend() -> None:
    async with echo_backend(LOOPBACK6) as peer:
        listen = hostport(LOOPBACK6, free_port(LOOPBACK6))
        assert listen.startswith("[::1]:") and peer.address.startswith("[::1]:")
        async with running(one_pool_config(listen, [peer.address])) as runtime:
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"over v6\n" * 1000)
            listener = runtime.listeners["lb"]
            (conn,) = listener.connections
            assert conn.peer[0] == LOOPBACK6
            assert conn.backend_id == peer.address
            writer.write_eof()
            assert await read_all(reader, timeout=2.0) == b""
            await close_writer(writer)
            await wait_for(lambda: listener.stats.active == 0, 1.0, what="connection torn down")

    assert peer.accepted == 1
    assert listener.stats.bytes_in == listener.stats.bytes_out == 8000

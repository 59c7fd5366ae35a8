"""IPv6: a listener on [::1] in front of a backend on [::1]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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


async def test_ipv6_listener_and_backend(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    async with echo_backend(LOOPBACK6) as peer:
        listen = hostport(LOOPBACK6, free_port(LOOPBACK6))
        assert listen.startswith("[::1]:") and peer.address.startswith("[::1]:")
        text = yaml.safe_load(one_pool_config(listen, [peer.address]))
        text["flow_log"] = {"path": str(log)}
        async with running(yaml.safe_dump(text)) as runtime:
            reader, writer = await connect(listen)
            client = hostport(*writer.get_extra_info("sockname")[:2])
            await roundtrip(reader, writer, b"over v6\n" * 1000)
            listener = runtime.listeners["lb"]
            assert listener.statistics().active == 1
            writer.write_eof()
            assert await read_all(reader, timeout=2.0) == b""
            await close_writer(writer)
            await wait_for(lambda: listener.statistics().active == 0, 1.0,
                           what="connection torn down")

    assert peer.accepted == 1
    stats = listener.statistics()
    assert stats.bytes_in == stats.bytes_out == 8000
    # The flow record names the v6 client (the TCP peer) and the v6 backend it went to.
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (record["client"], record["backend"]) == (client, peer.address)
    assert record["client"].startswith("[::1]:")

"""Backends that register themselves in etcd (`pointsman member register`) join a pool with
`discovery: {etcd_members: true}` on every node, after its configured backends; a registrant that
stops leaves at once (lease revoked), one that is killed leaves when its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pointsman.fleet import keys
from pointsman.fleet.etcd import EtcdClient, EtcdSettings
from tests.integration.peers import ask_name, named_backends
from tests.interop.etcd_support import (
    etcd_cluster,
    new_prefix,
    pool_backend_ids,
    requires_etcd,
    write_node_file,
)
from tests.interop.test_etcd_config import start_node, stop, wait_backends, wait_listening
from tests.support import LOOPBACK, free_port

pytestmark = [requires_etcd, pytest.mark.peer("etcd"), pytest.mark.timeout(60)]

REGISTER_TIMEOUT = 10.0
TTL = 2  # seconds: a killed registrant's backend is gone after this


@contextlib.contextmanager
def registered(endpoints: str, prefix: str, pool: str, address: str) -> Iterator[subprocess.Popen[str]]:
    """`pointsman member register` until the block ends (or the test kills it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pointsman", "member", "register", pool, address, "--endpoints",
         endpoints, "--prefix", prefix, "--ttl", str(TTL)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "registered <key> ...", printed once the key is written
        assert line.startswith("registered "), line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=REGISTER_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_members_join_and_leave_the_pool(tmp_path: Path) -> None:
    listen, prefix, admin = f"{LOOPBACK}:{free_port()}", new_prefix(), free_port()
    with etcd_cluster(tmp_path) as etcd:
        async with named_backends("static", "m1", "m2") as (static, m1, m2):
            config = yaml.safe_dump({
                "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
                "pools": [{"name": "p", "algorithm": "round_robin", "backends": [static.config()],
                           "discovery": {"etcd_members": True}}],
                "shutdown_grace": "1s",
            })
            async with EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
                await client.put(keys.config_key(prefix), config)
            proc = start_node(tmp_path / "lb-a", write_node_file(
                tmp_path / "node.yaml", "lb-a", etcd.endpoints, prefix, admin))
            try:
                await wait_listening(proc)
                assert pool_backend_ids(admin) == ["static"]
                cm1 = registered(etcd.endpoints, prefix, "p", m1.address)
                cm2 = registered(etcd.endpoints, prefix, "p", m2.address)
                r1 = await asyncio.to_thread(cm1.__enter__)
                r2 = await asyncio.to_thread(cm2.__enter__)
                try:
                    await wait_backends(admin, ["static", m1.address, m2.address])
                    names = {await ask_name(listen) for _ in range(6)}
                    assert names == {"static", "m1", "m2"}

                    # Stopped: the lease is revoked and the member leaves at once.
                    r1.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(r1.wait, REGISTER_TIMEOUT)
                    await wait_backends(admin, ["static", m2.address], timeout=1.0)

                    # Killed: nothing revokes; etcd drops the key when the lease runs out.
                    r2.kill()
                    await asyncio.to_thread(r2.wait, REGISTER_TIMEOUT)
                    killed = time.perf_counter()
                    await wait_backends(admin, ["static"], timeout=TTL + 3.0)
                    print(f"killed member left the pool after {time.perf_counter() - killed:.1f} s "
                          f"(ttl {TTL} s)")
                    assert {await ask_name(listen) for _ in range(4)} == {"static"}
                finally:
                    await asyncio.to_thread(cm2.__exit__, None, None, None)
                    await asyncio.to_thread(cm1.__exit__, None, None, None)
            finally:
                await asyncio.to_thread(stop, proc)


async def test_member_register_refuses_a_bad_address(tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pointsman", "member", "register", "p", "nowhere",
                         "--endpoints", "http://127.0.0.1:1", "--prefix", "/x/"],
        capture_output=True, text=True, timeout=REGISTER_TIMEOUT, check=False)
    assert result.returncode == 1
    assert "expected host:port, got 'nowhere'" in result.stderr

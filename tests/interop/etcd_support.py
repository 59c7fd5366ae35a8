"""A real etcd (one member or a loopback cluster) for the fleet and discovery tests.

Each member runs in the foreground with its data directory under the test's tmp_path, on free
loopback ports, and is SIGKILLed at teardown. Readiness and leadership are read from the member's
own HTTP endpoints (`/health`, `/v3/maintenance/status`) with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import LOOPBACK, free_port

ETCD = shutil.which("etcd")
requires_etcd = pytest.mark.skipif(
    ETCD is None, reason="etcd is not installed (Debian package etcd-server; scripts/setup.sh)")

READY_TIMEOUT = 10.0  # a member is healthy in < 1 s here; a 3-member cluster in ~0.3 s more


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    members: list[Member]
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, member: Member) -> None:
        assert ETCD is not None and not member.running
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [
            ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token, "--log-outputs", "stderr",
        ]
        with member.log_path.open("ab") as log:
            member.proc = subprocess.Popen(argv, stdout=log, stderr=log)

    def kill(self, member: Member) -> None:
        """SIGKILL: a crash (SIGTERM on a leader may stall ~5 s transferring leadership)."""
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(timeout=5)

    def wait_healthy(self, members: list[Member] | None = None, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for member in members or self.members:
            while not healthy(member.url):
                if member.proc is not None and member.proc.poll() is not None:
                    raise AssertionError(f"etcd {member.name} exited:\n{member.log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd {member.name} not healthy after {timeout}s:\n"
                                         f"{member.log_path.read_text()[-2000:]}")
                time.sleep(0.05)

    def leader(self, timeout: float = READY_TIMEOUT) -> Member:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running:
                    continue
                status = post(member.url, "/v3/maintenance/status", {})
                if status and status.get("leader") == status.get("header", {}).get("member_id"):
                    return member
            time.sleep(0.05)
        raise AssertionError(f"no etcd leader after {timeout}s")


def post(url: str, path: str, body: Mapping[str, object], timeout: float = 1.0) -> dict[str, Any] | None:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def etcd_cluster(workdir: Path, size: int = 1, start: bool = True) -> Iterator[EtcdCluster]:
    """`size` members on free loopback ports (started and healthy unless start=False)."""
    members = [Member(f"m{i}", free_port(), free_port(), workdir / f"etcd-m{i}",
                      workdir / f"etcd-m{i}.log") for i in range(size)]
    cluster = EtcdCluster(members)
    try:
        if start:
            for member in members:
                cluster.start(member)
            cluster.wait_healthy()
        yield cluster
    finally:
        for member in members:
            cluster.kill(member)


# --- pointsman nodes and commands against that etcd ------------------------------------------------

CLI_TIMEOUT = 30.0  # one `pointsman config push` etc.; a passing one takes about a second


def new_prefix() -> str:
    return f"/pointsman/test/{uuid.uuid4().hex[:8]}/"


def write_node_file(path: Path, name: str, endpoints: str, prefix: str, admin_port: int,
                    lease_ttl: str = "3s", binds: dict[str, str] | None = None,
                    **local: object) -> Path:
    import yaml

    data: dict[str, object] = {
        "node": {"name": name, "lease_ttl": lease_ttl, **({"binds": binds} if binds else {})},
        "config_source": {"etcd": {"endpoints": endpoints.split(","), "prefix": prefix}},
        "admin": {"bind": f"{LOOPBACK}:{admin_port}"},
        **local,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`python -m pointsman ARGS`, output captured (blocking: call it with asyncio.to_thread)."""
    import sys

    return subprocess.run([sys.executable, "-m", "pointsman", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=2.0) as resp:
        return str(resp.read().decode())


def pool_backend_ids(admin_port: int, pool: str = "p") -> list[str]:
    """The backends pool `pool` runs now, from the node's admin status API ([] if unreachable)."""
    try:
        status = json.loads(admin_get(admin_port, "/api/v1/status"))
    except (OSError, ValueError):
        return []
    return sorted(b["id"] for p in status["pools"] if p["name"] == pool for b in p["backends"])


def metric(admin_port: int, sample: str) -> float | None:
    """The value of one exposition line, e.g. 'pointsman_config_rejected_total{source="etcd"}'."""
    for line in admin_get(admin_port, "/metrics").splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None

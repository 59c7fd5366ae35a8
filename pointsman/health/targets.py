"""From a pool's config to the checker's targets (the only place health config meets probes)."""

from __future__ import annotations

import re

from pointsman.config.model import HealthCheckConfig, PoolConfig
from pointsman.health.checker import HealthTarget
from pointsman.health.dialects import parse_hex, unescape
from pointsman.health.probes import ProbeSpec
from pointsman.pool.pool import Pool


def probe_spec(check: HealthCheckConfig) -> ProbeSpec:
    send = parse_hex(check.send_hex) if check.send_hex else (
        unescape(check.send) if check.send is not None else None)
    return ProbeSpec(
        type=check.type,
        timeout=check.timeout,
        send=send,
        expect=unescape(check.expect) if check.expect is not None else None,
        expect_regex=re.compile(check.expect_regex.encode()) if check.expect_regex else None,
        http_path=check.http.path,
        http_host=check.http.host,
        http_expect_status=tuple(check.http.expect_status),
        tls_server_name=check.tls.server_name,
        tls_verify=check.tls.verify,
    )


def targets_for(pool: Pool, config: PoolConfig) -> list[HealthTarget]:
    """One target per backend; none when the pool has no health check (or type none)."""
    check = config.health_check
    if check is None or check.type == "none":
        return []
    spec = probe_spec(check)
    return [
        HealthTarget(
            backend_id=backend.id,
            host=backend.address.host,
            port=check.port or backend.address.port,
            spec=spec,
            interval=check.interval,
            jitter=min(check.jitter, 0.99),
            rise=check.rise,
            fall=check.fall,
            healthy=pool.member(backend.id).machine.health_ok,
        )
        for backend in config.backends
    ]

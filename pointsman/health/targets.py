"""From a pool's config to the checker's targets (the only place health config meets probes)."""

from __future__ import annotations

import dataclasses
import re

from pointsman.config.addresses import HostPort
from pointsman.config.model import BackendConfig, HealthCheckConfig, PoolConfig
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
        command=tuple(check.command or ()),
    )


def probe_address(check: HealthCheckConfig, backend: BackendConfig) -> tuple[str, int]:
    """Where to probe: the backend's health_check_address, else the pool's health_check.address,
    else the backend's host on health_check.port (default: the backend's own port)."""
    address = backend.health_check_address or check.address
    if address is not None:
        return address.host, address.port
    return backend.address.host, check.port or backend.address.port


def exec_environment(pool: str, backend: BackendConfig) -> tuple[tuple[str, str], ...]:
    """What an exec check learns about the backend it judges (the probed address, which may be
    another one, is added by the probe as POINTSMAN_CHECK_HOST/PORT)."""
    address: HostPort = backend.address
    return (
        ("POINTSMAN_POOL", pool),
        ("POINTSMAN_BACKEND_NAME", backend.id),
        ("POINTSMAN_BACKEND_HOST", address.host),
        ("POINTSMAN_BACKEND_PORT", str(address.port)),
        ("POINTSMAN_BACKEND_ADDRESS", str(HostPort(address.host, address.port))),
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
            host=host,
            port=port,
            spec=dataclasses.replace(spec, environment=exec_environment(config.name, backend))
            if check.type == "exec" else spec,
            interval=check.interval,
            jitter=min(check.jitter, 0.99),
            rise=check.rise,
            fall=check.fall,
            healthy=pool.member(backend.id).machine.health_ok,
        )
        for backend in config.backends
        for host, port in (probe_address(check, backend),)
    ]

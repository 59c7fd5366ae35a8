"""EndpointSlices to backends, and where the API is (discovery/kubernetes.py)."""

from __future__ import annotations

from typing import Any

import pytest

from pointsman.discovery.kubernetes import SERVICE_ACCOUNT, KubernetesApi, slice_backends


def endpoint_slice(ports: list[dict[str, Any]], endpoints: list[dict[str, Any]],
                   address_type: str = "IPv4") -> dict[str, Any]:
    return {"addressType": address_type, "ports": ports, "endpoints": endpoints}


READY = {"addresses": ["10.1.0.1"], "conditions": {"ready": True}}
NO_CONDITION = {"addresses": ["10.1.0.2"]}  # the API's default: ready
NOT_READY = {"addresses": ["10.1.0.3"], "conditions": {"ready": False, "terminating": True}}
NO_ADDRESS = {"addresses": [], "conditions": {"ready": True}}


def test_ready_endpoints_on_the_named_port() -> None:
    ports = [{"name": "metrics", "port": 9100}, {"name": "http", "port": 8080}]
    found = slice_backends(endpoint_slice(ports, [READY, NO_CONDITION, NOT_READY, NO_ADDRESS]), "http")
    assert [b.id for b in found] == ["10.1.0.1:8080", "10.1.0.2:8080"]


@pytest.mark.parametrize(("ports", "port_name", "expected"), [
    ([{"port": 80}], None, 80),  # the only port
    ([{"name": "", "port": 80}, {"name": "tls", "port": 443}], None, 80),  # the unnamed one
    ([{"name": "a", "port": 80}, {"name": "b", "port": 81}], None, None),  # ambiguous
    ([{"name": "a", "port": 80}], "b", None),  # no such port
    ([{"name": "a"}], "a", None),  # no port number (a Service without ports)
])
def test_port_choice(ports: list[dict[str, Any]], port_name: str | None, expected: int | None) -> None:
    found = slice_backends(endpoint_slice(ports, [READY]), port_name)
    assert [b.address.port for b in found] == ([] if expected is None else [expected])


def test_ipv6_and_fqdn_slices() -> None:
    v6 = endpoint_slice([{"port": 80}], [{"addresses": ["fd00::5"]}], "IPv6")
    assert [b.id for b in slice_backends(v6, None)] == ["[fd00::5]:80"]
    fqdn = endpoint_slice([{"port": 80}], [{"addresses": ["db.example"]}], "FQDN")
    assert slice_backends(fqdn, None) == []


def test_api_from_the_environment() -> None:
    assert KubernetesApi.from_environment({}) is None
    assert KubernetesApi.from_environment({"POINTSMAN_KUBERNETES_API": "http://127.0.0.1:8001/"}) == \
        KubernetesApi("http://127.0.0.1:8001")
    in_cluster = KubernetesApi.from_environment({"KUBERNETES_SERVICE_HOST": "fd00::1",
                                                 "KUBERNETES_SERVICE_PORT": "443"})
    assert in_cluster == KubernetesApi("https://[fd00::1]:443", str(SERVICE_ACCOUNT / "token"),
                                       str(SERVICE_ACCOUNT / "ca.crt"))

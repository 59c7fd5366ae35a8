"""The etcd key layout, gateway encodings and error classes, member and drain values
(fleet/keys.py, fleet/etcd.py, discovery/etcd_members.py, fleet/agent.py)."""

from __future__ import annotations

import base64

import pytest

from pointsman.discovery.etcd_members import member_backend
from pointsman.fleet import keys
from pointsman.fleet.agent import drain_reason
from pointsman.fleet.etcd import EtcdError, EtcdUnavailable, KeyValue, _raise_for, prefix_end


def test_layout() -> None:
    assert keys.config_key("/pm/prod") == "/pm/prod/config"
    assert keys.node_key("/pm/prod/", "lb-a") == "/pm/prod/nodes/lb-a"
    assert keys.drain_key("/pm/prod/", "lb-a") == "/pm/prod/drain/lb-a"
    assert keys.member_key("/pm/prod/", "web", "[fd00::1]:80") == "/pm/prod/members/web/[fd00::1]:80"
    with pytest.raises(ValueError, match="invalid node name"):
        keys.node_key("/pm/", "lb/a")
    with pytest.raises(ValueError, match="expected host:port"):
        keys.member_key("/pm/", "web", "nowhere")
    with pytest.raises(ValueError, match="must not be empty"):
        keys.config_key("")


def test_member_address_parses_only_its_pool() -> None:
    assert keys.member_address("/pm/", "web", "/pm/members/web/10.0.0.1:80") is not None
    assert keys.member_address("/pm/", "web", "/pm/members/webx/10.0.0.1:80") is None
    assert keys.member_address("/pm/", "web", "/pm/members/web/garbage") is None


def test_prefix_end_is_the_next_key() -> None:
    def decoded(prefix: str) -> bytes:
        return base64.b64decode(prefix_end(prefix))

    assert decoded("/pm/members/web/") == b"/pm/members/web0"  # '/' + 1 == '0'
    assert decoded("a\xff") == "a\xff".encode()[:-1] + b"\xc0"  # UTF-8 bytes, last one +1
    assert decoded("") == b"\0"


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"error": "etcdserver: request timed out", "code": 14}, 503, EtcdUnavailable),
    ({"error": "etcdserver: leader changed", "code": 2}, 500, EtcdUnavailable),
    ({"error": "etcdserver: requested lease not found", "code": 5}, 404, EtcdError),
    ({"error": "etcdserver: permission denied", "code": 7}, 403, EtcdError),
    ({"error": {"message": "no leader", "code": 14}}, 200, EtcdUnavailable),  # a stream error
])
def test_errors_split_into_retry_and_refusal(body: dict[str, object], status: int,
                                             kind: type[Exception]) -> None:
    with pytest.raises(kind) as raised:
        _raise_for(body, status)
    assert type(raised.value) is kind


def test_an_answer_is_not_an_error() -> None:
    _raise_for({"header": {"revision": "3"}}, 200)


def kv(key: str, value: bytes) -> KeyValue:
    return KeyValue(key, value, mod_revision=1)


def test_member_values() -> None:
    assert member_backend("/pm/", "web", kv("/pm/members/web/10.0.0.1:80", b'{"weight": 5}')) == \
        member_backend("/pm/", "web", kv("/pm/members/web/10.0.0.1:80", b'{"weight": 5, "x": 1}'))
    got = member_backend("/pm/", "web", kv("/pm/members/web/10.0.0.1:80", b'{"weight": 5000}'))
    assert got is not None and got.weight == 1000
    plain = member_backend("/pm/", "web", kv("/pm/members/web/10.0.0.1:80", b"\xff not json"))
    assert plain is not None and plain.weight == 1 and plain.id == "10.0.0.1:80"
    assert member_backend("/pm/", "web", kv("/pm/members/api/10.0.0.1:80", b"")) is None


def test_drain_reasons() -> None:
    assert drain_reason(b'{"reason": "kernel upgrade", "at": 1}') == "kernel upgrade"
    assert drain_reason(b'{"at": 1}') == "drained"
    assert drain_reason(b"by hand ") == "by hand"
    assert drain_reason(b"") == "drained"

"""Pool.find: the backend an operator means, by name or by host:port; a miss lists the names."""

from __future__ import annotations

import pytest

from pointsman.config.addresses import HostPort
from pointsman.config.model import PoolConfig
from pointsman.pool.pool import Pool, UnknownBackend


def pool(*backends: dict[str, object]) -> Pool:
    return Pool(PoolConfig.model_validate({"name": "web", "backends": list(backends)}))


def test_by_name_or_by_address() -> None:
    p = pool({"address": "10.0.0.1:80", "name": "a"}, {"address": "10.0.0.2:80"},
             {"address": "[2001:db8::1]:80", "name": "v6"})
    assert p.find("a").id == "a"
    assert p.find("10.0.0.1:80").id == "a"  # a named backend by its address
    assert p.find("10.0.0.2:80").id == "10.0.0.2:80"
    assert p.find("[2001:db8::1]:80").id == "v6"


def test_a_resolved_host_name_answers_to_the_name_and_the_address() -> None:
    p = pool({"address": "10.0.0.1:80", "name": "a"})
    member = p.members()[0]
    # as the loader leaves a backend written as db.internal:5432 that resolved to 10.0.0.9
    member.config = member.config.model_copy(
        update={"address": HostPort("10.0.0.9", 5432, written="db.internal:5432")})
    assert p.find("db.internal:5432") is member
    assert p.find("10.0.0.9:5432") is member


def test_a_miss_lists_the_pools_backends() -> None:
    p = pool({"address": "10.0.0.1:80", "name": "a"}, {"address": "10.0.0.2:80"})
    for query in ("nope", "10.0.0.3:80", "10.0.0.1:81", "[::1]:80"):
        with pytest.raises(UnknownBackend) as caught:
            p.find(query)
        assert str(caught.value) == f"no backend {query!r} in pool 'web'; its backends: a, 10.0.0.2:80"
        assert caught.value.known == ("a", "10.0.0.2:80")


def test_an_address_shared_by_named_backends_is_ambiguous() -> None:
    p = pool({"address": "10.0.0.1:80", "name": "a"}, {"address": "10.0.0.1:80", "name": "b"})
    with pytest.raises(UnknownBackend) as caught:
        p.find("10.0.0.1:80")
    assert str(caught.value) == "10.0.0.1:80 is the address of several backends of pool 'web': a, b"
    assert p.find("b").id == "b"


def test_member_by_id_lists_the_names_too() -> None:
    p = pool({"address": "10.0.0.1:80", "name": "a"})
    with pytest.raises(UnknownBackend, match=r"its backends: a$"):
        p.drain("10.0.0.1:80")  # internal calls stay exact: ids only

"""Config loading: every kind of mistake is reported with its file, line and field path.

No sockets: `load_text` only parses and validates (host names resolve through getaddrinfo, which
for "localhost" reads /etc/hosts).
"""

from __future__ import annotations

import textwrap

import pytest

from pointsman.config.addresses import HostPort
from pointsman.config.durations import parse_duration
from pointsman.config.loader import ConfigError, load_text
from pointsman.config.model import Config

SOURCE = "pointsman.yaml"


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def errors(text: str) -> list[str]:
    """The issues `load_text` reports, as the operator reads them."""
    with pytest.raises(ConfigError) as caught:
        load_text(yaml_text(text), SOURCE)
    issues = [str(issue) for issue in caught.value.issues]
    assert str(caught.value) == "\n".join(issues)
    return issues


VALID = """
    listeners:
      - name: pg
        bind: "127.0.0.1:6432"
        pool: pg
    pools:
      - name: pg
        backends:
          - address: "127.0.0.1:5432"
          - address: "127.0.0.1:5433"
            name: replica
"""


def test_valid_config_loads_with_defaults() -> None:
    config = load_text(yaml_text(VALID), SOURCE)
    assert isinstance(config, Config)
    (listener,) = config.listeners
    assert listener.bind.single == HostPort("127.0.0.1", 6432)
    assert listener.protocol == "tcp"
    pool = config.pool("pg")
    assert [b.id for b in pool.backends] == ["127.0.0.1:5432", "replica"]
    assert pool.algorithm == "round_robin"
    assert pool.connect_timeout == 2.0
    assert config.shutdown_grace == 30.0


# --- one test per kind of mistake ---------------------------------------------------------------


def test_unknown_key() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
            colour: red
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:5: listeners[0].colour: unknown key"]


def test_wrong_type() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
        pools:
          - name: pg
            retries: [1, 2]
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:7: pools[0].retries: input should be a valid integer, got [1, 2]"]


def test_duplicate_listener_name() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
          - name: pg
            bind: "127.0.0.1:6433"
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:5: listeners[1]: duplicate name 'pg' (first at index 0)"]


def test_duplicate_pool_name() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
          - name: pg
            backends:
              - address: "127.0.0.1:5433"
        """
    ) == [f"{SOURCE}:9: pools[1]: duplicate name 'pg' (first at index 0)"]


def test_duplicate_backend_name_and_address() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
                name: primary
              - address: "127.0.0.1:5433"
                name: primary
              - address: "127.0.0.1:5432"
              - address: "127.0.0.1:5432"
        """
    ) == [
        f"{SOURCE}:10: pools[0].backends[1]: duplicate backend 'primary' (first at index 0)",
        f"{SOURCE}:13: pools[0].backends[3]: duplicate backend '127.0.0.1:5432' (first at index 2)",
    ]


def test_listener_naming_a_missing_pool() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: postgres
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:4: listeners[0].pool: no pool named 'postgres'"]


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1", "expected host:port, got '127.0.0.1'"),
        ("127.0.0.1:", "expected a port between 1 and 65535, got '127.0.0.1:'"),
        ("127.0.0.1:0", "expected a port between 1 and 65535, got '127.0.0.1:0'"),
        ("127.0.0.1:65536", "expected a port between 1 and 65535, got '127.0.0.1:65536'"),
        ("127.0.0.1:http", "expected a port between 1 and 65535, got '127.0.0.1:http'"),
        ("[::zz]:80", "expected an IPv6 address inside [], got '[::zz]:80'"),
        ("[::1]80", "expected [ipv6]:port, got '[::1]80'"),
        ("::1:80", "write IPv6 addresses as [addr]:port, got '::1:80'"),
    ],
    ids=[
        "no-port",
        "empty-port",
        "port-0",
        "port-too-big",
        "named-port",
        "bad-ipv6",
        "ipv6-no-colon",
        "ipv6-no-brackets",
    ],
)
def test_bad_backend_address(address: str, message: str) -> None:
    assert errors(
        f"""
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
              - address: "{address}"
        """
    ) == [f"{SOURCE}:9: pools[0].backends[1].address: {message}"]


def test_bad_listener_address() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: 6432
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:3: listeners[0].bind: expected host:port, host:first-last or a list of them, "
          "got 6432"]


def test_negative_duration() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
        pools:
          - name: pg
            idle_timeout: -5s
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:7: pools[0].idle_timeout: a duration cannot be negative, got '-5s'"]


def test_bad_duration_string() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        shutdown_grace: 10 minutes
        """
    ) == [
        f"{SOURCE}:9: shutdown_grace: expected a duration such as '250ms', '2s', '5m', '1h', "
        "got '10 minutes'"
    ]


def test_invalid_yaml() -> None:
    assert errors(
        """
        listeners:
          - name: pg
           bind: "127.0.0.1:6432"
        """
    ) == [f"{SOURCE}:3: invalid YAML: expected <block end>, but found '<block mapping start>'"]


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"]
)
def test_empty_file(text: str) -> None:
    assert errors(text) == [f"{SOURCE}: the file is empty"]


def test_duplicate_yaml_key() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1:6432"
            pool: pg
            bind: "127.0.0.1:6433"
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:5: listeners[0].bind: duplicate key"]


def test_missing_required_key() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            pool: pg
        pools:
          - name: pg
            backends:
              - address: "127.0.0.1:5432"
        """
    ) == [f"{SOURCE}:2: listeners[0].bind: required key is missing"]


def test_every_error_is_reported_at_once_in_line_order() -> None:
    assert errors(
        """
        listeners:
          - name: pg
            bind: "127.0.0.1"
            pool: nowhere
            max_connections: lots
        pools:
          - name: pg
            algorithm: fastest
            connect_timeout: -1s
            backends:
              - address: "127.0.0.1:70000"
        shutdown_grace: soon
        """
    ) == [
        f"{SOURCE}:3: listeners[0].bind: expected host:port, got '127.0.0.1'",
        f"{SOURCE}:4: listeners[0].pool: no pool named 'nowhere'",
        f"{SOURCE}:5: listeners[0].max_connections: input should be a valid integer, "
        "unable to parse string as an integer, got 'lots'",
        f"{SOURCE}:8: pools[0].algorithm: expected one of 'round_robin', 'weighted_round_robin', "
        "'least_connections', 'power_of_two', 'source_hash' or 'maglev', got 'fastest'",
        f"{SOURCE}:9: pools[0].connect_timeout: a duration cannot be negative, got '-1s'",
        f"{SOURCE}:11: pools[0].backends[0].address: "
        "expected a port between 1 and 65535, got '127.0.0.1:70000'",
        f"{SOURCE}:12: shutdown_grace: expected a duration such as '250ms', '2s', '5m', '1h', "
        "got 'soon'",
    ]


# --- values that are accepted ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (3, 3.0),
        (1.5, 1.5),
        ("0", 0.0),
        (" 10 ms ", 0.01),
    ],
)
def test_durations_parse(written: object, seconds: float) -> None:
    assert parse_duration(written) == pytest.approx(seconds)


def test_durations_in_config() -> None:
    config = load_text(
        yaml_text(
            """
            listeners:
              - name: pg
                bind: "127.0.0.1:6432"
                pool: pg
            pools:
              - name: pg
                connect_timeout: 250ms
                idle_timeout: 5m
                backends:
                  - address: "127.0.0.1:5432"
            shutdown_grace: 1.5
            """
        ),
        SOURCE,
    )
    assert config.pool("pg").connect_timeout == pytest.approx(0.25)
    assert config.pool("pg").idle_timeout == 300.0
    assert config.shutdown_grace == 1.5


@pytest.mark.parametrize("value", [True, None, [1], "1d", "ms"])
def test_durations_refuse_non_durations(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_hostname_backend_resolves_and_keeps_its_written_id() -> None:
    config = load_text(
        yaml_text(
            """
            listeners:
              - name: web
                bind: "[::1]:8080"
                pool: web
            pools:
              - name: web
                backends:
                  - address: "localhost:80"
            """
        ),
        SOURCE,
    )
    (backend,) = config.pool("web").backends
    assert backend.address.host in ("127.0.0.1", "::1")
    assert backend.address.port == 80
    assert backend.address.is_ip
    assert str(backend.address) == "localhost:80"
    assert backend.id == "localhost:80"
    assert config.listeners[0].bind.single == HostPort("::1", 8080)


def test_unresolvable_hostname_is_a_config_error() -> None:
    assert errors(
        """
        listeners:
          - name: web
            bind: "127.0.0.1:8080"
            pool: web
        pools:
          - name: web
            backends:
              - address: "no-such-host.invalid:80"
        """
    )[0].startswith(
        f"{SOURCE}:8: pools[0].backends[0].address: cannot resolve 'no-such-host.invalid'"
    )


def test_config_algorithms_are_the_balancing_algorithms() -> None:
    from typing import get_args

    from pointsman.balance import ALGORITHMS
    from pointsman.config.model import Algorithm

    assert get_args(Algorithm) == ALGORITHMS

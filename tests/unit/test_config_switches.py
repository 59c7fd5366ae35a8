"""`off` works unquoted: YAML 1.1 reads `off`, `on`, `yes`, `no`, `true`, `false` as booleans, so
`zero_copy: off` arrives as False. Where the reference writes `off` the boolean is accepted; where
`on`/`true` has one obvious meaning it is accepted too; elsewhere a boolean is a clear error.
Also the keys issue 14 adds: `preamble.max_pending` and `half_close_timeout`."""

from __future__ import annotations

import textwrap

import pytest

from pointsman.config.loader import ConfigError, load_text

BASE = """
listeners:
  - name: lb
    bind: "127.0.0.1:7000"
    pool: p
    {listener}
pools:
  - name: p
    backends: [{{address: "127.0.0.1:7001"}}]
    {pool}
"""


def load(listener: str = "", pool: str = "") -> tuple[object, object]:
    config = load_text(textwrap.dedent(BASE.format(listener=listener, pool=pool)), "t.yaml")
    return config.listeners[0], config.pools[0]


@pytest.mark.parametrize("word", ["off", "Off", "OFF", "false", "no", "'off'"])
def test_zero_copy_off_unquoted(word: str) -> None:
    _, pool = load(pool=f"zero_copy: {word}")
    assert pool.zero_copy == "off"  # type: ignore[attr-defined]


@pytest.mark.parametrize("word", ["on", "true", "yes", "auto"])
def test_zero_copy_on_means_auto(word: str) -> None:
    _, pool = load(pool=f"zero_copy: {word}")
    assert pool.zero_copy == "auto"  # type: ignore[attr-defined]


@pytest.mark.parametrize("word", ["off", "false", "no"])
def test_proxy_protocol_accept_and_send_off_unquoted(word: str) -> None:
    listener, pool = load(listener=f"proxy_protocol: {{accept: {word}}}",
                          pool=f"proxy_protocol: {{send: {word}}}")
    assert listener.proxy_protocol.accept == "off"  # type: ignore[attr-defined]
    assert pool.proxy_protocol.send == "off"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("where", "text"), [
    ("listener", "proxy_protocol: {accept: on}"),
    ("pool", "proxy_protocol: {send: on}"),
])
def test_on_where_it_is_ambiguous_is_a_clear_error(where: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(**{where: text})
    message = str(caught.value)
    assert "t.yaml:" in message and "proxy_protocol" in message
    assert "'off'" in message  # names the values that are allowed


def test_preamble_max_pending_and_half_close_timeout() -> None:
    listener, pool = load(listener="preamble: {max_pending: 7}", pool="half_close_timeout: 2s")
    assert listener.preamble.max_pending == 7  # type: ignore[attr-defined]
    assert pool.half_close_timeout == 2.0  # type: ignore[attr-defined]


def test_defaults() -> None:
    listener, pool = load(listener="max_connections: 300")
    assert listener.preamble.max_pending is None  # type: ignore[attr-defined]
    assert listener.preamble_max_pending == 30  # type: ignore[attr-defined]
    assert pool.half_close_timeout == 30.0  # type: ignore[attr-defined]
    small, _ = load(listener="max_connections: 5")
    assert small.preamble_max_pending == 1  # type: ignore[attr-defined]


def test_max_pending_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_pending"):
        load(listener="preamble: {max_pending: 0}")

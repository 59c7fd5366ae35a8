""""Did you mean" for unknown keys: the closest allowed key of the model at that place."""

from __future__ import annotations

import pytest

from pointsman.config.loader import ConfigError, load_text
from pointsman.config.model import (
    AdminConfig,
    BgpPeerConfig,
    Config,
    HealthCheckConfig,
    HttpCheckConfig,
    ListenerConfig,
    UdpConfig,
)
from pointsman.config.suggest import did_you_mean, model_at


@pytest.mark.parametrize(("loc", "model"), [
    ((), Config),
    (("listeners", 0), ListenerConfig),
    (("listeners", 3, "udp"), UdpConfig),
    (("pools", 0, "health_check"), HealthCheckConfig),  # HealthCheckConfig | None
    (("pools", 1, "health_check", "http"), HttpCheckConfig),
    (("admin",), AdminConfig),
    (("bgp", "peers", 2), BgpPeerConfig),
    (("listeners", 0, "bind"), None),  # a scalar, not a mapping
    (("nowhere",), None),
    (("listeners", 0, "udp", "session_timeout", "x"), None),
])
def test_model_at_follows_optionals_lists_and_nesting(loc: tuple[str | int, ...],
                                                      model: type | None) -> None:
    assert model_at(loc) is model


@pytest.mark.parametrize(("loc", "hint"), [
    (("listener",), " (did you mean 'listeners'?)"),
    (("listeners", 0, "protocl"), " (did you mean 'protocol'?)"),
    (("pools", 0, "backends", 1, "wieght"), " (did you mean 'weight'?)"),
    (("pools", 0, "health_check", "intervl"), " (did you mean 'interval'?)"),
    (("admin", "tokenfile"), " (did you mean 'token_file'?)"),
    (("bgp", "peers", 0, "hold_tme"), " (did you mean 'hold_time'?)"),
    (("listeners", 0, "colour"), ""),  # nothing close: no guess
    (("nowhere", "thing"), ""),
    ((), ""),
    (("listeners", 0), ""),
])
def test_did_you_mean(loc: tuple[str | int, ...], hint: str) -> None:
    assert did_you_mean(loc) == hint


def test_the_loader_adds_the_hint_to_unknown_key_errors() -> None:
    text = ("listeners:\n  - {name: lb, bind: '127.0.0.1:1', pool: p, protocl: tcp}\n"
            "pools:\n  - name: p\n    backends: [{address: '127.0.0.1:2'}]\n"
            "    helth_check: {type: tcp}\n")
    with pytest.raises(ConfigError) as caught:
        load_text(text, "pm.yaml")
    assert [str(issue) for issue in caught.value.issues] == [
        "pm.yaml:2: listeners[0].protocl: unknown key (did you mean 'protocol'?)",
        "pm.yaml:6: pools[0].helth_check: unknown key (did you mean 'health_check'?)",
    ]

"""The `kernel:` keys of a listener, as the config loader reports them."""

from __future__ import annotations

import textwrap

import pytest

from pointsman.config.loader import ConfigError, load_text
from tests.unit.config_support import SOURCE, errors

CONFIG = """
listeners:
  - name: web
    bind: 10.0.0.100:80
    pool: web
    dataplane: kernel
    kernel:
      nat: {nat}
      snat: {snat}
pools:
  - name: web
    algorithm: maglev
    backends:
      - {{address: 10.0.1.11:8080}}
"""


def test_nat_defaults_to_conntrack() -> None:
    text = textwrap.dedent("""
        listeners:
          - {name: web, bind: 10.0.0.100:80, pool: web, dataplane: kernel}
        pools:
          - {name: web, algorithm: maglev, backends: [{address: 10.0.1.11:8080}]}
        """)
    assert load_text(text, "k.yaml").listeners[0].kernel.nat == "conntrack"


def test_stateless_with_snat_none_loads() -> None:
    kernel = load_text(CONFIG.format(nat="stateless", snat="none"), "k.yaml").listeners[0].kernel
    assert (kernel.nat, kernel.snat) == ("stateless", "none")


def test_stateless_with_masquerade_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as info:
        load_text(CONFIG.format(nat="stateless", snat="masquerade"), "k.yaml")
    message = str(info.value)
    assert "k.yaml:7: listeners[0].kernel: nat: stateless needs snat: none" in message
    assert "route their replies through the load balancer" in message


def test_unknown_nat_mode() -> None:
    with pytest.raises(ConfigError, match=r"kernel\.nat"):
        load_text(CONFIG.format(nat="ipvs", snat="none"), "k.yaml")


def test_two_stateless_listeners_cannot_share_a_backend() -> None:
    found = errors("""
        listeners:
          - {name: a, bind: "10.0.0.100:80", pool: p, dataplane: kernel, kernel: {nat: stateless, snat: none}}
          - {name: b, bind: "10.0.0.101:80", pool: q, dataplane: kernel, kernel: {nat: stateless, snat: none}}
          - {name: c, bind: "10.0.0.102:80", pool: q, dataplane: kernel}
        pools:
          - {name: p, algorithm: maglev, backends: [{address: "10.0.1.1:80"}, {address: "10.0.1.2:80"}]}
          - {name: q, algorithm: maglev, backends: [{address: "10.0.1.2:80"}]}
    """)
    assert found == [
        f"{SOURCE}:3: listeners[1].pool: backend 10.0.1.2:80 is also a backend of stateless "
        "listener 'a': stateless listeners know replies by their source address and port, so "
        "they cannot share a backend (use kernel.nat: conntrack for one)"]


def test_a_kernel_listener_named_like_another_plus_underscore_is_refused() -> None:
    found = errors("""
        listeners:
          - {name: web, bind: "10.0.0.100:80", pool: p, dataplane: kernel}
          - {name: web_b0, bind: "10.0.0.101:80", pool: p, dataplane: kernel}
          - {name: web2, bind: "10.0.0.102:80", pool: p, dataplane: kernel}
          - {name: web_user, bind: "127.0.0.1:8080", pool: p}
        pools:
          - {name: p, algorithm: maglev, backends: [{address: "10.0.1.1:80"}]}
    """)
    assert found == [
        f"{SOURCE}:3: listeners[1].name: kernel listener 'web_b0' starts with kernel listener "
        "'web' and '_': their nftables objects could share names; rename one"]

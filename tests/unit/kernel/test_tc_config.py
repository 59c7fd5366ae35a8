"""`kernel.datapath: tc` and `kernel.interfaces`: what the config loader and `spec_for` accept."""

from __future__ import annotations

import textwrap

import pytest

from pointsman.config.loader import ConfigError, load_text
from pointsman.kernel.plan import KernelConfigError, spec_for

from .helpers import listener, pool

CONFIG = """
listeners:
  - name: web
    bind: 10.0.0.100:80
    pool: web
    dataplane: kernel
    kernel:
{kernel}
pools:
  - name: web
    algorithm: maglev
    backends:
      - {{address: 10.0.1.11:8080}}
"""


def load(kernel: str) -> object:
    return load_text(CONFIG.format(kernel=textwrap.indent(textwrap.dedent(kernel), " " * 6)), "k.yaml")


def test_datapath_defaults_to_nftables_without_interfaces() -> None:
    kernel = load("nat: conntrack").listeners[0].kernel  # type: ignore[attr-defined]
    assert (kernel.datapath, kernel.interfaces) == ("nftables", [])


def test_tc_with_stateless_and_interfaces_loads() -> None:
    kernel = load("""
        nat: stateless
        snat: none
        datapath: tc
        interfaces: [eth0, eth1.100]
        """).listeners[0].kernel  # type: ignore[attr-defined]
    assert (kernel.datapath, kernel.interfaces) == ("tc", ["eth0", "eth1.100"])


@pytest.mark.parametrize(("kernel", "message"), [
    ("datapath: tc\ninterfaces: [eth0]", "datapath: tc needs nat: stateless"),
    ("nat: stateless\nsnat: none\ndatapath: tc", "datapath: tc needs interfaces"),
    ("nat: stateless\nsnat: none\ninterfaces: [eth0]", "interfaces is for datapath: tc"),
])
def test_refused_with_the_reason_and_the_line(kernel: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(kernel)
    assert f"k.yaml:7: listeners[0].kernel: {message}" in str(info.value)


@pytest.mark.parametrize("name", ["", "a" * 16, "eth/0", "eth 0", "eth0:1"])
def test_interface_names_linux_refuses_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"kernel\.interfaces"):
        load(f"nat: stateless\nsnat: none\ndatapath: tc\ninterfaces: ['{name}']")


def test_unknown_datapath() -> None:
    with pytest.raises(ConfigError, match=r"kernel\.datapath"):
        load("nat: stateless\nsnat: none\ndatapath: xdp\ninterfaces: [eth0]")


TC = {"nat": "stateless", "snat": "none", "datapath": "tc", "interfaces": ["eth0"]}


def test_spec_for_a_tc_listener() -> None:
    spec = spec_for(listener(kernel=TC), pool(hash_key="source_ip_port"))
    assert (spec.stateless, spec.vip, spec.port, spec.hash_key) == (True, "10.99.100.1", 80, "source_ip_port")


def test_tc_refuses_ipv6_and_allow_deny_lists_at_once() -> None:
    backends = [{"address": "[fd00::11]:8080"}]
    with pytest.raises(KernelConfigError) as info:
        spec_for(listener(bind="[fd00::1]:80", kernel=TC, allow=["192.0.2.0/24"]), pool(backends=backends))
    assert info.value.issues == ("datapath: tc serves IPv4 VIPs only (use datapath: nftables for IPv6)",
                                 "datapath: tc has no allow/deny lists (use datapath: nftables for them)")

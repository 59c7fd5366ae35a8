"""Node files (config/node.py): what is the node's own, checked with its lines; node-local keys
and listener addresses over the cluster config; a node file is not a cluster config."""

from __future__ import annotations

from typing import Any

import pytest

from pointsman.config.loader import ConfigError, load_text
from pointsman.config.node import LOCAL_KEYS, is_node_data, load_node_text, overlay_local

NODE = """\
node:
  name: lb-a
  binds: {lb: "127.0.0.1:18080"}
config_source:
  etcd:
    endpoints: ["http://127.0.0.1:2379", "https://10.0.0.2:2379"]
    prefix: /pointsman/clusters/prod/
    token_file: /etc/pointsman/etcd.token
admin: {bind: "127.0.0.1:9900"}
workers: 2
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_node_text(text, "node.yaml")
    return [str(issue) for issue in raised.value.issues]


def test_a_node_file() -> None:
    node = load_node_text(NODE, "node.yaml")
    assert node.name == "lb-a" and node.lease_ttl == 10.0
    assert node.etcd.endpoints[1] == "https://10.0.0.2:2379"
    assert node.local == {"admin": {"bind": "127.0.0.1:9900"}, "workers": 2}
    assert node.binds == {"lb": "127.0.0.1:18080"}


def test_local_keys_are_every_config_key_but_listeners_and_pools() -> None:
    assert {"admin", "workers", "shutdown_grace", "flow_log", "shedding", "bgp"} <= set(LOCAL_KEYS)
    assert "listeners" not in LOCAL_KEYS and "pools" not in LOCAL_KEYS


def test_every_problem_with_its_line() -> None:
    found = errors("node: {name: 'lb a', lease_ttl: 1s}\n"
                   "config_source: {etcd: {endpoints: [ftp://x], prefix: /p/, key_file: k}}\n"
                   "admin: {bind: '0.0.0.0:9900'}\n"
                   "workers: 0\n"
                   "pools: []\n"
                   "colour: blue\n")
    assert found == [
        "node.yaml:1: node.lease_ttl: input should be greater than or equal to 2, got '1s'",
        "node.yaml:1: node.name: string should match pattern '^[A-Za-z0-9_.-]+$', got 'lb a'",
        "node.yaml:2: config_source.etcd.endpoints: expected http:// or https:// URLs, got 'ftp://x'",
        "node.yaml:4: workers: input should be greater than or equal to 1, got 0",
        "node.yaml:5: pools: comes from the cluster config in etcd, not from a node file",
        "node.yaml:6: colour: unknown key",
    ]


def test_local_rules_that_span_keys_are_checked_too() -> None:
    assert errors(NODE.replace("127.0.0.1:9900", "0.0.0.0:9900")) == [
        "node.yaml:9: admin.token_file: required when admin.bind is not a loopback address"]


def test_a_client_key_needs_its_certificate() -> None:
    assert errors(NODE.replace("token_file:", "key_file:")) == [
        "node.yaml:5: config_source.etcd: key_file needs cert_file"]


def test_missing_sections() -> None:
    assert errors("node: {name: a}\n") == ["node.yaml:1: config_source: required key is missing"]


def test_overlay_replaces_whole_keys_and_binds_listeners() -> None:
    cluster: dict[str, Any] = {"listeners": [{"name": "lb", "bind": "10.0.0.1:80", "pool": "p"},
                             {"name": "dns", "bind": "10.0.0.1:53", "pool": "p"}],
               "admin": {"bind": "127.0.0.1:1", "token_file": "/t"}, "workers": 4}
    data = overlay_local(cluster, {"admin": {"bind": "127.0.0.1:9900"}}, {"lb": "127.0.0.1:8080",
                                                                         "gone": "127.0.0.1:1"})
    assert data["admin"] == {"bind": "127.0.0.1:9900"} and data["workers"] == 4
    assert [item["bind"] for item in data["listeners"]] == ["127.0.0.1:8080", "10.0.0.1:53"]
    assert cluster["listeners"][0]["bind"] == "10.0.0.1:80"  # the input is not changed


def test_a_node_file_is_not_a_cluster_config() -> None:
    assert is_node_data({"node": {}}) and not is_node_data({"listeners": []})
    # A plain config may name its node; with config_source it is a node file whatever else it has.
    assert not is_node_data({"node": {"name": "lb-a"}, "listeners": [], "pools": []})
    assert is_node_data({"config_source": {}, "listeners": []})
    with pytest.raises(ConfigError) as raised:
        load_text(NODE, "node.yaml")
    assert [str(i) for i in raised.value.issues] == [
        "node.yaml:4: config_source: this is a node file (its cluster config is in etcd): "
        "`pointsman run` and `pointsman check` take it"]

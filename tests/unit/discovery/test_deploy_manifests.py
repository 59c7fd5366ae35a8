"""deploy/kubernetes/ parses, and the pointsman configs it carries pass `pointsman check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.config.loader import ConfigError, load_text
from pointsman.config.node import load_node_text

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes"


def documents() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_the_manifests_hold_what_the_docs_say() -> None:
    docs = documents()
    assert {"Namespace/pointsman", "ServiceAccount/pointsman", "ClusterRole/pointsman-endpointslices",
            "ClusterRoleBinding/pointsman-endpointslices", "ConfigMap/pointsman-config",
            "DaemonSet/pointsman"} <= set(docs)
    rules = docs["ClusterRole/pointsman-endpointslices"]["rules"]
    assert rules == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                      "verbs": ["get", "list", "watch"]}]
    pod = docs["DaemonSet/pointsman"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pointsman" and pod["hostNetwork"] is True
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_configs_in_the_configmap_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-7")
    data = documents()["ConfigMap/pointsman-config"]["data"]
    config = load_text(data["pointsman.yaml"], "configmap:pointsman.yaml")
    discovery = config.pool("web").discovery
    assert discovery is not None and discovery.kubernetes is not None
    assert discovery.kubernetes.service == "web"
    grace = documents()["DaemonSet/pointsman"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.shutdown_grace < grace
    node = load_node_text(data["node.yaml"], "configmap:node.yaml")
    assert node.name == "node-7" and len(node.etcd.endpoints) == 3


def test_the_node_name_comes_from_the_pod_environment_without_sed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DEPLOY / "daemonset.yaml").read_text()
    assert "sed " not in text and "sh -c" not in text and '"sh"' not in text
    env = documents()["DaemonSet/pointsman"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in env
    monkeypatch.delenv("NODE_NAME", raising=False)
    data = documents()["ConfigMap/pointsman-config"]["data"]
    with pytest.raises(ConfigError, match="NODE_NAME is not set"):
        load_node_text(data["node.yaml"], "configmap:node.yaml")

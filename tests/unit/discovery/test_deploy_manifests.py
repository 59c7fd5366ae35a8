"""deploy/kubernetes/ parses, and the pointsman configs it carries pass `pointsman check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pointsman.config.loader import load_text
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


def test_the_configs_in_the_configmap_are_valid() -> None:
    data = documents()["ConfigMap/pointsman-config"]["data"]
    config = load_text(data["pointsman.yaml"], "configmap:pointsman.yaml")
    discovery = config.pool("web").discovery
    assert discovery is not None and discovery.kubernetes is not None
    assert discovery.kubernetes.service == "web"
    grace = documents()["DaemonSet/pointsman"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.shutdown_grace < grace
    node = load_node_text(data["node.yaml"], "configmap:node.yaml")
    assert node.name == "NODE_NAME" and len(node.etcd.endpoints) == 3

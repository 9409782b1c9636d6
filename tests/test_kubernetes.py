"""The Kubernetes manifests (compose/kubernetes) are valid for the API versions they name,
checked offline against Kubernetes' own schemas (kubernetes-validate, strict), and keep the
promises docs/production.md makes of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

MANIFESTS = sorted((ROOT / "compose" / "kubernetes").glob("*.yaml"))
VERSIONS = ("1.29.0", "1.33.0")  # an older and a newer cluster


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    [found] = [
        d
        for d in documents()
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and d["metadata"].get("namespace") == namespace
    ]
    return found


def test_every_manifest_validates_strictly_offline() -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"  # the venv's
    for version in VERSIONS:
        proc = subprocess.run(
            [str(tool), "--strict", "--quiet", "-k", version, *map(str, MANIFESTS)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runners_are_denied_every_network_but_what_is_opened() -> None:
    for namespace in ("airlock", "airlock-nodes"):
        deny = find("NetworkPolicy", "deny-all", namespace)["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    egress = find("NetworkPolicy", "node-egress", "airlock-nodes")["spec"]["egress"]
    public = [rule["to"][0]["ipBlock"] for rule in egress if "ipBlock" in rule["to"][0]]
    assert public and "169.254.0.0/16" in public[0]["except"]  # no cloud metadata
    assert "10.0.0.0/8" in public[0]["except"]  # nor the cluster's own addresses


def test_gvisor_runtime_class_and_least_privilege_pods() -> None:
    assert find("RuntimeClass", "gvisor")["handler"] == "runsc"
    api = find("Deployment", "api", "airlock")["spec"]["template"]["spec"]
    assert api["runtimeClassName"] == "gvisor"
    assert api["securityContext"]["runAsNonRoot"] is True
    [container] = api["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    node = find("DaemonSet", "node", "airlock-nodes")["spec"]["template"]["spec"]
    [engine] = node["containers"]
    assert "privileged" not in engine["securityContext"]
    assert engine["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert node["terminationGracePeriodSeconds"] > 3 * 10  # the task stop grace, thrice
    # Secrets only as files (Secret volumes): no credential among the settings.
    for doc in documents():
        if doc["kind"] == "ConfigMap":
            for key, value in doc["data"].items():
                assert "@" not in value and "PASSWORD" not in key and "TOKEN" not in key, key

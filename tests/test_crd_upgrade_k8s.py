"""Helm installs a chart's CRDs once and never updates them; ``loraplane install``/``upgrade`` bring
the ``LoraAdapter`` CRD to the chart's, so a release upgraded from an older chart gets the status
subresource its vLLM pods report in and ``spec.canary`` (real API server, kwok's control plane)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

CHART = ROOT / "charts" / "loraplane"
CRD = CHART / "crds" / "loraadapters.loraplane.dev.yaml"
NAME = "loraadapters.loraplane.dev"


def _older(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD as an older chart had it: no status subresource, no spec.canary."""
    old = copy.deepcopy(crd)
    for version in old["spec"]["versions"]:
        version.pop("subresources", None)
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"].pop("canary", None)
    return old


def _live(cluster: Cluster) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(cluster.kubectl("get", "crd", NAME, "-o", "json").stdout)
    return found


def test_install_and_upgrade_bring_an_older_crd_to_the_charts(k8s_cluster: Cluster, tmp_path: Path) -> None:
    crd = yaml.safe_load(CRD.read_text())
    ns = f"crd-{uuid.uuid4().hex[:6]}"
    env = {**k8s_cluster.env(), "LORAPLANE_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "COLUMNS": "300"}
    cli = [sys.executable, "-m", "loraplane.platform.cli", "-n", ns]
    sets = ["--set", "serving.enabled=false", "--set", "gpu.enabled=false", "--set", "trainer.enabled=false"]
    try:
        # replaced whole (whoever applied it before), or created on a cluster without it
        older = json.dumps(_older(crd))
        if k8s_cluster.kubectl("replace", "-f", "-", stdin=older, check=False).returncode != 0:
            k8s_cluster.kubectl("create", "-f", "-", stdin=older)
        k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{NAME}")
        (version,) = _live(k8s_cluster)["spec"]["versions"]
        assert "subresources" not in version, "the older CRD is in place"

        done = subprocess.run([*cli, "install", *sets], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert f"updated the CustomResourceDefinition {NAME} to the chart's" in done.stderr
        (version,) = _live(k8s_cluster)["spec"]["versions"]
        assert version["subresources"] == {"status": {}}
        assert "canary" in version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]

        again = subprocess.run([*cli, "upgrade", *sets], capture_output=True, text=True, env=env)
        assert again.returncode == 0, again.stderr
        assert "updated the CustomResourceDefinition" not in again.stderr, "nothing to change"
    finally:
        k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        k8s_cluster.helm("uninstall", "platform", "-n", ns, check=False)

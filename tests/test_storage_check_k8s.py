"""The shared volume's claim as the user sees it after ``loraplane install``: bound, waiting for its
first pod, or stuck with the reason from its events and the values to change (issue 20, storage).

Real API server and controller-manager (kwok's control plane: its PersistentVolume controller binds
claims and writes the events a cloud cluster writes); no provisioner runs, so a class's claim stays
Pending as it does on a cluster whose class is wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, Cluster

from loraplane.common.settings import Settings
from loraplane.platform.storage_check import check_claim, wait_for_claim

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]


def _claim(cluster: Cluster, ns: str, name: str, storage_class: str | None) -> None:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": ns}}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({**pvc, "spec": spec}))


def _settings(cluster: Cluster, ns: str, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", registry="kubernetes", namespace=ns, kubeconfig=cluster.kubeconfig
    )


def test_a_claim_that_cannot_bind_says_why_and_what_to_set(k8s_cluster: Cluster, tmp_path: Path) -> None:
    ns = f"st-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", ns)
    settings = _settings(k8s_cluster, ns, tmp_path)
    late = f"late-{ns}"  # a class that binds when the first pod is scheduled: not a problem
    k8s_cluster.kubectl(
        "apply", "-f", "-",
        stdin=json.dumps({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": late},
            "provisioner": "example.com/none", "volumeBindingMode": "WaitForFirstConsumer",
        }),
    )  # fmt: skip
    _claim(k8s_cluster, ns, "unknown-class", "no-such-class")
    _claim(k8s_cluster, ns, "no-class", "")
    _claim(k8s_cluster, ns, "first-consumer", late)
    k8s_cluster.volume_for(ns, "bound", create_claim=True)

    reports = {}

    def settled() -> bool:
        for name in ("unknown-class", "no-class", "first-consumer", "bound"):
            reports[name] = check_claim(settings, name)
        return (
            all(reports[n].problem for n in ("unknown-class", "no-class"))
            and any("WaitForFirstConsumer" in e for e in reports["first-consumer"].events)
            and reports["bound"].phase == "Bound"
        )

    try:
        k8s_cluster.wait_for(settled, timeout=90, what="the PersistentVolume controller's events")
    except AssertionError:
        raise AssertionError(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1)) from None
    unknown = reports["unknown-class"].problem or ""
    assert "'unknown-class' (class no-such-class, ReadWriteMany) is Pending: ProvisioningFailed" in unknown
    assert '"no-such-class" not found' in unknown and "global.storage.storageClass" in unknown
    no_class = reports["no-class"].problem or ""
    assert (
        "FailedBinding: no persistent volumes available for this claim and no storage class is set"
        in no_class
    )
    assert reports["first-consumer"].phase == "Pending" and reports["first-consumer"].problem is None
    assert reports["bound"].problem is None
    missing = check_claim(settings, "never-made")
    assert missing.phase == "Missing" and "global.storage.existingClaim" in (missing.problem or "")


def test_install_warns_about_a_claim_that_will_never_bind_and_status_shows_it(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    ns = k8s_cluster.restricted_namespace(f"st-{uuid.uuid4().hex[:6]}")
    env = {**k8s_cluster.env(), "LORAPLANE_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "COLUMNS": "300"}
    cli = [sys.executable, "-m", "loraplane.platform.cli", "-n", ns]
    sets = ["--set", "global.storage.storageClass=no-such-class", "--set", "gpu.enabled=false"]
    sets += ["--set", "trainer.enabled=false", "--set", "gateway.enabled=false"]
    chart = str(ROOT / "charts" / "loraplane")
    done = subprocess.run([*cli, "install", "--chart", chart, *sets], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr  # the release is installed; the claim is the user's to fix
    assert "warning: the shared volume's claim 'platform-loraplane-data'" in done.stderr, done.stderr
    assert "ProvisioningFailed" in done.stderr and "global.storage.storageClass" in done.stderr
    status = subprocess.run([*cli, "status", "-o", "json"], capture_output=True, text=True, env=env)
    storage = json.loads(status.stdout)["storage"]
    assert storage["phase"] == "Pending" and "ProvisioningFailed" in storage["problem"]
    report = wait_for_claim(_settings(k8s_cluster, ns, tmp_path), "platform", timeout=1)
    assert report is not None and report.claim == "platform-loraplane-data"

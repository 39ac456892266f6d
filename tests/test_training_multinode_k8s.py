"""A multi-node run on a real control plane (kube-apiserver + kube-controller-manager; kwok nodes):
a lost pod is replaced at its index while the Job stays active, and `train status` says what happened.

kwok runs no containers: a pod annotated ``loraplane.dev/test-exit-code: N`` fails with exit code N
(tools/k8s/kwok-stages.yaml), which is how a pod on a lost node (137: SIGKILL) or a pod whose torchrun
agent lost pod 0, the rendezvous host (76), looks to the Job controller. What the pods' processes do
then (the gang restart itself, the resume) is tests/test_gang_restart.py, for real on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import Cluster
from test_training_k8s import CHART, RELEASE, TOLERATE_GPU, _cli, _config, _status, _submit

from loraplane.trainer.exit_codes import PEER_LOST

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

KEEP_RUNNING = {"loraplane.dev/test-keep-running": "true"}


def _install(cluster: Cluster, ns: str, work: Path) -> None:
    values = {
        "serving": {"enabled": False},
        "global": {"storage": {"create": False, "existingClaim": "models"}},
        "trainer": {
            "nodes": 2,
            "gpusPerNode": 1,
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": 1}},
            "tolerations": TOLERATE_GPU,
            "podAnnotations": KEEP_RUNNING,
        },
    }
    path = work / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    cluster.helm("upgrade", "--install", RELEASE, str(CHART), "-n", ns, "-f", str(path), "--wait")


def _running(status: dict[str, Any]) -> dict[int, str]:
    return {p["index"]: p["name"] for p in status["pods"] if p["phase"] == "Running"}


def _fail(cluster: Cluster, ns: str, pod: str, code: int) -> None:
    cluster.kubectl("-n", ns, "annotate", "pod", pod, f"loraplane.dev/test-exit-code={code}")


def test_a_lost_pod_of_a_multi_node_run_is_replaced_at_its_index_and_the_job_stays_active(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    ns = k8s_cluster.restricted_namespace("lp-gang")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    _install(k8s_cluster, ns, tmp_path)
    job = _submit(k8s_cluster, ns, _config(tmp_path))

    def status() -> dict[str, Any]:
        return _status(k8s_cluster, ns, job)

    k8s_cluster.wait_for(lambda: set(_running(status())) == {0, 1}, what="both pods of the run")
    first = _running(status())
    spec = json.loads(k8s_cluster.kubectl("-n", ns, "get", "job", job, "-o", "json").stdout)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["podReplacementPolicy"]) == (
        "Indexed",
        2,
        "Failed",
    )
    assert spec["template"]["spec"]["containers"][0]["command"][:3] == [
        "python",
        "-m",
        "loraplane.trainer.elastic",
    ]

    # Node rank 1's node is lost: its pod fails (SIGKILL). The Job controller starts index 1 again
    # (same hostname: the run's rendezvous takes it back); pod 0 keeps running, the Job stays active.
    _fail(k8s_cluster, ns, first[1], 137)
    k8s_cluster.wait_for(
        lambda: _running(status()).get(1) not in (None, first[1]), timeout=60, what="index 1 replaced"
    )
    now = status()
    assert now["state"] == "Running" and now["reason"] is None, now
    assert (now["kind"], now["nodes"], now["active"], now["failed"]) == ("Job", 2, 2, 1), now
    assert _running(now)[0] == first[0], "the survivor's pod is not replaced: its agent restarts its workers"
    lost = next(p for p in now["pods"] if p["name"] == first[1])
    assert (lost["index"], lost["exit_code"], lost["meaning"]) == (
        1,
        137,
        "killed (SIGKILL: out of memory, or the grace period ran out)",
    )
    shown = _cli(k8s_cluster, ns, "train", "status", job, "--no-register")
    assert shown.returncode == 0 and f"{job} (support-bot): Running" in shown.stdout, shown.stdout
    assert "137" in shown.stdout

    # Pod 0 is lost (the rendezvous host): the other pod's agent exits 76, which is not counted.
    second = _running(now)
    _fail(k8s_cluster, ns, second[0], 137)
    _fail(k8s_cluster, ns, second[1], PEER_LOST)
    k8s_cluster.wait_for(
        lambda: all(_running(status()).get(i) not in (None, second[i]) for i in (0, 1)),
        timeout=60,
        what="both pods replaced",
    )
    now = status()
    assert now["state"] == "Running" and now["failed"] == 2, "exit 76 is ignored by podFailurePolicy"
    peer = next(p for p in now["pods"] if p["name"] == second[1])
    assert peer["exit_code"] == PEER_LOST and "whole gang restarts" in peer["meaning"]

    # The gang finishes: every index succeeds, the Job completes.
    for pod in _running(now).values():
        k8s_cluster.kubectl("-n", ns, "annotate", "pod", pod, "loraplane.dev/test-keep-running-")
    k8s_cluster.wait_for(lambda: status()["state"] == "Succeeded", what="the run to complete")
    assert status()["succeeded"] == 2
    assert _cli(k8s_cluster, ns, "train", "cancel", job).returncode == 0

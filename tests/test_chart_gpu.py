"""The chart's GPU prerequisites, rendered by the real helm: each `gpu.mode` (none, device-plugin,
operator), the GPU operator dependency with our values passed through NVIDIA's own templates, the
checks that keep the mode and the dependency's condition in agreement, the kubeVersion constraint, and
the initial run's Job name across upgrades. The preflight against a real API server, the release notes'
commands and upgrades on it: tests/test_chart_gpu_k8s.py."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from kube_client import kube_version_under_test
from test_chart import CHART, _fails, _helm, _profile, _render, _vllm

DEVICE_PLUGIN = "DaemonSet/platform-loraplane-nvidia-device-plugin"
DCGM = "DaemonSet/platform-loraplane-dcgm-exporter"
OPERATOR = ("gpu.mode=operator", "gpu-operator.enabled=true")


def _gpu_terms(pod: dict[str, Any]) -> list[dict[str, Any]]:
    terms: list[dict[str, Any]] = pod["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    return terms


def test_mode_none_is_the_default_and_installs_nothing_cluster_wide() -> None:
    objs = _render()
    cluster_wide = ("RuntimeClass/", "Namespace/", "DaemonSet/", "ClusterPolicy/")
    assert not [k for k in objs if k.startswith(cluster_wide)], (
        "mode none touches nothing outside the release"
    )
    assert not [k for k in objs if "gpu-operator" in k], "the operator dependency is off by default"


def test_device_plugin_mode_runs_nvidias_plugin_and_dcgm_on_gpu_nodes_only() -> None:
    objs = _render(files=(_profile("gpu-device-plugin"),))
    assert objs["RuntimeClass/nvidia"]["handler"] == "nvidia"
    assert _vllm(objs)[1]["runtimeClassName"] == "nvidia"
    for key in (DEVICE_PLUGIN, DCGM):
        ds = objs[key]
        assert ds["metadata"]["namespace"] == "kube-system", (
            "hostPath pods stay out of the restricted namespace"
        )
        pod = ds["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "nvidia", f"{key}: the runtime that exposes the driver"
        keys = {e["key"] for term in _gpu_terms(pod) for e in term["matchExpressions"]}
        # NFD, GFD and the clouds' GPU node labels: any one of them is a GPU node
        assert {
            "feature.node.kubernetes.io/pci-10de.present",
            "nvidia.com/gpu.present",
            "cloud.google.com/gke-accelerator",
            "k8s.amazonaws.com/accelerator",
            "karpenter.k8s.aws/instance-gpu-manufacturer",
            "kubernetes.azure.com/accelerator",
        } <= keys
        assert len(_gpu_terms(pod)) >= 6, "one term per label: the terms are ORed"
        assert "nodeSelector" not in pod, "a single label selector missed nodes labelled another way"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["priorityClassName"] == "system-node-critical"
        assert pod["automountServiceAccountToken"] is False
        container = pod["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert "privileged" not in container["securityContext"]
        image, _, tag = container["image"].partition(":")
        assert image.startswith("nvcr.io/nvidia/") and re.match(r"v?\d+\.\d+\.\d+", tag), container["image"]

    plugin = objs[DEVICE_PLUGIN]["spec"]["template"]["spec"]
    assert plugin["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert plugin["volumes"] == [
        {
            "name": "device-plugin",
            "hostPath": {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"},
        }
    ], "the kubelet's device-plugin directory, nothing else of the host"

    dcgm = objs[DCGM]["spec"]["template"]["spec"]
    caps = dcgm["containers"][0]["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}, "only what DCGM's profiling metrics need"
    assert [v["hostPath"]["path"] for v in dcgm["volumes"]] == ["/var/lib/kubelet/pod-resources"]
    service = objs["Service/platform-loraplane-dcgm-exporter"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9400, "targetPort": "metrics"}]
    monitor = objs["ServiceMonitor/platform-loraplane-dcgm-exporter"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == objs[DCGM]["spec"]["selector"]["matchLabels"]
    policy = objs["NetworkPolicy/platform-loraplane-dcgm-exporter"]["spec"]
    assert policy["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]

    no_dcgm = _render("gpu.mode=device-plugin", "gpu.dcgmExporter.enabled=false")
    assert DEVICE_PLUGIN in no_dcgm and DCGM not in no_dcgm
    assert "runtimeClassName" not in no_dcgm[DEVICE_PLUGIN]["spec"]["template"]["spec"], (
        "without a RuntimeClass of the chart's, the node's default runtime (EKS GPU AMIs: NVIDIA's)"
    )


def test_operator_mode_renders_nvidias_chart_with_our_values_passed_through() -> None:
    """The dependency from charts/ (scripts/chart-deps.sh put it there): NVIDIA's own templates, fed
    the values under `gpu-operator:`."""
    objs = _render(
        *OPERATOR,
        "gpu-operator.driver.enabled=false",
        "gpu-operator.dcgmExporter.serviceMonitor.enabled=true",
    )
    (policy_key,) = [k for k in objs if k.startswith("ClusterPolicy/")]
    spec = objs[policy_key]["spec"]
    assert spec["driver"]["enabled"] is False, "our value reached NVIDIA's ClusterPolicy"
    assert spec["dcgmExporter"]["serviceMonitor"]["enabled"] is True
    assert spec["devicePlugin"]["enabled"] is True, "NVIDIA's defaults stay for what we do not set"
    operator_deploys = [
        d for k, d in objs.items() if k.startswith("Deployment/") and "gpu-operator" in d["metadata"]["name"]
    ]
    assert operator_deploys, "NVIDIA's operator Deployment (in the release's namespace)"
    assert DEVICE_PLUGIN not in objs and DCGM not in objs, "the operator runs its own"
    assert "Deployment/platform-loraplane-vllm" in objs, "the platform renders beside it"
    # our chart's default for the operator's driver (the chart's own values.yaml): installed
    default = _render(*OPERATOR)
    (policy_key,) = [k for k in default if k.startswith("ClusterPolicy/")]
    assert default[policy_key]["spec"]["driver"]["enabled"] is True


def test_the_dependency_is_declared_pinned_with_its_repository() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (dep,) = [d for d in chart["dependencies"] if d["name"] == "gpu-operator"]
    assert dep["repository"] == "https://helm.ngc.nvidia.com/nvidia"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", dep["version"]), "a pinned release, not a range"
    assert dep["condition"] == "gpu-operator.enabled"
    assert list((CHART / "charts").glob("gpu-operator-*.tgz")), (
        "make setup (scripts/chart-deps.sh) puts it here"
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["gpu.mode=operator"],
            "gpu.mode=operator installs NVIDIA's GPU operator as this chart's dependency",
        ),
        (
            ["gpu-operator.enabled=true"],
            "gpu-operator.enabled=true installs NVIDIA's GPU operator, but gpu.mode=none",
        ),
        (
            [*OPERATOR, "gpu.runtimeClass.create=true"],
            "the GPU operator creates the `nvidia` RuntimeClass itself",
        ),
        (
            ["gpu.enabled=false", "gpu-operator.enabled=true"],
            "gpu-operator.enabled=true with gpu.enabled=false",
        ),
        (["gpu.mode=plugin"], "at '/mode': value must be one of 'none', 'device-plugin', 'operator'"),
        (
            ["gpu.devicePlugin.image.tag=latest"],
            "at '/devicePlugin/image/tag': 'latest' does not match pattern",
        ),
        (["gpu.devicePlugin.enabled=true"], "additional properties 'enabled' not allowed"),
    ],
)
def test_a_mode_that_disagrees_with_the_dependency_or_a_bad_value_is_refused(
    sets: list[str], message: str
) -> None:
    assert message in _fails(*sets)


def test_kube_version_admits_the_tested_kubernetes_and_refuses_older_ones() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.31.0-0"
    assert _helm("template", "p", str(CHART), "--kube-version", kube_version_under_test()).returncode == 0
    old = _helm("template", "p", str(CHART), "--kube-version", "1.30.9")
    assert old.returncode != 0 and "chart requires kubeVersion: >=1.31.0-0" in old.stderr


def _initial_run(*sets: str) -> dict[str, Any]:
    objs = _render(*sets, files=(_profile("multi-node-training"),))
    (job,) = [d for k, d in objs.items() if k.startswith("Job/platform-loraplane-run-")]
    return job


@pytest.mark.parametrize(
    "change",
    [
        "trainer.resources.requests.memory=40Gi",
        "trainer.image.tag=0.1.1",
        "trainer.shmSize=16Gi",
        "global.runtimeClassName=nvidia",
        "trainer.podAnnotations.team=nlp",
    ],
)
def test_any_change_to_the_initial_runs_pod_template_names_a_new_job(change: str) -> None:
    """`helm upgrade` patches an object of the same name, and a Job's pod template is immutable: a
    change to the template under the same name fails the upgrade. A new name makes a new Job."""
    before, after = _initial_run(), _initial_run(change)
    assert before["spec"]["template"] != after["spec"]["template"], change
    assert before["metadata"]["name"] != after["metadata"]["name"], f"{change} would patch an immutable field"
    assert _initial_run()["metadata"]["name"] == before["metadata"]["name"], (
        "same values, same Job: no retrain"
    )
    # a change outside the Job (vLLM's replicas) keeps the run as it is
    assert _initial_run("serving.replicas=2")["metadata"]["name"] == before["metadata"]["name"]


def test_a_new_chart_version_alone_keeps_the_initial_runs_job(tmp_path: Any) -> None:
    """The chart-version labels on the Job's metadata are not part of its name: a chart release that
    changes nothing in the run's pod template does not train again."""
    import shutil

    copy = tmp_path / "loraplane"
    shutil.copytree(CHART, copy)
    for chart_yaml in (copy / "Chart.yaml", copy / "charts" / "trainer" / "Chart.yaml"):
        chart_yaml.write_text(chart_yaml.read_text().replace("version: 0.2.0\n", "version: 0.2.1\n", 1))
    args = ("-f", str(_profile("multi-node-training")), "--set", "trainer.image.tag=0.1.0")
    names = []
    for chart in (CHART, copy):
        rendered = _helm("template", "platform", str(chart), *args)
        assert rendered.returncode == 0, rendered.stderr
        (job,) = [
            d
            for d in yaml.safe_load_all(rendered.stdout)
            if d and d["kind"] == "Job" and "-run-" in d["metadata"]["name"]
        ]
        names.append((job["metadata"]["name"], job["metadata"]["labels"]["helm.sh/chart"]))
    (old_name, old_label), (new_name, new_label) = names
    assert old_label != new_label, "the copy is a new chart version"
    assert old_name == new_name

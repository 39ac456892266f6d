"""Whether the cluster offers the GPUs the release asks for: the chart's install-time preflight
(charts/gpu, ``loraplane-gpu.preflightFindings``), read again at any time by ``loraplane status``.

The release's computed values say which resource its GPU pods request (``gpu.resourceName``), how
GPUs become schedulable (``gpu.mode``) and which labels mark a GPU node (``gpu.gpuNodeSelectorTerms``).
A node *advertises* the resource when its allocatable count is above zero. No node advertising it is
a warning, never an error here: GPU node pools may be scaled to zero, or a device plugin may be
starting; the pods that need a GPU stay Pending until one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings

NVIDIA = "nvidia.com/gpu"


@dataclass
class GpuReport:
    mode: str  # none, device-plugin or operator (gpu.mode)
    resource: str  # the extended resource GPU pods request (gpu.resourceName)
    nodes: int  # nodes in the cluster
    advertising: int  # nodes whose allocatable count of `resource` is above zero
    gpu_labelled: int  # nodes carrying a GPU node label (gpu.gpuNodeSelectorTerms; NVIDIA only)
    warning: str | None = None  # what is wrong and what to do; None when a node offers the GPUs


def _matches(labels: dict[str, str], terms: list[dict[str, Any]]) -> bool:
    """Node affinity semantics: any term matches when all of its expressions do."""

    def expression(e: dict[str, Any]) -> bool:
        key, op, values = e.get("key", ""), e.get("operator", ""), [str(v) for v in e.get("values") or []]
        if op == "Exists":
            return key in labels
        if op == "DoesNotExist":
            return key not in labels
        if op == "In":
            return key in labels and labels[key] in values
        if op == "NotIn":
            return not (key in labels and labels[key] in values)
        return False

    return any(all(expression(e) for e in term.get("matchExpressions") or []) for term in terms)


def _advertised(allocatable: dict[str, str] | None, resource: str) -> bool:
    return str((allocatable or {}).get(resource, "0")) not in ("0", "")


def gpu_report(settings: Settings, gpu_values: dict[str, Any]) -> GpuReport:
    """The nodes against the release's ``gpu`` values (its computed values, defaults included)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    mode = str(gpu_values.get("mode") or "none")
    resource = str(gpu_values.get("resourceName") or NVIDIA)
    terms = list(gpu_values.get("gpuNodeSelectorTerms") or [])
    core: Any = client.CoreV1Api(api_client(settings))
    try:
        nodes = core.list_node().items
    except ApiException as exc:
        raise KubernetesError(f"cannot list the cluster's nodes: {api_message(exc)}") from None
    advertising = sum(_advertised(n.status.allocatable, resource) for n in nodes)
    labelled = sum(_matches(n.metadata.labels or {}, terms) for n in nodes) if resource == NVIDIA else 0
    report = GpuReport(mode, resource, len(nodes), advertising, labelled)
    if advertising == 0 and gpu_values.get("enabled", True):
        none = f"none of the cluster's {len(nodes)} nodes advertises {resource}"
        if mode == "none":
            report.warning = (
                f"{none} ({labelled} carry GPU node labels): pods that request a GPU stay Pending. "
                "Add GPU nodes (or wait for a pool scaled to zero), or let the chart make them "
                "schedulable: gpu.mode=device-plugin (drivers on the nodes) or gpu.mode=operator."
            )
        else:
            agent = "GPU operator" if mode == "operator" else "device plugin"
            report.warning = (
                f"{none} yet ({labelled} carry GPU node labels): the {agent} of gpu.mode={mode} registers "
                f"it on GPU nodes; check its pods (kubectl get pods -A -l app.kubernetes.io/component="
                f"nvidia-device-plugin) and that the nodes have the NVIDIA driver."
            )
    return report


def release_gpu_report(settings: Settings, release: str) -> GpuReport | None:
    """The report for the installed release's ``gpu`` values; None when the release is not installed
    or its GPU prerequisites are off (gpu.enabled=false)."""
    from loraplane.platform.helm_release import release_values

    values = release_values(settings, release)
    if values is None:
        return None
    gpu = values.get("gpu") or {}
    if not gpu.get("enabled", True):
        return None
    return gpu_report(settings, gpu)

"""Which vLLM servers a change must reach: a list of URLs in local mode, the Ready pods of the
chart's vLLM Deployment on Kubernetes."""

from __future__ import annotations

import os
from typing import Any

from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings

SERVER_URLS_ENV = "LORAPLANE_SERVER_URLS"
CONTAINER = "vllm"  # the chart's container name (charts/loraplane/templates/serving.yaml)
PORT_NAME = "http"
DEFAULT_PORT = 8000


def vllm_selector(release: str) -> str:
    """The label selector of the chart's vLLM Deployment (``serving.yaml``: spec.selector)."""
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component=vllm"


def replica_urls(settings: Settings) -> list[str]:
    """Every vLLM replica a promotion must reach: ``LORAPLANE_SERVER_URLS`` (comma-separated) when
    set; else ``settings.server_urls`` (the CLI's port-forwards, one per Ready vLLM pod) when set;
    else, inside a pod with the Kubernetes registry, the Ready vLLM pods of the release
    ``LORAPLANE_RELEASE`` (default ``platform``) by pod IP, if there are any; else the one
    ``settings.server_url``."""
    listed = [u.strip() for u in os.environ.get(SERVER_URLS_ENV, "").split(",") if u.strip()]
    if listed:
        return listed
    if settings.server_urls:
        return list(settings.server_urls)
    if settings.registry == "kubernetes" and in_cluster(settings):
        pods = list_vllm_pods(settings, release=settings.release)
        if pods:
            return pods
    return [settings.server_url]


def in_cluster(settings: Settings) -> bool:
    """Running in a pod that talks to its own cluster (no kubeconfig named): pod IPs are reachable."""
    return "KUBERNETES_SERVICE_HOST" in os.environ and settings.kubeconfig is None


def _is_ready(pod: Any) -> bool:
    status = pod.status
    if pod.metadata.deletion_timestamp is not None or status is None or not status.pod_ip:
        return False
    if status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def _port(pod: Any) -> int:
    for container in pod.spec.containers or []:
        if container.name != CONTAINER:
            continue
        for port in container.ports or []:
            if port.name == PORT_NAME:
                return int(port.container_port)
    return DEFAULT_PORT


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def _vllm_pods(settings: Settings, release: str) -> list[Any]:
    """Every pod of ``release``'s vLLM Deployment in ``settings.namespace``, Ready or not."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = client.CoreV1Api(api_client(settings))
    try:
        pods: list[Any] = api.list_namespaced_pod(
            settings.namespace, label_selector=vllm_selector(release)
        ).items
    except ApiException as exc:
        raise KubernetesError(
            f"cannot list the vLLM pods of release {release!r} in namespace {settings.namespace!r}: "
            f"{api_message(exc)}",
            hint="check --namespace and that you may list pods there",
        ) from None
    except HTTPError as exc:
        raise KubernetesError(f"cannot reach the Kubernetes API server: {exc}") from None
    return pods


def list_vllm_pods(settings: Settings, *, release: str = "platform") -> list[str]:
    """``http://POD_IP:PORT`` of every Ready vLLM pod of ``release`` in ``settings.namespace``.

    Pod IPs are reachable from inside the cluster (a Job, the gateway's pod); from outside, pass the
    URLs of port-forwards instead.
    """
    ready = sorted((p for p in _vllm_pods(settings, release) if _is_ready(p)), key=lambda p: p.metadata.name)
    return [_url(p.status.pod_ip, _port(p)) for p in ready]


def vllm_container_args(settings: Settings, *, release: str = "platform") -> list[str]:
    """The vLLM container's arguments in the release's vLLM pods (the newest pod's; every pod of a
    Deployment revision has the same); empty when the release has no vLLM pod."""
    pods = _vllm_pods(settings, release)

    def created(pod: Any) -> float:
        stamp = pod.metadata.creation_timestamp
        return float(stamp.timestamp()) if stamp is not None else 0.0

    for pod in sorted(pods, key=created, reverse=True):
        for container in pod.spec.containers or []:
            if container.name == CONTAINER:
                return [*(container.command or []), *(container.args or [])]
    return []

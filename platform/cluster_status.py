"""What is running in a namespace: the Helm release, vLLM's replicas, the adapters vLLM has loaded
(its ``/v1/models`` through a port-forward) and the registry's aliases.

Each part is read on its own: a part that cannot be read (no Ready vLLM pod, no registry CRD) says
why in its ``error`` field instead of hiding the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.platform.gpu_check import GpuReport, release_gpu_report
from loraplane.platform.helm_release import DEFAULT_RELEASE, ReleaseInfo, release_status
from loraplane.platform.storage_check import StorageReport, check_claim, release_claim


@dataclass
class Replicas:
    deployment: str
    desired: int
    ready: int


@dataclass
class ModelFetch:
    job: str
    model: str  # the reference it fetches (its loraplane.dev/model annotation)
    state: str  # Running, Complete or Failed
    message: str | None = None  # a failed pod's termination message: the value to fix


def model_fetches(settings: Settings, release: str) -> list[ModelFetch]:
    """The release's model-fetch Jobs, and for a failed one the reason its pod gave."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = api_client(settings)
    batch: Any = client.BatchV1Api(api)
    core: Any = client.CoreV1Api(api)
    selector = f"app.kubernetes.io/component=model-fetch,app.kubernetes.io/instance={release}"
    try:
        jobs = batch.list_namespaced_job(settings.namespace, label_selector=selector).items
        found = []
        for job in sorted(jobs, key=lambda j: j.metadata.name):
            conditions = {c.type for c in job.status.conditions or [] if c.status == "True"}
            state = (
                "Complete" if "Complete" in conditions else "Failed" if "Failed" in conditions else "Running"
            )
            message = None
            if state == "Failed":
                pods = core.list_namespaced_pod(
                    settings.namespace, label_selector=f"job-name={job.metadata.name}"
                ).items
                for pod in pods:
                    for cs in pod.status.container_statuses or []:
                        term = cs.state.terminated if cs.state else None
                        if term is not None and term.message:
                            message = term.message.strip()
            model = (job.metadata.annotations or {}).get("loraplane.dev/model", "")
            found.append(ModelFetch(job.metadata.name, model, state, message))
    except ApiException as exc:
        raise KubernetesError(f"cannot read the model-fetch Jobs: {api_message(exc)}") from None
    return found


@dataclass
class ClusterStatus:
    namespace: str
    release: ReleaseInfo | None
    vllm: list[Replicas] = field(default_factory=list)
    loaded_adapters: list[str] = field(default_factory=list)
    base_models: list[str] = field(default_factory=list)
    loaded_error: str | None = None
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    aliases_error: str | None = None
    storage: StorageReport | None = None  # the shared volume's claim: bound, or why not
    storage_error: str | None = None
    model_fetch: list[ModelFetch] = field(default_factory=list)  # the chart's model-fetch Jobs
    model_fetch_error: str | None = None
    gpu: GpuReport | None = None  # whether nodes offer the GPUs the release asks for (gpu_check)
    gpu_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vllm_replicas(settings: Settings, release: str) -> list[Replicas]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps: Any = client.AppsV1Api(api_client(settings))
    selector = f"app.kubernetes.io/component=vllm,app.kubernetes.io/instance={release}"
    try:
        found = apps.list_namespaced_deployment(settings.namespace, label_selector=selector).items
    except ApiException as exc:
        raise KubernetesError(f"cannot list Deployments: {api_message(exc)}") from None
    return [
        Replicas(d.metadata.name, d.spec.replicas or 0, d.status.ready_replicas or 0)
        for d in sorted(found, key=lambda d: d.metadata.name)
    ]


def served_models(url: str, api_key: str | None) -> tuple[list[str], list[str]]:
    """(adapters, base models) that the vLLM server at ``url`` lists on ``/v1/models``."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise LoraplaneError(f"cannot reach vLLM: {exc}") from None
    if response.status_code != 200:
        raise LoraplaneError(f"vLLM answered /v1/models with HTTP {response.status_code}")
    cards = response.json().get("data", [])
    adapters = sorted(c["id"] for c in cards if c.get("parent"))
    bases = sorted(c["id"] for c in cards if not c.get("parent"))
    return adapters, bases


def cluster_status(settings: Settings, release: str = DEFAULT_RELEASE) -> ClusterStatus:
    from loraplane.platform.portforward import vllm_admin
    from loraplane.registry.backends import open_registry

    status = ClusterStatus(namespace=settings.namespace, release=release_status(settings, release))
    status.vllm = vllm_replicas(settings, release)
    if status.release is not None:
        try:
            status.gpu = release_gpu_report(settings, release)
        except LoraplaneError as exc:
            status.gpu_error = str(exc)
    try:
        status.model_fetch = model_fetches(settings, release)
    except LoraplaneError as exc:
        status.model_fetch_error = str(exc)
    try:
        claim = release_claim(settings, release)
        status.storage = check_claim(settings, claim) if claim else None
    except LoraplaneError as exc:
        status.storage_error = str(exc)
    if any(r.ready for r in status.vllm):
        try:
            with vllm_admin(settings, release=release) as forwarded:
                status.loaded_adapters, status.base_models = served_models(
                    forwarded.server_url, forwarded.api_key
                )
        except LoraplaneError as exc:
            status.loaded_error = str(exc)
    else:
        status.loaded_error = "no Ready vLLM replica"
    try:
        state = open_registry(settings.model_copy(update={"registry": "kubernetes"})).read()
        status.aliases = {name: dict(a.aliases) for name, a in state.adapters.items() if a.aliases}
    except LoraplaneError as exc:
        status.aliases_error = str(exc)
    return status

"""With the Kubernetes registry, the vLLM pods serve what the registry says by themselves: each pod's
reconciler watches the ``LoraAdapter`` objects and reports, under its pod name in the object's
``status.servers``, the versions it serves and those it could not load (``serving/replica_reconciler.py``).

So ``adapters load|promote|rollback|unload`` write the wanted state into the registry and wait here
until every Ready reconciling vLLM pod of the namespace reports it: no port-forward, no pod IP, and
a replica that starts later loads it before it reports Ready. Pods carry the label
``loraplane.dev/reconciler=watch`` (the chart sets it on the vLLM pods when they watch the registry);
a namespace without such a pod is reached the direct way (``serving/replicas.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.registry.model import AdapterVersion

RECONCILER_LABEL = "loraplane.dev/reconciler"
SELECTOR = f"app.kubernetes.io/component=vllm,{RECONCILER_LABEL}=watch"
SERVER_URLS_ENV = "LORAPLANE_SERVER_URLS"  # explicit servers: the direct way, as serving/replicas.py
DEFAULT_TIMEOUT_S = 120.0
POLL_S = 0.1


class ReplicasDidNotConvergeError(LoraplaneError):
    """Some Ready replica failed the version, or did not report it in time."""


@dataclass(frozen=True)
class Replicas:
    """The namespace's reconciling vLLM pods: all of them, and the Ready ones."""

    pods: tuple[str, ...]
    ready: tuple[str, ...]


def _ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status is None or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def reconciling_replicas(settings: Settings, core: Any = None) -> Replicas | None:
    """The reconciling vLLM pods of ``settings.namespace``; None when changes go the direct way
    (another registry, servers named in ``LORAPLANE_SERVER_URLS``, or no such pod). ``core``: a
    ``CoreV1Api`` to reuse."""
    if settings.registry != "kubernetes" or os.environ.get(SERVER_URLS_ENV, "").strip():
        return None
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        pods: list[Any] = (
            (core or client.CoreV1Api(api_client(settings)))
            .list_namespaced_pod(settings.namespace, label_selector=SELECTOR)
            .items
        )
    except ApiException as exc:
        raise KubernetesError(
            f"cannot list the vLLM pods in namespace {settings.namespace!r}: {api_message(exc)}",
            hint="check --namespace and that you may list pods there",
        ) from None
    except HTTPError as exc:
        raise KubernetesError(f"cannot reach the Kubernetes API server: {exc}") from None
    if not pods:
        return None
    names = sorted(p.metadata.name for p in pods)
    return Replicas(pods=tuple(names), ready=tuple(sorted(p.metadata.name for p in pods if _ready(p))))


def wait_for_replicas(
    settings: Settings,
    entry: AdapterVersion,
    *,
    serving: bool,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[str, ...]:
    """Wait until every Ready reconciling pod reports ``entry`` loaded (``serving``) or not loaded
    (not ``serving``), in a report about the adapter's spec as it is now (``observedGeneration``: a
    report made before this command's write does not count); return those pods.

    Raises :class:`ReplicasDidNotConvergeError` naming the pods that reported a failure (with their
    reasons) or did not report in ``timeout`` seconds."""
    from kubernetes import client

    from loraplane.registry.kubernetes import KubernetesRegistry, server_reports

    registry = KubernetesRegistry(settings)
    core = client.CoreV1Api(api_client(settings))
    deadline = time.monotonic() + timeout
    target: int | None = None  # the spec generation the reports must be about: the one just written
    while True:
        replicas = reconciling_replicas(settings, core)
        ready = replicas.ready if replicas else ()
        obj = registry.get_object(entry.name) or {}
        if target is None:
            target = int((obj.get("metadata") or {}).get("generation") or 0)
        reports = {
            pod: report
            for pod, report in server_reports(obj).items()
            if int(report.get("observedGeneration") or 0) >= target
        }
        failed = {
            pod: str(f.get("reason", ""))
            for pod in ready
            for f in (reports.get(pod) or {}).get("failed") or []
            if f.get("version") == entry.version
        }
        pending = [pod for pod in ready if pod not in reports]  # no report about this spec yet
        serves = {pod: entry.version in ((reports.get(pod) or {}).get("loaded") or []) for pod in ready}
        behind = [pod for pod in ready if pod in pending or serves[pod] != serving]
        if not behind:
            return ready
        late = time.monotonic() >= deadline
        if serving and failed and (late or not pending):  # every pod has answered: say all at once
            lines = "".join(f"\n  {pod}: {why}" for pod, why in sorted(failed.items()))
            silent = f"\n  (no report in {timeout:g}s from: {', '.join(pending)})" if pending else ""
            raise ReplicasDidNotConvergeError(
                f"{entry.ref} could not be loaded on {len(failed)} of {len(ready)} Ready vLLM pod(s):"
                f"{lines}{silent}",
                hint="fix what the message names and load it again; `loraplane adapters show "
                f"{entry.name}` shows the reason, the pod's log the details",
            )
        if late:
            doing = "load" if serving else "unload"
            raise ReplicasDidNotConvergeError(
                f"{len(behind)} of {len(ready)} Ready vLLM pod(s) did not report that they {doing}ed "
                f"{entry.ref} within {timeout:g}s: {', '.join(behind)}",
                hint="check those pods' logs (kubectl logs POD -c vllm) and that they may patch "
                "loraadapters/status (the chart's registry-reporter Role)",
            )
        time.sleep(POLL_S)

"""Is the shared volume's claim bound, and if not, why (its events) and what to change.

A claim that never binds leaves every pod that mounts it Pending ("unbound immediate
PersistentVolumeClaims") or stuck in ContainerCreating, and ``helm install --wait`` then times out
without saying why. ``loraplane install``/``upgrade`` and ``loraplane status`` read the claim and its
events instead and name the value to fix. What the claim's state means:

* ``Bound``: fine;
* ``Pending`` with the event ``WaitForFirstConsumer``: fine, the class binds when the first pod is
  scheduled (local and zonal block classes);
* ``Pending`` with a ``Warning`` event (``ProvisioningFailed``: an unknown class, a provisioner that
  refuses the access mode) or ``FailedBinding`` (no class and no PersistentVolume that fits; the PV
  controller writes it as a Normal event): a problem, with the event's own message and the values
  that fix it;
* no claim at all (``global.storage.existingClaim`` names one that does not exist): a problem.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings

FIX = (
    "set global.storage.storageClass to a class that offers ReadWriteMany (EKS: efs-sc, GKE: standard-rwx, "
    "AKS: azurefile-csi, or an NFS provisioner's), or global.storage.singleNode=true for a ReadWriteOnce "
    "block class, or global.storage.existingClaim to a claim you made (docs/chart.md, Storage)"
)


@dataclass
class StorageReport:
    claim: str
    phase: str  # Bound, Pending, Lost, or Missing
    storage_class: str | None = None
    access_modes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # "Warning ProvisioningFailed: ..."
    problem: str | None = None  # what is wrong and what to change; None when nothing is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def release_claim(settings: Settings, release: str) -> str | None:
    """The claim the release's pods mount: the vLLM Deployment's, else the chart's labelled PVC."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = api_client(settings)
    apps: Any = client.AppsV1Api(api)
    core: Any = client.CoreV1Api(api)
    selector = f"app.kubernetes.io/instance={release}"
    try:
        for deployment in apps.list_namespaced_deployment(settings.namespace, label_selector=selector).items:
            for volume in deployment.spec.template.spec.volumes or []:
                if volume.name == "data" and volume.persistent_volume_claim:
                    return str(volume.persistent_volume_claim.claim_name)
        claims = core.list_namespaced_persistent_volume_claim(
            settings.namespace, label_selector=selector
        ).items
    except ApiException as exc:
        raise KubernetesError(f"cannot read the release's volume: {api_message(exc)}") from None
    return str(claims[0].metadata.name) if claims else None


def check_claim(settings: Settings, claim: str) -> StorageReport:
    """The claim's phase and events, and the problem they show (see the module)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(api_client(settings))
    try:
        pvc = core.read_namespaced_persistent_volume_claim(claim, settings.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return StorageReport(
                claim,
                "Missing",
                problem=f"the claim {claim!r} does not exist in namespace {settings.namespace!r}, so "
                "every pod that mounts the shared volume waits for it: create it, or fix "
                "global.storage.existingClaim (or set global.storage.create=true)",
            )
        raise KubernetesError(f"cannot read the claim {claim!r}: {api_message(exc)}") from None
    try:
        found = core.list_namespaced_event(
            settings.namespace,
            field_selector=f"involvedObject.kind=PersistentVolumeClaim,involvedObject.name={claim}",
        ).items
    except ApiException as exc:
        raise KubernetesError(f"cannot read the events of claim {claim!r}: {api_message(exc)}") from None
    found.sort(key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or ""))
    report = StorageReport(
        claim,
        pvc.status.phase or "Pending",
        pvc.spec.storage_class_name,
        list(pvc.spec.access_modes or []),
        [f"{e.type} {e.reason}: {e.message}" for e in found],
    )
    if report.phase == "Bound":
        return report
    # FailedBinding is a Normal event, yet final: no PersistentVolume fits and no class provisions one
    warnings = [e for e in found if e.type == "Warning" or e.reason == "FailedBinding"]
    waiting = any(e.reason == "WaitForFirstConsumer" for e in found)
    if warnings:
        last = warnings[-1]
        report.problem = (
            f"the shared volume's claim {claim!r} (class {report.storage_class or 'none'}, "
            f"{', '.join(report.access_modes)}) is {report.phase}: {last.reason}: {last.message}; {FIX}"
        )
    elif report.phase == "Lost":
        report.problem = (
            f"the claim {claim!r} lost its PersistentVolume; restore the volume or make a new claim"
        )
    elif not waiting and report.phase == "Pending":
        report.problem = None  # nothing has happened yet: a provisioner may still be at work
    return report


def wait_for_claim(
    settings: Settings, release: str, *, timeout: float = 15.0, poll: float = 1.0
) -> StorageReport | None:
    """After an install: until the release's claim binds, waits for its first consumer, or shows a
    problem (at most ``timeout`` seconds); None when the release mounts no claim."""
    claim = release_claim(settings, release)
    if claim is None:
        return None
    deadline = time.monotonic() + timeout
    while True:
        report = check_claim(settings, claim)
        settled = report.phase == "Bound" or report.problem is not None
        if settled or any("WaitForFirstConsumer" in e for e in report.events) or time.monotonic() >= deadline:
            return report
        time.sleep(poll)

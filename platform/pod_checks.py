"""An adapter version's file checks, run in a vLLM pod when this process cannot read its files.

From outside the cluster the CLI reaches vLLM through port-forwards, but the adapter's files are on
the shared volume that only the pods mount. Before any replica is asked to load a version, the same
checks as in local mode (weights unchanged since registration, safetensors only and under the
adapters root, rank and base model against the server's own) run once, through ``kubectl exec``, in
one Ready vLLM pod: ``python -m loraplane.serving.check_adapter``. Every replica of the Deployment
mounts the same volume and serves the same base, so one pod's verdict holds for all of them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.platform.portforward import find_target, kubectl_executable
from loraplane.registry.model import AdapterVersion
from loraplane.serving.client import ModelCard
from loraplane.serving.limits import limits_from_args
from loraplane.serving.replicas import CONTAINER, in_cluster

CHECK_TIMEOUT_S = 600.0  # hashing a large adapter on a slow volume


class PodCheckError(LoraplaneError):
    """The check itself could not run in the pod (not a verdict on the adapter)."""


class AdapterRefusedInPod(LoraplaneError):
    """The pod's checks refused the version (the exit code is the pod's: 2 for a bad adapter)."""

    def __init__(self, message: str, *, hint: str | None, exit_code: int) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


def files_are_here(settings: Settings, entry: AdapterVersion) -> bool:
    """Whether this process can check ``entry``'s files itself: always in local mode and in a pod
    (which mounts the volume), and from outside the cluster only when the path exists here."""
    return settings.registry != "kubernetes" or in_cluster(settings) or Path(entry.path).exists()


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _pod_args(settings: Settings, pod: str) -> list[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(api_client(settings))
    try:
        spec = core.read_namespaced_pod(pod, settings.namespace).spec
    except ApiException as exc:
        raise KubernetesError(f"cannot read pod {pod}: {api_message(exc)}") from None
    for container in spec.containers or []:
        if container.name == CONTAINER:
            return [*(container.command or []), *(container.args or [])]
    raise PodCheckError(f"pod {pod} has no {CONTAINER!r} container")


def check_in_vllm_pod(
    settings: Settings, entry: AdapterVersion, cards: list[ModelCard], *, release: str | None = None
) -> str:
    """Run the version's checks in one Ready vLLM pod; return that pod's name. ``cards`` is a replica's
    ``/v1/models`` (its base model is read in the pod). Raises :class:`AdapterRefusedInPod` with the
    pod's own message when the version fails them."""
    target = find_target(settings, "vllm", release=release)
    args = _pod_args(settings, target.pod)
    limits = limits_from_args(args)
    root = _flag(args, "--adapters-root") or str(settings.adapters_dir)
    rank = limits.max_lora_rank if limits else settings.max_lora_rank
    argv = [kubectl_executable()]
    if settings.kubeconfig is not None:
        argv += ["--kubeconfig", str(settings.kubeconfig)]
    if settings.kube_context is not None:
        argv += ["--context", settings.kube_context]
    argv += ["-n", settings.namespace, "exec", "-i", target.pod, "-c", CONTAINER, "--"]
    argv += ["python", "-m", "loraplane.serving.check_adapter", "--adapters-root", root]
    argv += ["--max-lora-rank", str(rank)]
    bases = [c for c in cards if not c.is_adapter]
    if bases and bases[0].root:
        argv += ["--base-root", bases[0].root]
        for card in bases:
            argv += ["--served-name", card.id]
    try:
        proc = subprocess.run(
            argv, input=entry.model_dump_json().encode(), capture_output=True, timeout=CHECK_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise PodCheckError(
            f"checking {entry.ref} in pod {target.pod} took over {CHECK_TIMEOUT_S:g}s",
            hint=f"see the pod: kubectl -n {settings.namespace} describe pod {target.pod}",
        ) from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        verdict: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        verdict = {}
    if verdict.get("ok") is True:
        return target.pod
    if verdict.get("ok") is False:
        raise AdapterRefusedInPod(
            f"{verdict.get('error')} (checked in pod {target.pod}, which mounts the shared volume)",
            hint=verdict.get("hint"),
            exit_code=int(verdict.get("exit_code") or 1),
        )
    detail = proc.stderr.decode(errors="replace").strip()[-1500:] or f"kubectl exit code {proc.returncode}"
    raise PodCheckError(
        f"could not check {entry.ref} in vLLM pod {target.pod}: {detail}",
        hint="the CLI runs the adapter checks there through `kubectl exec` (it needs create on pods/exec "
        f"in namespace {settings.namespace!r}); an image without `loraplane.serving.check_adapter` is older "
        "than this CLI",
    )

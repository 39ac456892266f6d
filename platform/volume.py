"""Put a local file or directory onto the release's shared volume, through the Kubernetes API.

``loraplane volume put ./model models/base`` is how a base model or a dataset reaches the volume
that vLLM and the trainer mount, from a laptop, without node access or a cloud bucket:

1. read the release's vLLM Deployment for the volume's claim, its mount path and the image;
2. start a short-lived pod (Pod Security ``restricted``, no service-account token, no ports) that
   mounts the claim;
3. stream a tar of the upload through ``kubectl exec -i`` into ``volume_receive`` in that pod, which
   unpacks it into a staging directory on the volume, checks the stream's sha256 and renames it into
   place (a broken upload leaves nothing at the destination);
4. delete the pod, whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.platform.portforward import kubectl_executable
from loraplane.platform.volume_receive import PAYLOAD, Refused, check_dest

VOLUME = "data"  # the shared volume's name in the chart's pod templates
CONTAINER = "vllm"
UID = 10001  # the chart's user


class VolumeError(LoraplaneError):
    """The upload could not be made; nothing was kept at the destination."""


class VolumeRefused(InvalidInputError):
    """The upload was refused before anything was written (exit 2): a bad or taken destination."""


@dataclass(frozen=True)
class VolumeTarget:
    """What the upload pod copies from the release's vLLM Deployment."""

    claim: str
    mount_path: str
    image: str
    pull_policy: str
    pull_secrets: tuple[str, ...] = ()
    # the vLLM pods' affinity: with global.storage.singleNode it holds every pod that mounts the
    # ReadWriteOnce volume on one node, this one included (its component is in the rule)
    affinity: dict[str, Any] | None = None


@dataclass(frozen=True)
class PodSecrets:
    """Kubernetes Secrets a volume pod reads (``models pull``): never values, only their names."""

    hf_token_secret: str | None = None  # mounted as a file; huggingface_hub reads HF_TOKEN_PATH
    hf_token_key: str = "token"
    s3_secret: str | None = None  # its keys become the environment (AWS_ACCESS_KEY_ID, ...)
    s3_endpoint: str | None = None  # AWS_ENDPOINT_URL, for S3 APIs other than AWS


@dataclass(frozen=True)
class PutResult:
    path: str  # on the volume, relative to its root
    mount_path: str  # where pods see the volume (path == mount_path/path in a pod)
    files: int
    bytes: int
    sha256: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _apps_core(settings: Settings) -> tuple[Any, Any]:
    from kubernetes import client

    api = api_client(settings)
    return client.AppsV1Api(api), client.CoreV1Api(api)


def volume_target(settings: Settings, release: str) -> VolumeTarget:
    """The shared volume's claim and mount path, and the image, from ``release``'s vLLM Deployment."""
    from kubernetes.client.exceptions import ApiException

    apps, _ = _apps_core(settings)
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=vllm"
    try:
        found = apps.list_namespaced_deployment(settings.namespace, label_selector=selector).items
    except ApiException as exc:
        raise KubernetesError(
            f"cannot list Deployments in {settings.namespace!r}: {api_message(exc)}"
        ) from None
    if not found:
        raise VolumeError(
            f"release {release!r} has no vLLM Deployment in namespace {settings.namespace!r}",
            hint="install the platform first (loraplane install), or pick its namespace (-n) and --release",
        )
    spec = found[0].spec.template.spec
    claim = next(
        (
            v.persistent_volume_claim.claim_name
            for v in spec.volumes or []
            if v.name == VOLUME and v.persistent_volume_claim
        ),
        None,
    )
    container = next((c for c in spec.containers if c.name == CONTAINER), spec.containers[0])
    mount = next((m.mount_path for m in container.volume_mounts or [] if m.name == VOLUME), None)
    if claim is None or mount is None:
        raise VolumeError(f"the vLLM Deployment of release {release!r} mounts no shared volume {VOLUME!r}")
    return VolumeTarget(
        claim=claim,
        mount_path=mount.rstrip("/") or "/",
        image=container.image,
        pull_policy=container.image_pull_policy or "IfNotPresent",
        pull_secrets=tuple(s.name for s in spec.image_pull_secrets or []),
        affinity=apps.api_client.sanitize_for_serialization(spec.affinity) if spec.affinity else None,
    )


def upload_pod(
    name: str, release: str, target: VolumeTarget, *, deadline: int, secrets: PodSecrets | None = None
) -> dict[str, Any]:
    """A pod that only holds the volume mounted while ``kubectl exec`` writes to it (``restricted``)."""
    security = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "loraplane",
                "app.kubernetes.io/instance": release,
                "app.kubernetes.io/component": "volume-put",
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "activeDeadlineSeconds": deadline,  # a pod the CLI could not delete ends by itself
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "fsGroupChangePolicy": "OnRootMismatch",  # no re-chown of every adapter file
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "put",
                    "image": target.image,
                    "imagePullPolicy": target.pull_policy,
                    # idle until deleted: the work arrives through `kubectl exec`
                    "command": ["python", "-c", f"import time; time.sleep({deadline})"],
                    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                    "securityContext": security,
                    "volumeMounts": [
                        {"name": VOLUME, "mountPath": target.mount_path},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            "volumes": [
                {"name": VOLUME, "persistentVolumeClaim": {"claimName": target.claim}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }
    if secrets is not None:
        _add_secrets(pod["spec"], secrets)
    if target.pull_secrets:
        pod["spec"]["imagePullSecrets"] = [{"name": s} for s in target.pull_secrets]
    if target.affinity:
        pod["spec"]["affinity"] = target.affinity
    return pod


def _add_secrets(spec: dict[str, Any], secrets: PodSecrets) -> None:
    container = spec["containers"][0]
    env = container.setdefault("env", [])
    if secrets.hf_token_secret:
        mount = "/etc/loraplane/hf-token"
        env.append({"name": "HF_TOKEN_PATH", "value": f"{mount}/{secrets.hf_token_key}"})
        container["volumeMounts"].append({"name": "hf-token", "mountPath": mount, "readOnly": True})
        spec["volumes"].append({"name": "hf-token", "secret": {"secretName": secrets.hf_token_secret}})
    if secrets.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": secrets.s3_secret}}]
    if secrets.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": secrets.s3_endpoint})


def _wait_running(core: Any, namespace: str, name: str, timeout: float) -> None:
    """Until the pod runs; a pod that cannot start fails with the reason the kubelet gives."""
    deadline = time.monotonic() + timeout
    while True:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase == "Running":
            return
        waiting = [
            s.state.waiting for s in pod.status.container_statuses or [] if s.state and s.state.waiting
        ]
        stuck = [
            w
            for w in waiting
            if w.reason
            in ("ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "InvalidImageName")
        ]
        if stuck or pod.status.phase in ("Failed", "Succeeded"):
            why = f"{stuck[0].reason}: {stuck[0].message}" if stuck else f"phase {pod.status.phase}"
            raise VolumeError(f"the upload pod {name} cannot start ({why})")
        if time.monotonic() > deadline:
            unscheduled = [
                c.message
                for c in pod.status.conditions or []
                if c.type == "PodScheduled" and c.status != "True"
            ]
            why = unscheduled[0] if unscheduled else f"phase {pod.status.phase}"
            raise VolumeError(
                f"the upload pod {name} did not start within {timeout:.0f}s ({why})",
                hint=f"see: kubectl -n {namespace} describe pod {name}",
            )
        time.sleep(0.5)


@contextmanager
def volume_pod(
    settings: Settings, release: str, target: VolumeTarget, timeout: float, secrets: PodSecrets | None = None
) -> Iterator[str]:
    """A running :func:`upload_pod` for the block's duration (deleted whatever happens)."""
    from kubernetes.client.exceptions import ApiException

    _, core = _apps_core(settings)
    name = f"{release[:30]}-volume-put-{uuid.uuid4().hex[:6]}"
    pod = upload_pod(name, release, target, deadline=int(timeout) + 600, secrets=secrets)
    try:
        core.create_namespaced_pod(settings.namespace, pod)
    except ApiException as exc:
        raise KubernetesError(
            f"cannot create the upload pod in {settings.namespace!r}: {api_message(exc)}"
        ) from None
    try:
        _wait_running(core, settings.namespace, name, timeout=min(timeout, 300.0))
        yield name
    finally:
        with suppress(ApiException):
            core.delete_namespaced_pod(name, settings.namespace, grace_period_seconds=0)


def _payload_bytes(local: Path) -> tuple[int, int]:
    if local.is_file():
        return 1, local.stat().st_size
    files = [p for p in local.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


class _Sink:
    """Where tarfile writes: kubectl's stdin, hashed and counted on the way."""

    def __init__(self, out: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0
        self.on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.on_bytes(self.size)
        return len(data)


def _tar_digest(local: Path) -> str:
    """sha256 of the exact tar stream ``_send`` writes (deterministic: sorted, fixed metadata)."""

    class Null:
        def write(self, data: bytes) -> int:
            return len(data)

    sink = _Sink(Null(), lambda _n: None)  # type: ignore[arg-type]
    _write_tar(local, sink)
    return sink.digest.hexdigest()


def _write_tar(local: Path, sink: _Sink) -> None:
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = UID
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        archive.add(local, arcname=PAYLOAD, recursive=False, filter=clean)
        if local.is_dir():
            for path in sorted(local.rglob("*")):
                if path.is_symlink():
                    raise VolumeError(
                        f"{path} is a symbolic link", hint="upload the files it points to instead"
                    )
                archive.add(
                    path,
                    arcname=f"{PAYLOAD}/{path.relative_to(local).as_posix()}",
                    recursive=False,
                    filter=clean,
                )


def kubectl_argv(settings: Settings) -> list[str]:
    """kubectl with the settings' kubeconfig and context."""
    argv = [kubectl_executable()]
    if settings.kubeconfig is not None:
        argv += ["--kubeconfig", str(settings.kubeconfig)]
    if settings.kube_context is not None:
        argv += ["--context", settings.kube_context]
    return argv


def put(
    settings: Settings,
    local: Path,
    dest: str,
    *,
    release: str = "platform",
    replace: bool = False,
    timeout: float = 1800.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> PutResult:
    """Copy ``local`` (a file or a directory) to ``dest`` on ``release``'s shared volume; see the module."""
    if not local.exists():
        raise VolumeError(f"{local} does not exist", hint="give a file or a directory to upload")
    try:
        relative = check_dest(dest)
    except Refused as exc:
        raise VolumeRefused(str(exc)) from None
    files, total = _payload_bytes(local)
    started = time.monotonic()
    target = volume_target(settings, release)
    digest = _tar_digest(local)
    argv = kubectl_argv(settings)
    with volume_pod(settings, release, target, timeout) as pod:
        argv += ["-n", settings.namespace, "exec", "-i", pod, "-c", "put", "--"]
        argv += ["python", "-m", "loraplane.platform.volume_receive", "--root", target.mount_path]
        argv += ["--dest", str(relative), "--sha256", digest, *(["--replace"] if replace else [])]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        outputs: dict[str, bytes] = {}

        def read(name: str, stream: IO[bytes]) -> None:
            outputs[name] = stream.read()

        readers = [
            threading.Thread(target=read, args=(n, s), daemon=True)
            for n, s in (("out", proc.stdout), ("err", proc.stderr))
        ]
        for reader in readers:
            reader.start()
        sent_error: Exception | None = None
        try:
            _write_tar(local, _Sink(proc.stdin, lambda n: on_progress(n, total) if on_progress else None))
        except (BrokenPipeError, OSError) as exc:
            sent_error = exc
        finally:
            with suppress(OSError):
                proc.stdin.close()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise VolumeError(
                f"the upload to {relative} did not finish within {timeout:.0f}s; nothing was kept"
            ) from None
        for reader in readers:
            reader.join(timeout=10)
    lines_err = outputs.get("err", b"").decode(errors="replace").strip().splitlines()
    # kubectl adds its own "command terminated with exit code N" line: the receiver's message is enough
    err = "\n".join(line for line in lines_err if not line.startswith("command terminated with exit code"))
    if code != 0:
        if err.startswith("refused:"):
            raise VolumeRefused(err.removeprefix("refused:").strip())
        detail = err or (str(sent_error) if sent_error else f"kubectl exit code {code}")
        raise VolumeError(f"the upload to {relative} failed: {detail}")
    lines = outputs.get("out", b"").decode().strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    if summary.get("sha256") != digest or summary.get("files") != files:
        raise VolumeError(f"the volume reports a different upload than was sent: {summary}")
    return PutResult(
        path=str(relative),
        mount_path=target.mount_path,
        files=files,
        bytes=total,
        sha256=digest,
        seconds=round(time.monotonic() - started, 2),
    )

"""Reach the cluster's gateway or vLLM from a laptop: a port-forward through the Kubernetes API.

The Service of the release's component (``gateway`` for users, ``vllm`` for admin commands) names
the pods (its selector) and the port (its targetPort); one Ready pod of it gets a ``kubectl
port-forward`` on a free loopback port, for as long as the ``with`` block runs.

Why ``kubectl port-forward`` and not ``kubernetes.stream.portforward``: the Python client gives one
socket per websocket and, measured against the API server, does not pass on the pod's end of a
connection (a read after the server closed hangs), and it has no listener: every HTTP connection
would need its own thread pumping bytes. kubectl does all of that (SPDY or websockets, many
connections, clean shutdown) and is on every machine that talks to a cluster; it gets the same
kubeconfig and context as every other loraplane command.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings

FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


class PortForwardError(LoraplaneError):
    """No Service, no Ready pod, no kubectl, or kubectl could not forward."""


@dataclass(frozen=True)
class Target:
    service: str
    pod: str  # the first Ready pod (by name)
    port: int
    ready_pods: tuple[str, ...] = ()  # every Ready pod behind the Service, by name


def kubectl_executable() -> str:
    found = os.environ.get("LORAPLANE_KUBECTL") or shutil.which("kubectl")
    if not found:
        raise PortForwardError(
            "kubectl is not installed: the CLI uses `kubectl port-forward` to reach the cluster's services",
            hint="install kubectl, set LORAPLANE_KUBECTL, or pass --server-url URL",
        )
    return found


def _ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def find_target(settings: Settings, component: str, *, release: str | None = None) -> Target:
    """The Service labelled ``app.kubernetes.io/component=<component>`` and one Ready pod behind it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(api_client(settings))
    ns = settings.namespace
    selector = f"app.kubernetes.io/component={component}"
    if release:
        selector += f",app.kubernetes.io/instance={release}"
    try:
        services = core.list_namespaced_service(ns, label_selector=selector).items
    except ApiException as exc:
        raise KubernetesError(f"cannot list Services in {ns!r}: {api_message(exc)}") from None
    if not services:
        raise PortForwardError(
            f"no {component} Service in namespace {ns!r}",
            hint="install the platform (loraplane install), pick its namespace with -n, "
            "or pass --server-url URL",
        )
    if len(services) > 1:
        names = ", ".join(sorted(s.metadata.name for s in services))
        raise PortForwardError(
            f"{len(services)} {component} Services in namespace {ns!r} ({names})",
            hint="name the Helm release with --release",
        )
    service = services[0]
    port = service.spec.ports[0]
    target_port = port.target_port if isinstance(port.target_port, int) else port.port
    pod_selector = ",".join(f"{k}={v}" for k, v in sorted((service.spec.selector or {}).items()))
    try:
        pods = core.list_namespaced_pod(ns, label_selector=pod_selector).items
    except ApiException as exc:
        what = f"cannot list the pods of {service.metadata.name}"
        raise KubernetesError(f"{what}: {api_message(exc)}") from None
    ready = sorted((p for p in pods if _ready(p)), key=lambda p: p.metadata.name)
    if not ready:
        raise PortForwardError(
            f"no Ready pod behind Service {service.metadata.name} in namespace {ns!r} "
            f"({len(pods)} pod(s), none Ready)",
            hint=f"see why: kubectl -n {ns} describe pods -l {pod_selector}",
        )
    if isinstance(port.target_port, str):  # a named port: look it up on the pod
        for container in ready[0].spec.containers:
            for p in container.ports or []:
                if p.name == port.target_port:
                    target_port = p.container_port
    return Target(
        service=service.metadata.name,
        pod=ready[0].metadata.name,
        port=int(target_port),
        ready_pods=tuple(p.metadata.name for p in ready),
    )


@contextlib.contextmanager
def port_forward(settings: Settings, pod: str, port: int, *, timeout: float = 30.0) -> Iterator[str]:
    """``http://127.0.0.1:<free port>`` forwarded to ``pod``:``port`` while the block runs."""
    argv = [kubectl_executable()]
    if settings.kubeconfig is not None:
        argv += ["--kubeconfig", str(settings.kubeconfig)]
    if settings.kube_context is not None:
        argv += ["--context", settings.kube_context]
    argv += ["-n", settings.namespace, "port-forward", f"pod/{pod}", f":{port}", "--address", "127.0.0.1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found: list[int] = []
    errors: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = FORWARDING.search(line)
            if match and not found:
                found.append(int(match.group(1)))

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            errors.append(line.strip())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not found:
            if proc.poll() is not None or time.monotonic() > deadline:
                detail = "; ".join(e for e in errors if e) or f"exit code {proc.returncode}"
                raise PortForwardError(
                    f"kubectl port-forward to pod {pod}:{port} in {settings.namespace!r} failed: {detail}"
                )
            time.sleep(0.05)
        yield f"http://127.0.0.1:{found[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def service_url(settings: Settings, component: str, *, release: str | None = None) -> Iterator[str]:
    """A local URL of the namespace's ``component`` Service (one Ready pod of it)."""
    target = find_target(settings, component, release=release)
    with port_forward(settings, target.pod, target.port) as url:
        yield url


def api_key_of(settings: Settings, pod_name: str) -> str | None:
    """The API key a vLLM pod was started with (``--api-key-file`` on a Secret volume), read from that
    Secret; None when the pod takes no key file."""
    import base64
    import posixpath

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(api_client(settings))
    ns = settings.namespace
    try:
        pod = core.read_namespaced_pod(pod_name, ns)
    except ApiException as exc:
        raise KubernetesError(f"cannot read pod {pod_name}: {api_message(exc)}") from None
    for container in pod.spec.containers:
        files = [a.split("=", 1)[1] for a in container.args or [] if a.startswith("--api-key-file=")]
        if not files:
            continue
        path = files[0]
        for mount in container.volume_mounts or []:
            if posixpath.dirname(path) != mount.mount_path.rstrip("/"):
                continue
            volume = next((v for v in pod.spec.volumes or [] if v.name == mount.name), None)
            if volume is None or volume.secret is None:
                continue
            secret_name, key = volume.secret.secret_name, posixpath.basename(path)
            try:
                secret = core.read_namespaced_secret(secret_name, ns)
            except ApiException as exc:
                raise PortForwardError(
                    f"cannot read the vLLM key from Secret {secret_name!r}: {api_message(exc)}",
                    hint="set LORAPLANE_API_KEY to vLLM's key",
                ) from None
            value = (secret.data or {}).get(key)
            if value is None:
                raise PortForwardError(f"Secret {secret_name!r} has no key {key!r} (vLLM's --api-key-file)")
            return base64.b64decode(value).decode().strip()
    return None


@contextlib.contextmanager
def vllm_admin(settings: Settings, *, release: str | None = None) -> Iterator[Settings]:
    """``settings`` with ``server_urls`` a port-forward to each Ready vLLM pod (``server_url`` the
    first), so that a load or promotion reaches every replica or none, and ``api_key`` (unless given)
    the key the pods were started with, read from their Secret."""
    target = find_target(settings, "vllm", release=release)
    key = settings.api_key if settings.api_key is not None else api_key_of(settings, target.pod)
    with contextlib.ExitStack() as forwards:
        urls = tuple(
            forwards.enter_context(port_forward(settings, pod, target.port))
            for pod in target.ready_pods or (target.pod,)
        )
        yield settings.model_copy(update={"server_url": urls[0], "server_urls": urls, "api_key": key})

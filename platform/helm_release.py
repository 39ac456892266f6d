"""The platform's Helm release: install, upgrade, uninstall and read it through pyhelm3 (a real ``helm``).

Values come as ``-f`` files merged in order (maps deep-merged, anything else replaced, as Helm does)
and then ``--set key.path=value`` entries; the merged result goes to ``helm upgrade --install`` on
stdin. ``install`` refuses an existing release and ``upgrade`` a missing one, so neither surprises.
Helm's own failures (no cluster, values rejected by ``values.schema.json``, a failed hook) become one
:class:`HelmError` line: the part of helm's message that says what is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loraplane.common.durations import go_duration
from loraplane.common.errors import ExitCode, InvalidInputError, LoraplaneError
from loraplane.common.settings import Settings

T = TypeVar("T")

DEFAULT_RELEASE = "platform"
GPU_OPERATOR_REPO = "https://helm.ngc.nvidia.com/nvidia"
GPU_OPERATOR_CHART = "gpu-operator"
GPU_OPERATOR_VERSION = "v25.10.0"
GPU_OPERATOR_NAMESPACE = "gpu-operator"
PRIVILEGED_LABELS = {
    f"pod-security.kubernetes.io/{mode}": "privileged" for mode in ("enforce", "audit", "warn")
}
# A release with gpu.mode=operator: NVIDIA's privileged pods share the namespace with the platform's,
# so it enforces `privileged` but still audits and warns at `restricted` (the platform's own pods pass).
OPERATOR_IN_RELEASE_LABELS = {
    "pod-security.kubernetes.io/enforce": "privileged",
    "pod-security.kubernetes.io/audit": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}


class HelmError(LoraplaneError):
    """helm failed: the cluster is unreachable, the chart rejected the values, a hook failed."""


class HelmValuesError(HelmError):
    """The chart's values.schema.json rejected the values: bad input (exit 2)."""

    exit_code = ExitCode.BAD_INPUT


@dataclass(frozen=True)
class ReleaseInfo:
    name: str
    namespace: str
    revision: int
    status: str
    chart: str
    app_version: str | None
    updated: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_chart() -> Path:
    """The chart shipped in this repository (the package root is the repository root)."""
    return Path(__file__).resolve().parents[1] / "charts" / "loraplane"


def helm_executable() -> str:
    """``LORAPLANE_HELM`` when set (and then only it), else the ``helm`` next to this Python (the
    project's .venv/bin), else the one on PATH."""
    explicit = os.environ.get("LORAPLANE_HELM")
    if explicit:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise HelmError(
            f"LORAPLANE_HELM={explicit}: no executable helm there",
            hint="point LORAPLANE_HELM at a helm 3 binary, or unset it to use the one on PATH",
        )
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("helm")
    if found is None:
        raise HelmError(
            "helm is not installed (looked next to this Python and on PATH)",
            hint="install helm 3 (https://helm.sh/docs/intro/install/) or set LORAPLANE_HELM=/path/to/helm",
        )
    return found


# --- values ---------------------------------------------------------------------------------------


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge: maps merge key by key; lists and scalars of ``override`` replace ``base``'s."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_set(entry: str) -> dict[str, Any]:
    """``a.b=v`` (or ``a=1,b.c=x``) as nested values; ``v`` typed as YAML reads it (true, 3, text)."""
    result: dict[str, Any] = {}
    for part in entry.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(
                f"--set {entry!r}: {part!r} is not KEY=VALUE", hint="e.g. --set serving.replicas=2"
            )
        if "[" in key:
            raise InvalidInputError(
                f"--set {entry!r}: list indices are not supported here", hint="put lists in a -f values file"
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw  # `--set a={x}` stays the text it is
        path = key.strip().split(".")
        node = result
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return result


def load_values(files: list[Path], sets: list[str]) -> dict[str, Any]:
    """Values files in order, then ``--set`` entries in order."""
    values: dict[str, Any] = {}
    for path in files:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidInputError(f"-f {path}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"-f {path}: not valid YAML ({exc})") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"-f {path}: a values file is a YAML map, got {type(loaded).__name__}")
        values = merge_values(values, loaded)
    for entry in sets:
        values = merge_values(values, parse_set(entry))
    return values


# --- helm -------------------------------------------------------------------------------------------


def _helm_message(exc: Exception) -> str:
    """helm's stderr without its 'Error: ' prefix and the chatter, on one line."""
    raw = getattr(exc, "stderr", b"")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("WARNING:", "W1", "I1"))] or lines
    message = ""
    for line in (line.removeprefix("Error: ") for line in lines):
        message += line if not message else (" " if message.endswith(":") else "; ") + line
    return message or str(exc)


def _hint(message: str) -> str | None:
    lowered = message.lower()
    if "cluster unreachable" in lowered or "connection refused" in lowered or "no such host" in lowered:
        return "check --kubeconfig/--context (or KUBECONFIG) and that the cluster is up"
    if "schema" in lowered:
        return "fix the value named above (charts/loraplane/values.yaml documents each one)"
    return None


def _run(coro: Coroutine[Any, Any, T], what: str) -> T:
    from pyhelm3 import errors

    try:
        return asyncio.run(coro)
    except errors.Error as exc:
        message = _helm_message(exc)
        if "schema" in message.lower():
            raise HelmValuesError(f"{what}: {message}", hint=_hint(message)) from None
        raise HelmError(f"{what}: {message}", hint=_hint(message)) from None


def _client(settings: Settings) -> Any:
    from pyhelm3 import Client

    # pyhelm3 logs every helm command line and each failure as a warning; the error we raise says
    # what failed, so its log speaks only at -v (INFO) and below.
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("pyhelm3").setLevel(logging.ERROR)
    return Client(
        executable=helm_executable(),
        kubeconfig=settings.kubeconfig,
        kubecontext=settings.kube_context,
        default_timeout="5m",
    )


def _info(revision: Any, chart: Any | None = None) -> ReleaseInfo:
    meta = chart
    return ReleaseInfo(
        name=revision.release.name,
        namespace=revision.release.namespace,
        revision=revision.revision,
        status=str(revision.status.value),
        chart=f"{meta.name}-{meta.version}" if meta is not None else "?",
        app_version=getattr(meta, "app_version", None) if meta is not None else None,
        updated=revision.updated.isoformat(timespec="seconds"),
    )


async def _current(client: Any, release: str, namespace: str) -> Any | None:
    from pyhelm3 import errors

    try:
        return await client.get_current_revision(release, namespace=namespace)
    except errors.ReleaseNotFoundError:
        return None


def release_status(settings: Settings, release: str = DEFAULT_RELEASE) -> ReleaseInfo | None:
    """The release's current revision, or None when it is not installed in the namespace."""

    async def go() -> ReleaseInfo | None:
        client = _client(settings)
        revision = await _current(client, release, settings.namespace)
        if revision is None:
            return None
        return _info(revision, await revision.chart_metadata())

    return _run(go(), f"helm status {release}")


def _chart_min_kube_version(chart_dir: Path) -> str | None:
    """The lowest version the chart's ``kubeVersion`` admits (``>=1.31.0-0`` -> ``1.31.0``)."""
    meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text()) or {}
    constraint = str(meta.get("kubeVersion") or "")
    for part in constraint.replace(",", " ").split():
        if part.startswith(">="):
            return part[2:].split("-")[0]
    return None


def cluster_kube_version(settings: Settings) -> str | None:
    """The API server's version, or None when no cluster answers (no kubeconfig, unreachable)."""
    try:
        from kubernetes import client

        from loraplane.common.kube import api_client

        info = client.VersionApi(api_client(settings)).get_code(_request_timeout=5)
        return str(info.git_version).lstrip("v") or None
    except Exception:  # no kubeconfig, no cluster: a client-side render
        return None


@dataclass
class Rendered:
    manifests: str  # what the release would create, as `helm template` prints it
    kube_version: str  # the Kubernetes version it was rendered for
    kube_version_from: str  # "cluster" or "chart minimum"


def render(
    settings: Settings,
    *,
    release: str = DEFAULT_RELEASE,
    chart: Path | None = None,
    values: dict[str, Any] | None = None,
) -> Rendered:
    """The release's manifests without installing anything (``helm template``), for the cluster's
    Kubernetes version when one answers, else the lowest the chart admits. CRDs included."""
    import subprocess
    import tempfile

    chart_dir = chart or default_chart()
    if not (chart_dir / "Chart.yaml").is_file():
        raise InvalidInputError(
            f"no Helm chart at {chart_dir}", hint="pass --chart DIR (the loraplane chart directory)"
        )
    version, source = cluster_kube_version(settings), "cluster"
    if version is None:
        version, source = _chart_min_kube_version(chart_dir) or "1.31.0", "chart minimum"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        yaml.safe_dump(values or {}, values_file)
        values_file.flush()
        argv = [
            helm_executable(), "template", release, str(chart_dir), "--namespace", settings.namespace,
            "--include-crds", "--kube-version", version, "-f", values_file.name,
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        message = _helm_message(done)  # type: ignore[arg-type]
        error = HelmValuesError if "schema" in message.lower() else HelmError
        raise error(f"helm template {release}: {message}", hint=_hint(message))
    return Rendered(done.stdout, version, source)


def release_values(settings: Settings, release: str = DEFAULT_RELEASE) -> dict[str, Any] | None:
    """The current revision's computed values (the chart's defaults with the user's on top), or None
    when the release is not installed in the namespace."""

    async def go() -> dict[str, Any] | None:
        client = _client(settings)
        revision = await _current(client, release, settings.namespace)
        if revision is None:
            return None
        return dict(await revision.values(computed=True))

    return _run(go(), f"helm get values {release}")


def deploy(
    settings: Settings,
    *,
    upgrade: bool,
    release: str = DEFAULT_RELEASE,
    chart: Path | None = None,
    values: dict[str, Any] | None = None,
    wait: bool = False,
    timeout: float = 300.0,
) -> ReleaseInfo:
    """``install`` (``upgrade=False``: the release must not exist) or ``upgrade`` (it must)."""
    chart_dir = chart or default_chart()
    if not (chart_dir / "Chart.yaml").is_file():
        raise InvalidInputError(
            f"no Helm chart at {chart_dir}", hint="pass --chart DIR (the loraplane chart directory)"
        )
    namespace = settings.namespace

    async def go() -> ReleaseInfo:
        client = _client(settings)
        current = await _current(client, release, namespace)
        if upgrade and current is None:
            raise InvalidInputError(
                f"release {release!r} is not installed in namespace {namespace!r}",
                hint=f"install it first: loraplane -n {namespace} install",
            )
        if not upgrade and current is not None:
            raise InvalidInputError(
                f"release {release!r} is already installed in namespace {namespace!r} "
                f"(revision {current.revision}, {current.status.value})",
                hint=f"change it with: loraplane -n {namespace} upgrade",
            )
        loaded = await client.get_chart(chart_dir)
        revision = await client.install_or_upgrade_release(
            release,
            loaded,
            values or {},
            namespace=namespace,
            create_namespace=not upgrade,
            wait=wait,
            timeout=go_duration(timeout),
        )
        return _info(revision, loaded.metadata)

    return _run(go(), f"helm {'upgrade' if upgrade else 'install'} {release}")


def uninstall(
    settings: Settings, release: str = DEFAULT_RELEASE, *, wait: bool = False, timeout: float = 300.0
) -> None:
    async def go() -> None:
        client = _client(settings)
        current = await _current(client, release, settings.namespace)
        if current is None:
            raise InvalidInputError(
                f"release {release!r} is not installed in namespace {settings.namespace!r}",
                hint="list releases with: helm list -A",
            )
        await client.uninstall_release(
            release, namespace=settings.namespace, wait=wait, timeout=go_duration(timeout)
        )

    _run(go(), f"helm uninstall {release}")


@dataclass(frozen=True)
class GpuOperator:
    repo: str = GPU_OPERATOR_REPO
    version: str | None = GPU_OPERATOR_VERSION
    namespace: str = GPU_OPERATOR_NAMESPACE
    release: str = GPU_OPERATOR_CHART
    values: dict[str, Any] | None = None


def label_privileged_namespace(
    settings: Settings, namespace: str, labels: dict[str, str] | None = None
) -> None:
    """Create ``namespace`` (or relabel it) with Pod Security ``privileged`` (``labels``, default
    PRIVILEGED_LABELS): the operator's driver and toolkit DaemonSets need host access."""
    labels = labels or PRIVILEGED_LABELS
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from loraplane.common.kube import KubernetesError, api_client, api_message

    core: Any = client.CoreV1Api(api_client(settings))
    body = {"metadata": {"name": namespace, "labels": labels}}
    try:
        core.create_namespace(body)
    except ApiException as exc:
        if exc.status != 409:
            raise KubernetesError(f"cannot create namespace {namespace!r}: {api_message(exc)}") from None
        try:
            core.patch_namespace(namespace, {"metadata": {"labels": labels}})
        except ApiException as exc2:
            raise KubernetesError(
                f"cannot label namespace {namespace!r} privileged: {api_message(exc2)}"
            ) from None
    except Exception as exc:  # urllib3: no cluster at that address
        if type(exc).__module__.startswith("urllib3"):
            raise KubernetesError(
                f"cannot reach the Kubernetes API server: {exc}",
                hint="check --kubeconfig/--context (or KUBECONFIG) and that the cluster is up",
            ) from None
        raise


def install_gpu_operator(
    settings: Settings, operator: GpuOperator, *, wait: bool = False, timeout: float = 600.0
) -> ReleaseInfo:
    """NVIDIA's GPU operator chart from its repository, into its own privileged namespace
    (installed, or upgraded when it is there already)."""
    label_privileged_namespace(settings, operator.namespace)

    async def go() -> ReleaseInfo:
        client = _client(settings)
        chart = await client.get_chart(GPU_OPERATOR_CHART, repo=operator.repo, version=operator.version)
        revision = await client.install_or_upgrade_release(
            operator.release,
            chart,
            operator.values or {},
            namespace=operator.namespace,
            create_namespace=False,
            wait=wait,
            timeout=go_duration(timeout),
        )
        return _info(revision, chart.metadata)

    return _run(go(), f"helm install {GPU_OPERATOR_CHART} from {operator.repo}")

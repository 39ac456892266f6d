"""In-cluster evaluations: ``loraplane evals submit`` runs ``loraplane adapters eval`` in a Job next to
the release's vLLM server, and the verdict lands in the registry (the version's LoraAdapter object).

``submit_eval`` checks everything it can here first: the registry is the cluster's, the version
exists and may be evaluated (not retired), the suite and every line of its eval sets (as ``evals run``
reads them), and that they fit in one ConfigMap. Then it reads the release's Job template (the
chart's ``evals`` part: image, ServiceAccount and Role, the label vLLM's NetworkPolicy admits, the
shared volume read-only, vLLM's key as a file) and creates the Job and a ConfigMap holding the suite
and its eval sets, owned by the Job (deleted with it). Nothing is left behind when a step fails.

The pod runs what a person types, ``python -m loraplane.platform.cli adapters eval NAME@vN --suite
/etc/loraplane/eval/suite.yaml``, with the registry, namespace, vLLM's Service and key from its
environment: no port-forward. ``eval_status`` reads the Job and its pods (exit codes, and a failed
run's last log lines, its termination message); ``eval_verdict`` finds the record that Job wrote:
the version's latest evaluation of the same suite (its sha256) made after the Job was created.
"""

from __future__ import annotations

import contextlib
import secrets
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.evals.suite import (
    LoadedSuite,
    load_suite,
    refuse_perplexity_on_shared_servers,
    suite_for_dataset,
)
from loraplane.platform.job_templates import read_job_template
from loraplane.registry.backends import open_registry
from loraplane.registry.model import EvalRecord
from loraplane.registry.version_states import transition

TEMPLATE_COMPONENT = "eval-template"  # the chart's ConfigMap holding job.yaml (templates/evals.yaml)
COMPONENT = "eval"
CONTAINER = "eval"
SUITE_VOLUME = "suite"
SUITE_FILE = "suite.yaml"
REF_PLACEHOLDER = "TO-BE-SET-BY-SUBMIT"
ADAPTER_LABEL = "loraplane.dev/adapter"
VERSION_LABEL = "loraplane.dev/version"
REF_ANNOTATION = "loraplane.dev/ref"
SUITE_ANNOTATION = "loraplane.dev/suite"
SUITE_SHA_ANNOTATION = "loraplane.dev/suite-sha256"
# The API server refuses a ConfigMap whose keys and values add up to more than 1 MiB.
MAX_CONFIGMAP_BYTES = 1024 * 1024
# The record's time is the pod's clock, the Job's the API server's (both in whole seconds).
CLOCK_SLACK = timedelta(seconds=5)

EXIT_MEANINGS = {
    0: "verdict recorded",
    1: "failed: vLLM or the API server could not be reached, or the run did not finish (the log says which)",
    2: "bad input: the suite, the adapter or its files (the log says which); not retried",
    3: "refused: the adapter's weights changed since registration; not retried",
    4: "conflict: the adapter changed meanwhile; retried",
    137: "killed (SIGKILL: out of memory, or the deadline)",
    143: "terminated (SIGTERM)",
}


@dataclass(frozen=True)
class SuiteBundle:
    """The ConfigMap's data: ``suite.yaml`` (eval sets named relative to it) and the eval sets."""

    files: dict[str, str]
    name: str
    sha256: str  # the suite's, as the run in the pod computes it (evals/suite.py LoadedSuite.sha256)
    size: int


@dataclass(frozen=True)
class SubmittedEval:
    job: str
    namespace: str
    ref: str  # NAME@vN: an alias is resolved at submit time
    suite: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalPod:
    name: str
    phase: str
    exit_code: int | None
    meaning: str | None
    message: str | None  # the container's termination message: a failed run's last log lines


@dataclass
class EvalJobStatus:
    job: str
    namespace: str
    ref: str
    suite: str
    suite_sha256: str
    created: str  # the Job's creationTimestamp (ISO 8601)
    state: str  # Running, Succeeded, Failed
    reason: str | None
    message: str | None
    pods: list[EvalPod] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvalJobFailedError(LoraplaneError):
    """The evaluation Job failed; exits with its pod's code when that code has a meaning here."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


def _require_cluster(settings: Settings, ref: str = "REF") -> None:
    if settings.registry != "kubernetes":
        raise InvalidInputError(
            "evals submit/status run the evaluation in a Kubernetes cluster, next to vLLM: pass "
            "--registry kubernetes -n NAMESPACE (or set LORAPLANE_REGISTRY=kubernetes)",
            hint="with the local registry, evaluate from this machine: "
            f"loraplane adapters eval {ref} --suite FILE",
        )


def bundle_suite(loaded: LoadedSuite, source: str) -> SuiteBundle:
    """The suite with each eval set renamed ``eval-N.jsonl`` next to it and a json_schema's
    ``schema_file`` inlined, checked by loading it back exactly as the pod will."""
    raw: dict[str, Any] = loaded.suite.model_dump(mode="json", by_alias=True, exclude_none=True)
    files: dict[str, str] = {}
    for index, spec in enumerate(loaded.suite.datasets):
        path, _ = loaded.datasets[spec.name]
        key = f"eval-{index}.jsonl"
        files[key] = path.read_text(encoding="utf-8")
        dataset = raw["datasets"][index]
        dataset["path"] = key
        for metric in dataset["metrics"]:
            if metric.pop("schema_file", None) is not None:  # one file less to carry
                metric["schema"] = loaded.schemas[spec.name]
    files = {SUITE_FILE: yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), **files}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in files.items())
    if size > MAX_CONFIGMAP_BYTES:
        raise InvalidInputError(
            f"{source}: the suite and its eval sets are {size / 1024:.0f} KiB, more than a ConfigMap holds "
            f"({MAX_CONFIGMAP_BYTES // 1024} KiB), which carries them to the evaluation pod",
            hint="evaluate on a smaller held-out set (a few hundred examples give tight enough intervals), "
            "or from this machine: loraplane adapters eval REF --suite FILE",
        )
    with tempfile.TemporaryDirectory(prefix="loraplane-eval-") as tmp:
        for key, text in files.items():
            (Path(tmp) / key).write_text(text, encoding="utf-8")
        again = load_suite(Path(tmp) / SUITE_FILE)  # what the pod reads
    return SuiteBundle(files=files, name=again.suite.name, sha256=again.sha256, size=size)


def _template(core: Any, namespace: str, release: str) -> dict[str, Any]:
    return read_job_template(
        core,
        namespace,
        release,
        component=TEMPLATE_COMPONENT,
        what="evaluation Job template",
        hint="install or upgrade the chart with serving.enabled=true and evals.enabled=true (the "
        "defaults), or name the release with --release",
    )


def _job_name(name: str, version: str) -> str:
    """``eval-NAME-vN-xxxxx``: the Job's pods are NAME-xxxxx (a DNS label, at most 63)."""
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    return f"{f'eval-{name}-{version}'[:52].rstrip('-')}-{suffix}"


def _string_quantities(container: dict[str, Any]) -> None:
    """Quantities are strings in the API ("1", not 1)."""
    resources = container.get("resources") or {}
    for kind in ("limits", "requests"):
        if resources.get(kind):
            resources[kind] = {k: str(v) for k, v in resources[kind].items()}


def submit_eval(
    settings: Settings,
    ref: str,
    *,
    suite: Path | None = None,
    dataset: Path | None = None,
    release: str = "platform",
) -> SubmittedEval:
    """Create the evaluation Job of ``ref`` with ``suite`` (or the default suite of one ``dataset``)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    _require_cluster(settings, ref)
    if (suite is None) == (dataset is None):
        raise InvalidInputError("give exactly one of --suite FILE or --dataset FILE")
    loaded = load_suite(suite) if suite is not None else suite_for_dataset(dataset)  # type: ignore[arg-type]
    # the Job talks to the release's vLLM pods, never a server of its own
    refuse_perplexity_on_shared_servers(loaded, str(suite or dataset), "an evaluation Job")
    entry = open_registry(settings).read().resolve(ref)
    transition("eval", entry.state, ref=entry.ref, path=entry.path)  # a retired version: refused here
    bundle = bundle_suite(loaded, str(suite or dataset))
    api = api_client(settings)
    core: Any = client.CoreV1Api(api)
    batch: Any = client.BatchV1Api(api)
    namespace = settings.namespace
    job = _template(core, namespace, release)
    name = _job_name(entry.name, entry.version)
    pod = job["spec"]["template"]
    containers = [c for c in pod["spec"]["containers"] if c.get("name") == CONTAINER]
    volumes = [v for v in pod["spec"].get("volumes") or [] if v.get("name") == SUITE_VOLUME]
    command: list[str] = (containers[0].get("command") or []) if containers else []
    if not containers or not volumes or REF_PLACEHOLDER not in command:
        raise InvalidInputError(
            f"the evaluation template of release {release!r} has no {CONTAINER!r} container with "
            f"{REF_PLACEHOLDER} in its command, or no {SUITE_VOLUME!r} volume",
            hint="upgrade the release to this loraplane's chart (loraplane upgrade)",
        )
    containers[0]["command"] = [entry.ref if word == REF_PLACEHOLDER else word for word in command]
    for container in pod["spec"]["containers"]:
        _string_quantities(container)
    volumes[0]["configMap"]["name"] = name
    labels = {ADAPTER_LABEL: entry.name, VERSION_LABEL: entry.version}
    job["metadata"].update(name=name, namespace=namespace)
    job["metadata"].setdefault("labels", {}).update(labels)
    job["metadata"].setdefault("annotations", {}).update(
        {REF_ANNOTATION: entry.ref, SUITE_ANNOTATION: bundle.name, SUITE_SHA_ANNOTATION: bundle.sha256}
    )
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    try:
        uid = batch.create_namespaced_job(namespace, job).metadata.uid
    except ApiException as exc:
        raise KubernetesError(
            f"the API server refused the evaluation Job {name}: {api_message(exc)}"
        ) from None
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/component": COMPONENT, **labels},
            "ownerReferences": [owner],
        },
        "data": bundle.files,
    }
    try:
        core.create_namespaced_config_map(namespace, config_map)
    except ApiException as exc:
        with contextlib.suppress(ApiException):  # the ConfigMap's error is the one to report
            batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        raise KubernetesError(f"cannot store the suite of {name}: {api_message(exc)}") from None
    return SubmittedEval(job=name, namespace=namespace, ref=entry.ref, suite=bundle.name)


def _pod(pod: Any) -> EvalPod:
    code: int | None = None
    message: str | None = None
    for status in pod.status.container_statuses or []:
        if status.name == CONTAINER and status.state and status.state.terminated:
            code = int(status.state.terminated.exit_code)
            message = (status.state.terminated.message or "").strip() or None
    return EvalPod(
        name=pod.metadata.name,
        phase=pod.status.phase or "Unknown",
        exit_code=code,
        meaning=EXIT_MEANINGS.get(code) if code is not None else None,
        message=message,
    )


def eval_status(settings: Settings, job_name: str) -> EvalJobStatus:
    """The Job's state (with the reason when it failed) and each of its pods."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    _require_cluster(settings)
    api = api_client(settings)
    namespace = settings.namespace
    try:
        job: Any = client.BatchV1Api(api).read_namespaced_job(job_name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise InvalidInputError(
                f"no evaluation Job {job_name!r} in namespace {namespace!r}",
                hint=f"list them: kubectl -n {namespace} get jobs -l app.kubernetes.io/component={COMPONENT}",
            ) from None
        raise KubernetesError(f"cannot read Job {job_name}: {api_message(exc)}") from None
    annotations = job.metadata.annotations or {}
    if (job.metadata.labels or {}).get("app.kubernetes.io/component") != COMPONENT or (
        REF_ANNOTATION not in annotations
    ):
        raise InvalidInputError(
            f"Job {job_name!r} is not an evaluation Job (`loraplane evals submit` makes those)"
        )
    try:
        pods: list[Any] = (
            client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
        )
    except ApiException as exc:
        raise KubernetesError(f"cannot list the pods of Job {job_name}: {api_message(exc)}") from None
    state, reason, message = "Running", None, None
    for condition in (job.status.conditions if job.status else None) or []:
        done = {"Complete": "Succeeded", "Failed": "Failed"}.get(condition.type)
        if done and condition.status == "True":
            state, reason, message = done, condition.reason, condition.message
    created = job.metadata.creation_timestamp
    return EvalJobStatus(
        job=job_name,
        namespace=namespace,
        ref=annotations[REF_ANNOTATION],
        suite=annotations.get(SUITE_ANNOTATION, ""),
        suite_sha256=annotations.get(SUITE_SHA_ANNOTATION, ""),
        created=created.isoformat() if created else "",
        state=state,
        reason=reason,
        message=message,
        pods=[_pod(p) for p in sorted(pods, key=lambda p: (p.metadata.creation_timestamp, p.metadata.name))],
    )


def eval_verdict(settings: Settings, status: EvalJobStatus) -> EvalRecord | None:
    """The evaluation the Job recorded: the version's latest of the same suite since the Job began."""
    entry = open_registry(settings).read().resolve(status.ref)
    since = datetime.fromisoformat(status.created) - CLOCK_SLACK
    found = [
        record
        for record in entry.evals
        if record.suite_sha256 == status.suite_sha256 and datetime.fromisoformat(record.created_at) >= since
    ]
    return found[-1] if found else None


def _log_tail(settings: Settings, pod: str, lines: int = 20) -> str | None:
    """The last lines of a pod's log, or None when it cannot be read (the pod is gone, no kubelet)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        text = client.CoreV1Api(api_client(settings)).read_namespaced_pod_log(
            pod, settings.namespace, container=CONTAINER, tail_lines=lines, _request_timeout=10
        )
    except (ApiException, HTTPError, ValueError):
        return None
    return str(text).strip() or None


def finished_verdict(settings: Settings, status: EvalJobStatus) -> EvalRecord:
    """The verdict of a Job that ended; raises when it failed (naming its pod's exit code and last log
    lines) or recorded nothing."""
    follow = f"kubectl -n {status.namespace} logs job/{status.job}"
    if status.state == "Running":
        raise InvalidInputError(
            f"evaluation Job {status.job} is still running",
            hint=f"wait for it: loraplane evals status {status.job}, or {follow} -f",
        )
    if status.state == "Failed":
        ended = [p for p in status.pods if p.exit_code is not None]
        lines = [f"evaluation Job {status.job} of {status.ref} failed: {status.reason}: {status.message}"]
        code = 1
        if ended:
            last = ended[-1]
            lines.append(f"  pod {last.name} exited {last.exit_code} ({last.meaning or 'see its log'})")
            tail = last.message or _log_tail(settings, last.name)
            if tail:
                lines.append("  its last log lines:")
                lines += [f"    {line}" for line in tail.splitlines()[-20:]]
            code = last.exit_code if last.exit_code in (2, 3, 4) else 1
        raise EvalJobFailedError("\n".join(lines), hint=f"its whole log: {follow}", exit_code=code)
    record = eval_verdict(settings, status)
    if record is None:
        raise LoraplaneError(
            f"evaluation Job {status.job} succeeded, but {status.ref} has no evaluation of suite "
            f"{status.suite!r} recorded since the Job started",
            hint=f"see what the pod printed: {follow}",
        )
    return record


def wait_for_eval(settings: Settings, job_name: str, *, timeout: float, poll: float = 2.0) -> EvalJobStatus:
    """Poll the Job until it Succeeded or Failed (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while True:
        status = eval_status(settings, job_name)
        if status.state != "Running":
            return status
        if time.monotonic() > deadline:
            raise LoraplaneError(
                f"evaluation Job {job_name} still running after {timeout:.0f} s",
                hint=f"it keeps running; check it later with: loraplane evals status {job_name}",
            )
        time.sleep(poll)

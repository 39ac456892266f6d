"""Training runs on Kubernetes: one Job per run, made from the training template the chart installs.

``submit_training`` validates the run's config here (the trainer's own checks of every value, before
anything reaches the cluster), resolves what only the CLI user can read (a pushed dataset's path, a DPO
``base_adapter`` in the registry: passed to the pod as ``LORAPLANE_BASE_ADAPTER``), reads the template
ConfigMap of the Helm release, and creates the Job and a ConfigMap with the run's config owned by the
Job (deleted with it). A multi-node template may be a JobSet (trainer.gang.backend): the same steps, on
the JobSet and its one replicated Job's pods.
``training_status`` reads the Job's conditions and its pods' exit codes and says what they mean;
``cancel_training`` deletes the Job (its pods get SIGTERM: the trainer saves a checkpoint and exits 75).
"""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraplane.common.errors import ConfigError, InvalidInputError, LoraplaneError
from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.platform.job_templates import read_job_template
from loraplane.trainer.config import load_config
from loraplane.trainer.dpo import BASE_ADAPTER_ENV, resolve_for_submit
from loraplane.trainer.exit_codes import DO_NOT_RETRY, FAILED, PEER_LOST, PREEMPTED, SUCCESS

TEMPLATE_COMPONENT = "trainer-template"
RUN_CONFIG_VOLUME = "run-config"
ADAPTER_LABEL = "loraplane.dev/adapter"
TRAINER_CONTAINER = "trainer"
TRAINER_MODULE = "loraplane.trainer"
REPORT_MODULE = "loraplane.platform.run_report"
JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

EXIT_MEANINGS = {
    SUCCESS: "published",
    FAILED: "failed; a retry may fix it (Job retries up to backoffLimit)",
    DO_NOT_RETRY: "do not retry: the data, config or base model is wrong (the log says which)",
    PREEMPTED: "preempted: a checkpoint was saved; the next attempt resumes from it",
    PEER_LOST: "lost pod 0 (the rendezvous host): the whole gang restarts (not counted)",
    137: "killed (SIGKILL: out of memory, or the grace period ran out)",
    143: "terminated (SIGTERM) before the trainer could save",
}

# Paths in a run's config are read inside the pod: on the shared volume, not on this machine.
_PATH_FIELDS = (
    ("dataset", "path"),
    ("dataset", "eval_path"),
    ("base_model", "chat_template"),
    ("output", "adapters_root"),
    ("output", "run_dir"),
)


@dataclass(frozen=True)
class SubmittedRun:
    job: str
    namespace: str
    adapter: str


@dataclass
class PodState:
    name: str
    phase: str
    node: str | None
    exit_code: int | None
    meaning: str | None
    index: int | None = None  # the node rank slot of a multi-node run (JOB_COMPLETION_INDEX)


@dataclass
class RunStatus:
    job: str
    namespace: str
    adapter: str | None
    state: str  # Running, Succeeded, Failed
    reason: str | None
    message: str | None
    active: int
    succeeded: int
    failed: int
    pods: list[PodState] = field(default_factory=list)
    kind: str = "Job"  # or JobSet (a multi-node run with trainer.gang.backend=jobset)
    nodes: int = 1
    restarts: int = 0  # JobSet: whole-gang restarts so far

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_cluster_paths(config_path: Path) -> None:
    """Refuse relative paths in a config a cluster run will read (they name files on the volume)."""
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{config_path}: cannot read the config: {exc}") from None
    if not isinstance(raw, dict):
        return  # load_config names the problem
    relative = [
        f"{section}.{key}: {raw[section][key]!r}"
        for section, key in _PATH_FIELDS
        if isinstance(raw.get(section), dict)
        and isinstance(raw[section].get(key), str)
        and not raw[section][key].startswith("/")
    ]
    model = raw.get("base_model", {}).get("path") if isinstance(raw.get("base_model"), dict) else None
    if isinstance(model, str) and model.startswith("."):
        relative.append(f"base_model.path: {model!r}")
    if relative:
        raise ConfigError(
            f"{config_path}: a run in the cluster reads its files from the shared volume, so these paths "
            "must be absolute (e.g. /data/datasets/train.jsonl):\n  " + "\n  ".join(relative)
        )


def _job_name(adapter: str, *, jobset: bool = False) -> str:
    """A Job's pods are NAME-INDEX-xxxxx, hostnamed NAME-INDEX; a JobSet's NAME-node-0-INDEX: a DNS label."""
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    return f"train-{adapter[: 36 if jobset else 46].rstrip('-')}-{suffix}"


def _is_jobset(obj: dict[str, Any]) -> bool:
    return obj.get("kind") == "JobSet"


def _pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a Job, or of a JobSet's (one) replicated Job."""
    if _is_jobset(obj):
        template: dict[str, Any] = obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        return template
    pod: dict[str, Any] = obj["spec"]["template"]
    return pod


def _with_report(command: list[str]) -> list[str]:
    """The trainer's ``-m loraplane.trainer`` (also behind torchrun's launcher) through run_report."""
    for i in range(len(command) - 1):
        if command[i : i + 2] == ["-m", TRAINER_MODULE]:
            return [*command[: i + 1], REPORT_MODULE, *command[i + 2 :]]
    return command


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") != name]
    container["env"] = [*env, {"name": name, "value": value}]


def _template(core: Any, namespace: str, release: str) -> dict[str, Any]:
    return read_job_template(
        core,
        namespace,
        release,
        component=TEMPLATE_COMPONENT,
        what="training template",
        hint="install the chart with trainer.enabled=true, or name the release with --release",
    )


def submit_training(
    settings: Settings, config_path: Path, overrides: list[str] | None = None, *, release: str = "platform"
) -> SubmittedRun:
    """Create the Job of one training run; nothing is left behind when any step fails."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    check_cluster_paths(config_path)
    config = load_config(config_path, overrides)  # every value checked before the cluster sees it
    if config.dataset.pushed is not None:  # the run's stored config names the exact file
        from loraplane.platform.data_push import resolve_pushed

        pushed = resolve_pushed(settings, config.dataset.pushed, method=config.method)
        dataset = config.dataset.model_copy(update={"pushed": None, "path": Path(pushed["path"])})
        config = config.model_copy(update={"dataset": dataset})
    # DPO from NAME@vN: resolved here with this user's registry access (the pod has no API token) and
    # handed to the trainer, which verifies the weights again before it trains
    base_adapter = resolve_for_submit(settings, config)
    api = api_client(settings)
    core: Any = client.CoreV1Api(api)
    batch: Any = client.BatchV1Api(api)
    namespace = settings.namespace
    job = _template(core, namespace, release)
    jobset = _is_jobset(job)
    name = _job_name(config.output.name, jobset=jobset)
    job["metadata"]["name"] = name
    job["metadata"]["namespace"] = namespace
    job["metadata"].setdefault("labels", {})[ADAPTER_LABEL] = config.output.name
    pod = _pod_template(job)
    pod["metadata"].setdefault("labels", {})[ADAPTER_LABEL] = config.output.name
    for container in pod["spec"]["containers"]:  # quantities are strings in the API ("1", not 1)
        for kind in ("limits", "requests"):
            amounts = container.get("resources", {}).get(kind) or {}
            container["resources"][kind] = {k: str(v) for k, v in amounts.items()} if amounts else None
            if container["resources"][kind] is None:
                del container["resources"][kind]
    for container in pod["spec"]["containers"]:  # the trainer, reporting what it published
        container["command"] = _with_report(container.get("command") or [])
        if base_adapter is not None and container.get("name") == TRAINER_CONTAINER:
            _set_env(container, BASE_ADAPTER_ENV, base_adapter.to_env())
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    if RUN_CONFIG_VOLUME not in volumes:
        raise InvalidInputError(
            f"the training template of release {release!r} has no {RUN_CONFIG_VOLUME!r} volume"
        )
    volumes[RUN_CONFIG_VOLUME]["configMap"]["name"] = name
    run_config = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    try:
        if jobset:
            custom: Any = client.CustomObjectsApi(api)
            created = custom.create_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, job
            )
            uid = created["metadata"]["uid"]
        else:
            uid = batch.create_namespaced_job(namespace, job).metadata.uid
    except ApiException as exc:
        kind = "JobSet" if jobset else "Job"
        hint = "is JobSet installed? (trainer.gang.backend=job renders an Indexed Job)" if jobset else None
        raise KubernetesError(
            f"the API server refused the training {kind} {name}: {api_message(exc)}", hint=hint
        ) from None
    owner = {"apiVersion": job["apiVersion"], "kind": job["kind"], "name": name, "uid": uid}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {ADAPTER_LABEL: config.output.name}, "ownerReferences": [owner]},
        "data": {"train.yaml": run_config},
    }
    try:
        core.create_namespaced_config_map(namespace, config_map)
    except ApiException as exc:
        _delete_run(api, namespace, name, propagation="Background")
        raise KubernetesError(f"cannot store the run's config for {name}: {api_message(exc)}") from None
    return SubmittedRun(job=name, namespace=namespace, adapter=config.output.name)


def _pod_state(pod: Any) -> PodState:
    code = None
    for status in pod.status.container_statuses or []:
        if status.name == "trainer" and status.state and status.state.terminated:
            code = int(status.state.terminated.exit_code)
    index = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION)
    return PodState(
        name=pod.metadata.name,
        phase=pod.status.phase or "Unknown",
        node=pod.spec.node_name,
        exit_code=code,
        meaning=EXIT_MEANINGS.get(code) if code is not None else None,
        index=int(index) if index is not None and index.isdigit() else None,
    )


def _no_run(job_name: str, namespace: str) -> InvalidInputError:
    return InvalidInputError(
        f"no training Job {job_name!r} in namespace {namespace!r}",
        hint="list runs with: kubectl get jobs,jobsets -l app.kubernetes.io/component=trainer",
    )


def _read_run(api: Any, namespace: str, job_name: str) -> tuple[str, dict[str, Any]]:
    """``(kind, object as a dict)`` of the run named ``job_name``: its Job, else its JobSet."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        job = client.BatchV1Api(api).read_namespaced_job(job_name, namespace)
        found: dict[str, Any] = api.sanitize_for_serialization(job)
        return "Job", found
    except ApiException as exc:
        if exc.status != 404:
            raise KubernetesError(f"cannot read Job {job_name}: {api_message(exc)}") from None
    try:
        custom: Any = client.CustomObjectsApi(api)
        jobset: dict[str, Any] = custom.get_namespaced_custom_object(
            JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, job_name
        )
    except ApiException as exc:
        if exc.status == 404:  # also: no JobSet API on this cluster
            raise _no_run(job_name, namespace) from None
        raise KubernetesError(f"cannot read JobSet {job_name}: {api_message(exc)}") from None
    return "JobSet", jobset


def _pod_selector(kind: str, job_name: str) -> str:
    return f"{JOBSET_NAME_LABEL}={job_name}" if kind == "JobSet" else f"job-name={job_name}"


def _run_state(kind: str, obj: dict[str, Any]) -> tuple[str, str | None, str | None]:
    done = {"Job": {"Complete": "Succeeded", "Failed": "Failed"}, "JobSet": {"Completed": "Succeeded"}}
    done["JobSet"]["Failed"] = "Failed"
    for condition in (obj.get("status") or {}).get("conditions") or []:
        state = done[kind].get(condition.get("type", ""))
        if condition.get("status") == "True" and state:
            return state, condition.get("reason"), condition.get("message")
    return "Running", None, None


def training_status(settings: Settings, job_name: str) -> RunStatus:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = api_client(settings)
    core: Any = client.CoreV1Api(api)
    namespace = settings.namespace
    kind, obj = _read_run(api, namespace, job_name)
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=_pod_selector(kind, job_name)).items
    except ApiException as exc:
        raise KubernetesError(f"cannot list the pods of {kind} {job_name}: {api_message(exc)}") from None
    state, reason, message = _run_state(kind, obj)
    status = obj.get("status") or {}
    if kind == "JobSet":
        spec = obj["spec"]["replicatedJobs"][0]["template"]["spec"]
        phases = [p.status.phase for p in pods]
        counts = (phases.count("Running") + phases.count("Pending"), phases.count("Succeeded"))
        failed = phases.count("Failed")
    else:
        spec = obj["spec"]
        counts = (status.get("active") or 0, status.get("succeeded") or 0)
        failed = status.get("failed") or 0
    return RunStatus(
        job=job_name,
        namespace=namespace,
        adapter=(obj["metadata"].get("labels") or {}).get(ADAPTER_LABEL),
        state=state,
        reason=reason,
        message=message,
        active=counts[0],
        succeeded=counts[1],
        failed=failed,
        pods=sorted((_pod_state(p) for p in pods), key=lambda p: p.name),
        kind=kind,
        nodes=int(spec.get("completions") or 1),
        restarts=int(status.get("restarts") or 0),
    )


def _delete_run(api: Any, namespace: str, job_name: str, *, propagation: str) -> str:
    """Delete the run's Job (or JobSet); its kind. InvalidInputError when there is neither."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.BatchV1Api(api).delete_namespaced_job(job_name, namespace, propagation_policy=propagation)
        return "Job"
    except ApiException as exc:
        if exc.status != 404:
            raise KubernetesError(f"cannot delete Job {job_name}: {api_message(exc)}") from None
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSET_PLURAL, job_name, propagation_policy=propagation
        )
    except ApiException as exc:
        if exc.status == 404:
            raise _no_run(job_name, namespace) from None
        raise KubernetesError(f"cannot delete JobSet {job_name}: {api_message(exc)}") from None
    return "JobSet"


def cancel_training(settings: Settings, job_name: str) -> None:
    """Delete the Job (or JobSet); its pods get SIGTERM (the trainer checkpoints and exits 75), then go."""
    _delete_run(api_client(settings), settings.namespace, job_name, propagation="Foreground")


def _job_pods(core: Any, namespace: str, job_name: str, kind: str = "Job") -> list[Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        pods = core.list_namespaced_pod(namespace, label_selector=_pod_selector(kind, job_name)).items
    except ApiException as exc:
        raise KubernetesError(f"cannot list the pods of {kind} {job_name}: {api_message(exc)}") from None
    return sorted(pods, key=lambda p: (p.metadata.creation_timestamp, p.metadata.name))


def training_logs(
    settings: Settings, job_name: str, *, follow: bool = False, wait_seconds: float = 120.0
) -> Iterator[str]:
    """The trainer's log lines of the run's newest pod; with ``follow``, until the container ends.

    A pod that has not started yet is waited for (up to ``wait_seconds``)."""
    from kubernetes import client

    core: Any = client.CoreV1Api(api_client(settings))
    namespace = settings.namespace
    kind = training_status(settings, job_name).kind  # a clear error for an unknown Job
    deadline = time.monotonic() + wait_seconds
    while True:
        pods = [p for p in _job_pods(core, namespace, job_name, kind) if p.status.phase != "Pending"]
        if pods:
            break
        if time.monotonic() > deadline:
            raise InvalidInputError(
                f"no started pod of Job {job_name!r} after {wait_seconds:.0f} s",
                hint=f"see why: kubectl -n {namespace} describe pods -l {_pod_selector(kind, job_name)}",
            )
        time.sleep(0.5)
    yield from _pod_log(core, namespace, pods[-1].metadata.name, follow=follow)


def _pod_log(core: Any, namespace: str, pod: str, *, follow: bool = False) -> Iterator[str]:
    from kubernetes.client.exceptions import ApiException

    try:
        response = core.read_namespaced_pod_log(
            pod, namespace, container=TRAINER_CONTAINER, follow=follow, _preload_content=False
        )
    except ApiException as exc:
        raise KubernetesError(f"cannot read the log of pod {pod}: {api_message(exc)}") from None
    pending = b""
    try:
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")
    finally:
        response.release_conn()


def published_result(settings: Settings, job_name: str) -> dict[str, Any]:
    """What a succeeded run published, from the ``run_report`` line in its pod's log."""
    status = training_status(settings, job_name)
    if status.state != "Succeeded":
        raise InvalidInputError(
            f"training Job {job_name!r} has not succeeded ({status.state}); nothing to register",
            hint=f"follow it: loraplane train logs {job_name} -f",
        )
    from loraplane.platform.run_report import RESULT_PREFIX

    result = None
    if status.nodes > 1:  # the pod of global rank 0 printed it: any pod of the run
        from kubernetes import client

        core: Any = client.CoreV1Api(api_client(settings))
        for pod in reversed(status.pods):
            if pod.phase == "Succeeded" and result is None:
                for line in _pod_log(core, settings.namespace, pod.name):
                    if line.startswith(RESULT_PREFIX):
                        result = json.loads(line[len(RESULT_PREFIX) :])
    else:
        for line in training_logs(settings, job_name):
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX) :])
    if not isinstance(result, dict):
        raise InvalidInputError(
            f"the log of Job {job_name!r} has no '{RESULT_PREFIX.strip()}' line: the adapter it published "
            "is unknown here",
            hint="register it from a machine that mounts the volume: loraplane adapters register PATH",
        )
    return result


def register_published(settings: Settings, result: dict[str, Any], *, job: str) -> tuple[Any, bool]:
    """Record the published version once: ``(entry, True)`` when this call registered it, ``(entry,
    False)`` when it was registered already with the same weights. Other weights under the same
    version are refused (versions are immutable)."""
    from loraplane.registry.backends import open_registry
    from loraplane.registry.model import REF_PATTERN, Adapter, AdapterVersion, HistoryEvent, RegistryError

    try:
        entry = AdapterVersion(
            name=result["name"],
            version=result["version"],
            served_name=f"{result['name']}@{result['version']}",
            path=result["path"],
            weights_sha256=result["weights_sha256"],
            base_model=result.get("base_model"),
            manifest=result.get("manifest") or {},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"the result line of Job {job!r} is incomplete: {exc}") from None
    if not REF_PATTERN.match(entry.ref) or not entry.path.startswith("/"):
        raise InvalidInputError(f"the result line of Job {job!r} names {entry.ref} at {entry.path!r}")
    with open_registry(settings).transaction() as state:
        adapter = state.adapters.setdefault(entry.name, Adapter(name=entry.name))
        existing = adapter.versions.get(entry.version)
        if existing is not None:
            if existing.weights_sha256 != entry.weights_sha256:
                raise RegistryError(
                    f"{entry.ref} is already registered with other weights (sha256 "
                    f"{existing.weights_sha256[:12]}…, this run's {entry.weights_sha256[:12]}…)",
                    hint="versions are immutable: publish the new weights as a new version",
                )
            return existing, False
        adapter.versions[entry.version] = entry
        state.history.append(
            HistoryEvent(
                action="register", adapter=entry.name, version=entry.version, reason=f"training Job {job}"
            )
        )
    return entry, True


def wait_for_training(settings: Settings, job_name: str, *, timeout: float) -> RunStatus:
    """Poll the Job until it Succeeded or Failed (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while True:
        status = training_status(settings, job_name)
        if status.state != "Running":
            return status
        if time.monotonic() > deadline:
            raise LoraplaneError(
                f"training Job {job_name} still running after {timeout:.0f} s",
                hint=f"it keeps running; check it later with: loraplane train status {job_name}",
            )
        time.sleep(2.0)

"""`loraplane train submit | status | cancel` against a live API server, with the chart's Job template.

kwok runs no containers: a Job's pod becomes Running, then Succeeded, or Failed with the exit code a
test puts in the pod annotation ``loraplane.dev/test-exit-code`` (tools/k8s/kwok-stages.yaml). The
chart value ``trainer.podAnnotations`` carries it into the template, as it would carry a real
annotation such as cluster-autoscaler's safe-to-evict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, Cluster

from loraplane.common.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

CHART = ROOT / "charts" / "loraplane"
RELEASE = "platform"
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.fixture(scope="module")
def release(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chart installed (vLLM off) in a namespace that enforces Pod Security ``restricted``."""
    ns = k8s_cluster.restricted_namespace("lp-train")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    _install(k8s_cluster, ns, tmp_path_factory.mktemp("values"), annotations={})
    return ns


def _install(cluster: Cluster, ns: str, work: Path, *, annotations: dict[str, str]) -> None:
    values = {
        "serving": {"enabled": False},
        "global": {"storage": {"create": False, "existingClaim": "models"}},
        "trainer": {"tolerations": TOLERATE_GPU, "podAnnotations": annotations},
    }
    path = work / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    cluster.helm("upgrade", "--install", RELEASE, str(CHART), "-n", ns, "-f", str(path), "--wait")


def _config(tmp_path: Path, **paths: str) -> Path:
    config = {
        "base_model": {"path": paths.get("base", "/data/models/base")},
        "dataset": {"path": paths.get("dataset", "/data/datasets/support/train.jsonl")},
        "lora": {"r": 16, "alpha": 32},
        "training": {"epochs": 2},
        "output": {"adapters_root": "/data/adapters", "name": "support-bot"},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(cluster: Cluster, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "loraplane.platform.cli", "--registry", "kubernetes", "-n", ns, *args]
    return subprocess.run(argv, capture_output=True, text=True, env={**cluster.env(), "COLUMNS": "200"})


def _submit(cluster: Cluster, ns: str, config: Path, *extra: str) -> str:
    result = _cli(cluster, ns, "train", "submit", str(config), *extra, "-o", "json")
    assert result.returncode == 0, result.stderr
    job: str = json.loads(result.stdout)["job"]
    return job


def _status(cluster: Cluster, ns: str, job: str) -> dict[str, Any]:
    result = _cli(cluster, ns, "train", "status", job, "--no-register", "-o", "json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_a_submitted_run_is_a_hardened_job_from_the_template_and_succeeds(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    ns = release
    job = _submit(k8s_cluster, ns, _config(tmp_path), "training.learning_rate=0.001")
    assert job.startswith("train-support-bot-")
    k8s_cluster.wait_for(lambda: _status(k8s_cluster, ns, job)["state"] == "Succeeded", what="the run")
    status = _status(k8s_cluster, ns, job)
    assert status["adapter"] == "support-bot" and status["succeeded"] == 1
    (pod,) = status["pods"]
    assert (pod["exit_code"], pod["meaning"]) == (0, "published")
    assert pod["node"].startswith("gpu-node-"), "the trainer asks for a GPU"

    spec = json.loads(k8s_cluster.kubectl("-n", ns, "get", "job", job, "-o", "json").stdout)["spec"]
    from loraplane.trainer.exit_codes import DO_NOT_RETRY

    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [DO_NOT_RETRY]},
    }
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    pod_spec = spec["template"]["spec"]
    container = pod_spec["containers"][0]
    # The trainer runs through run_report, which prints what it published for `train status` to read.
    assert container["command"][1:] == [
        "-m", "loraplane.platform.run_report", "--config", "/etc/loraplane/run/train.yaml",
    ]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec["automountServiceAccountToken"] is False
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod_spec["volumes"]

    # The run's config, validated and completed with defaults, lives in a ConfigMap the Job owns.
    cm = json.loads(k8s_cluster.kubectl("-n", ns, "get", "configmap", job, "-o", "json").stdout)
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "Job"
    run = yaml.safe_load(cm["data"]["train.yaml"])
    assert run["training"]["learning_rate"] == 0.001 and run["training"]["epochs"] == 2
    assert run["checkpoints"]["keep_last"] == 2, "defaults are spelled out"

    assert _cli(k8s_cluster, ns, "train", "cancel", job).returncode == 0
    k8s_cluster.wait_for(
        lambda: k8s_cluster.kubectl("-n", ns, "get", "job", job, check=False).returncode != 0,
        what="the Job to go",
    )


def test_a_run_that_exits_do_not_retry_fails_at_once_and_status_says_why(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    ns = release
    _install(k8s_cluster, ns, tmp_path, annotations={"loraplane.dev/test-exit-code": "2"})
    try:
        job = _submit(k8s_cluster, ns, _config(tmp_path))
        k8s_cluster.wait_for(
            lambda: _status(k8s_cluster, ns, job)["state"] == "Failed", what="the run to fail"
        )
        # submit --wait waits for the end and fails with the reason (nothing is registered).
        waited = _cli(
            k8s_cluster, ns, "train", "submit", str(_config(tmp_path)), "--wait", "--timeout", "120"
        )
        assert waited.returncode == 1, waited.stderr
        assert (
            "failed: PodFailurePolicy" in waited.stderr and "train logs train-support-bot-" in waited.stderr
        )
    finally:
        _install(k8s_cluster, ns, tmp_path, annotations={})
    status = _status(k8s_cluster, ns, job)
    assert status["reason"] == "PodFailurePolicy" and status["failed"] == 1, "no retry (backoffLimit is 4)"
    assert "exit code 2 matching FailJob rule" in status["message"]
    (pod,) = status["pods"]
    assert pod["exit_code"] == 2 and pod["meaning"].startswith("do not retry")
    shown = _cli(k8s_cluster, ns, "train", "status", job)
    assert "Failed: PodFailurePolicy" in shown.stdout and "do not retry" in shown.stdout


def test_bad_submissions_are_refused_before_anything_is_created(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    ns = release
    before = k8s_cluster.kubectl("-n", ns, "get", "jobs,configmaps", "-o", "name").stdout

    relative = _cli(k8s_cluster, ns, "train", "submit", str(_config(tmp_path, dataset="data/train.jsonl")))
    assert relative.returncode == 2
    assert "must be absolute" in relative.stderr and "dataset.path: 'data/train.jsonl'" in relative.stderr

    invalid = _cli(k8s_cluster, ns, "train", "submit", str(_config(tmp_path)), "lora.r=7")
    assert invalid.returncode == 2 and "lora.r: got 7" in invalid.stderr and "use r=8" in invalid.stderr

    no_release = _cli(k8s_cluster, ns, "train", "submit", str(_config(tmp_path)), "--release", "other")
    assert no_release.returncode == 2 and "no training template of Helm release 'other'" in no_release.stderr

    local = subprocess.run(
        [sys.executable, "-m", "loraplane.platform.cli", "train", "status", "x"],
        capture_output=True,
        text=True,
        env={**k8s_cluster.env(), "LORAPLANE_REGISTRY": "local", "COLUMNS": "200"},
    )
    assert local.returncode == 2 and "run on a Kubernetes cluster" in local.stderr

    assert k8s_cluster.kubectl("-n", ns, "get", "jobs,configmaps", "-o", "name").stdout == before
    for result in (relative, invalid, no_release, local):
        assert "Traceback" not in result.stderr


def test_an_evicted_training_pod_does_not_count_against_the_retry_budget(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    """A drain or a preemption evicts the pod: the Job starts another (it resumes from its checkpoint)."""
    ns = release
    _install(k8s_cluster, ns, tmp_path, annotations={"loraplane.dev/test-keep-running": "true"})
    try:
        job = _submit(k8s_cluster, ns, _config(tmp_path))

        def running() -> list[str]:
            return [p["name"] for p in _status(k8s_cluster, ns, job)["pods"] if p["phase"] == "Running"]

        k8s_cluster.wait_for(lambda: len(running()) == 1, what="the trainer pod")
        (first,) = running()
        k8s_cluster.evict(ns, first)
        k8s_cluster.wait_for(lambda: running() not in ([], [first]), timeout=60, what="a replacement pod")
        status = _status(k8s_cluster, ns, job)
        assert status["state"] == "Running" and status["failed"] == 0, status
        _cli(k8s_cluster, ns, "train", "cancel", job)
    finally:
        _install(k8s_cluster, ns, tmp_path, annotations={})


def _cri(stream: str, text: str) -> str:
    """One line of a container log as the kubelet (and kwok's Logs) stores it: CRI format."""
    return f"2026-01-01T00:00:00.000000000Z {stream} F {text}\n"


def _serve_log(cluster: Cluster, ns: str, pod: str, log_file: Path) -> None:
    """kwok's Logs resource: the API server's pods/log of ``pod`` reads ``log_file`` (followed)."""
    logs = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Logs",
        "metadata": {"name": pod, "namespace": ns},
        "spec": {"logs": [{"containers": ["trainer"], "logsFile": str(log_file), "follow": True}]},
    }
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(logs))


def _published_adapter(tmp_path: Path, name: str, version: str) -> dict[str, Any]:
    """The result line run_report prints for an adapter directory (real files, real sha256)."""
    from support import write_fake_adapter

    from loraplane.common.files import sha256_file
    from loraplane.platform.run_report import published

    adapter = write_fake_adapter(tmp_path / "adapters" / name / version)
    manifest = {
        "name": name,
        "version": version,
        "base_model": {"path": "/data/models/base"},
        "weights_sha256": sha256_file(adapter / "adapter_model.safetensors"),
    }
    (adapter / "manifest.json").write_text(json.dumps(manifest))
    trainer_stdout = json.dumps(
        {"adapter": str(adapter), "name": name, "version": version, "already_published": False}
    )
    result = published("some other output\n" + trainer_stdout + "\n")
    assert result is not None and result["weights_sha256"] == manifest["weights_sha256"]
    return result


def test_logs_are_streamed_and_a_succeeded_run_is_registered_exactly_once(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    """The pod's log comes through the API server (kwok serves it from a file); `train status` reads
    the run_report line from it and registers the version in the cluster's registry, once."""
    from loraplane.platform.run_report import RESULT_PREFIX

    ns = release
    k8s_cluster.kubectl("apply", "-f", str(ROOT / "charts" / "loraplane" / "crds"))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/loraadapters.loraplane.dev")
    _install(k8s_cluster, ns, tmp_path, annotations={"loraplane.dev/test-keep-running": "true"})
    try:
        job = _submit(k8s_cluster, ns, _config(tmp_path))

        def pods() -> list[dict[str, Any]]:
            return [p for p in _status(k8s_cluster, ns, job)["pods"] if p["phase"] == "Running"]

        k8s_cluster.wait_for(lambda: len(pods()) == 1, what="the trainer pod")
        pod = pods()[0]["name"]
        log_file = tmp_path / "trainer.log"
        log_file.write_text(_cri("stderr", '{"step": 1, "loss": 2.5}'))
        _serve_log(k8s_cluster, ns, pod, log_file)

        # -f: a line written after the command started arrives while it runs.
        argv = [sys.executable, "-m", "loraplane.platform.cli", "--registry", "kubernetes", "-n", ns]
        follow = subprocess.Popen(
            [*argv, "train", "logs", job, "-f"], stdout=subprocess.PIPE, text=True, env=k8s_cluster.env()
        )
        try:
            assert follow.stdout is not None
            assert follow.stdout.readline() == '{"step": 1, "loss": 2.5}\n'
            with log_file.open("a") as f:
                f.write(_cri("stderr", '{"step": 2, "loss": 1.25}'))
            assert follow.stdout.readline() == '{"step": 2, "loss": 1.25}\n'
        finally:
            follow.kill()
            follow.wait()

        # Still running: nothing to register yet.
        early = _cli(k8s_cluster, ns, "train", "register", job)
        assert early.returncode == 2 and "has not succeeded (Running)" in early.stderr

        result = _published_adapter(tmp_path, "support-bot", "v7")
        with log_file.open("a") as f:
            f.write(_cri("stdout", RESULT_PREFIX + json.dumps(result)))
        plain = _cli(k8s_cluster, ns, "train", "logs", job)
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.splitlines()[-1].startswith(RESULT_PREFIX)
        assert len(plain.stdout.splitlines()) == 3
    finally:
        _install(k8s_cluster, ns, tmp_path, annotations={})

    # The pod "exits 0": kwok completes it as the Job's pod; the Job succeeds.
    k8s_cluster.kubectl("-n", ns, "annotate", "pod", pod, "loraplane.dev/test-keep-running-")
    k8s_cluster.wait_for(lambda: _status(k8s_cluster, ns, job)["state"] == "Succeeded", what="the run")

    first = _cli(k8s_cluster, ns, "train", "status", job, "-o", "json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["registered"] == {
        "ref": "support-bot@v7", "path": result["path"], "new": True,
    }  # fmt: skip
    second = _cli(k8s_cluster, ns, "train", "status", job)
    assert second.returncode == 0 and "already registered support-bot@v7" in second.stdout
    again = _cli(k8s_cluster, ns, "train", "register", job, "-o", "json")
    assert json.loads(again.stdout)["registered"] is False

    shown = json.loads(_cli(k8s_cluster, ns, "adapters", "show", "support-bot", "-o", "json").stdout)
    version = shown["adapter"]["versions"]["v7"]
    assert version["weights_sha256"] == result["weights_sha256"]
    assert version["base_model"] == "/data/models/base" and version["manifest"]["version"] == "v7"
    assert [(e["action"], e["version"]) for e in shown["history"]] == [("register", "v7")], "exactly once"
    assert shown["history"][0]["reason"] == f"training Job {job}"


def test_train_logs_of_an_unknown_job_is_a_clear_error(k8s_cluster: Cluster, release: str) -> None:
    result = _cli(k8s_cluster, release, "train", "logs", "train-nope-12345")
    assert result.returncode == 2 and "no training Job 'train-nope-12345'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_names_a_pushed_dataset_and_its_job_trains_on_that_exact_file(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    """``dataset.pushed: NAME`` is what ``loraplane data push --name NAME`` recorded (a ConfigMap per
    name, newest push wins): the run's stored config names the content-addressed path instead."""
    from loraplane.platform.data_push import DataPushResult, record_push

    ns = release
    settings = Settings(
        home=tmp_path / "home", registry="kubernetes", namespace=ns, kubeconfig=k8s_cluster.kubeconfig
    )
    file = tmp_path / "support.jsonl"
    for digest in ("a" * 64, "b" * 64):  # pushed twice: the newest content wins
        path = f"/data/datasets/support/sha256-{digest}.jsonl"
        record_push(
            settings, DataPushResult("support", path, digest, 12, 3400, True), file=file, release=RELEASE
        )
    config = tmp_path / "pushed.yaml"
    raw = yaml.safe_load(_config(tmp_path).read_text())
    raw["dataset"] = {"pushed": "support"}
    config.write_text(yaml.safe_dump(raw))
    job = _submit(k8s_cluster, ns, config)
    cm = json.loads(k8s_cluster.kubectl("-n", ns, "get", "configmap", job, "-o", "json").stdout)
    dataset = yaml.safe_load(cm["data"]["train.yaml"])["dataset"]
    assert dataset["path"] == f"/data/datasets/support/sha256-{'b' * 64}.jsonl" and "pushed" not in dataset
    assert _cli(k8s_cluster, ns, "train", "cancel", job).returncode == 0

    raw["dataset"] = {"pushed": "never-pushed"}
    config.write_text(yaml.safe_dump(raw))
    before = k8s_cluster.kubectl("-n", ns, "get", "jobs", "-o", "name").stdout
    unknown = _cli(k8s_cluster, ns, "train", "submit", str(config))
    assert unknown.returncode == 2, unknown.stderr
    assert "dataset.pushed: no dataset 'never-pushed' was pushed to namespace" in unknown.stderr
    assert "data push FILE -m BASE_MODEL --name never-pushed" in unknown.stderr
    assert k8s_cluster.kubectl("-n", ns, "get", "jobs", "-o", "name").stdout == before


# --- DPO: base_adapter and preference data, resolved at submit ------------------------------------


def _k8s_registry(cluster: Cluster, ns: str, tmp_path: Path) -> Settings:
    cluster.kubectl("apply", "-f", str(ROOT / "charts" / "loraplane" / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/loraadapters.loraplane.dev")
    return Settings(
        home=tmp_path / "home", registry="kubernetes", namespace=ns, kubeconfig=cluster.kubeconfig
    )


def _dpo_config(tmp_path: Path, **tree: Any) -> Path:
    """A DPO run's config (a file of its own per call); a None value removes its key."""
    raw = yaml.safe_load(_config(tmp_path).read_text())
    del raw["lora"]  # a DPO run on a base adapter continues the adapter's LoRA
    raw.update({"method": "dpo", "dpo": {"beta": 0.1}, **tree})
    path = tmp_path / f"dpo-{len(list(tmp_path.glob('dpo-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    return path


def _trainer_env(cluster: Cluster, ns: str, job: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The Job's pod spec and its trainer container's plain environment."""
    pod_spec = json.loads(cluster.kubectl("-n", ns, "get", "job", job, "-o", "json").stdout)["spec"][
        "template"
    ]
    (trainer,) = [c for c in pod_spec["spec"]["containers"] if c["name"] == "trainer"]
    return pod_spec["spec"], {e["name"]: e["value"] for e in trainer.get("env") or [] if "value" in e}


def test_a_dpo_run_gets_its_base_adapter_resolved_at_submit_and_bad_refs_create_nothing(
    k8s_cluster: Cluster, release: str, tmp_path: Path
) -> None:
    """The pod has no API token: `train submit` reads NAME@vN in the registry (as the CLI user) and puts
    what the trainer needs into the pod's environment; a version the trainer would refuse, or a pushed
    dataset of the other method, is refused here, exit 2, before anything is created."""
    from test_dpo_base_adapter import _register

    from loraplane.platform.data_push import DataPushResult, record_push

    ns = release
    settings = _k8s_registry(k8s_cluster, ns, tmp_path)
    base = {"path": "/data/models/base", "files_sha256": "f" * 64}
    _register(
        settings, "sft-bot@v1", "/data/adapters/sft-bot/v1", {"base_model": base, "weights_sha256": "a" * 64}
    )
    _register(settings, "sft-bot@v2", "/data/adapters/sft-bot/v2", {"base_model": base}, state="retired")
    _register(
        settings, "other-bot@v1", "/data/adapters/other-bot/v1", {"base_model": {"path": "/data/models/x"}}
    )
    pushed = {"prefs": "dpo", "chats": "sft"}
    for name, method in pushed.items():
        path = f"/data/datasets/{name}/sha256-{'d' * 64}.jsonl"
        result = DataPushResult(name, path, "d" * 64, 12, 3400, True, method=method)
        record_push(settings, result, file=tmp_path / f"{name}.jsonl", release=RELEASE)

    before = k8s_cluster.kubectl("-n", ns, "get", "jobs,configmaps", "-o", "name").stdout
    refusals = {
        "base_adapter: 'sft-bot@v9' is not in the registry (kubernetes registry namespace": _dpo_config(
            tmp_path, base_adapter="sft-bot@v9"
        ),
        "base_adapter: sft-bot@v2 is retired": _dpo_config(tmp_path, base_adapter="sft-bot@v2"),
        "base_adapter: other-bot@v1 was trained on base model '/data/models/x', not on this job's "
        "base_model.path '/data/models/base'": _dpo_config(tmp_path, base_adapter="other-bot@v1"),
        "dataset.pushed: 'chats' was pushed as supervised data (method sft), but this run's method is "
        "dpo": _dpo_config(tmp_path, base_adapter="sft-bot@v1", dataset={"pushed": "chats"}),
        "dataset.pushed: 'prefs' was pushed as preference pairs (method dpo), but this run's method is "
        "sft": _dpo_config(tmp_path, method="sft", dpo=None, dataset={"pushed": "prefs"}),
    }
    for message, config in refusals.items():
        refused = _cli(k8s_cluster, ns, "train", "submit", str(config))
        assert refused.returncode == 2, refused.stderr
        assert message in " ".join(refused.stderr.split()), refused.stderr
        assert "Traceback" not in refused.stderr
    assert k8s_cluster.kubectl("-n", ns, "get", "jobs,configmaps", "-o", "name").stdout == before

    job = _submit(
        k8s_cluster, ns, _dpo_config(tmp_path, base_adapter="sft-bot@v1", dataset={"pushed": "prefs"})
    )
    pod_spec, env = _trainer_env(k8s_cluster, ns, job)
    assert json.loads(env["LORAPLANE_BASE_ADAPTER"]) == {
        "ref": "sft-bot@v1", "path": "/data/adapters/sft-bot/v1", "weights_sha256": "a" * 64,
    }  # fmt: skip
    assert pod_spec["automountServiceAccountToken"] is False, "why submit resolves it: no registry access"
    cm = json.loads(k8s_cluster.kubectl("-n", ns, "get", "configmap", job, "-o", "json").stdout)
    run = yaml.safe_load(cm["data"]["train.yaml"])
    assert (run["method"], run["base_adapter"]) == ("dpo", "sft-bot@v1"), "the config keeps the ref"
    assert run["dataset"]["path"] == f"/data/datasets/prefs/sha256-{'d' * 64}.jsonl"
    assert _cli(k8s_cluster, ns, "train", "cancel", job).returncode == 0

    # without a base adapter the pod gets no such variable
    sft = _submit(k8s_cluster, ns, _config(tmp_path))
    assert "LORAPLANE_BASE_ADAPTER" not in _trainer_env(k8s_cluster, ns, sft)[1]
    assert _cli(k8s_cluster, ns, "train", "cancel", sft).returncode == 0


def test_the_pods_command_trains_dpo_from_the_resolved_adapter_without_a_registry(
    k8s_cluster: Cluster, release: str, tmp_path: Path, demo_model: Path
) -> None:
    """The submitted Job's trainer command and environment, run here as the pod runs them (no registry:
    a kubeconfig that does not exist), on the demo model: it refuses a swapped weights file before
    training, then trains from the SFT version and records it in the manifest as a local run does."""
    from test_dpo import TRAIN_PAIRS, _published, _train, _trl_rows, _write
    from test_dpo import _config as train_config

    from loraplane.platform.run_report import RESULT_PREFIX, published
    from loraplane.platform.training_k8s import register_published
    from loraplane.trainer.demo_tasks import SENTIMENT, write_task_files

    ns = release
    settings = _k8s_registry(k8s_cluster, ns, tmp_path)
    adapters = tmp_path / "volume" / "adapters"

    # 1. An SFT version, trained and registered from its result line as `train status` registers it.
    sft_data, _ = write_task_files(SENTIMENT, tmp_path / "sft-data", repeats=1)
    output = {"adapters_root": str(adapters), "name": "pod-sft", "run_dir": str(tmp_path / "sft-run")}
    sft_config = train_config(
        tmp_path / "sft", demo_model, sft_data, max_steps=4, method="sft", dpo=None, output=output
    )
    code, out, err = _train(sft_config)
    assert code == 0, err[-3000:]
    sft_adapter = _published(out)
    entry, _ = register_published(settings, published(out) or {}, job="sft-job")
    assert entry.ref == "pod-sft@v1" and entry.path == str(sft_adapter)

    # 2. The DPO run, submitted: its Job's command, environment and stored config.
    data = _write(tmp_path / "volume" / "datasets" / "prefs.jsonl", _trl_rows(TRAIN_PAIRS))
    output = {"adapters_root": str(adapters), "name": "pod-dpo", "run_dir": str(tmp_path / "dpo-run")}
    config = train_config(
        tmp_path / "dpo", demo_model, data, max_steps=3, base_adapter="pod-sft@v1", output=output
    )
    job = _submit(k8s_cluster, ns, config)
    pod_spec, pod_env = _trainer_env(k8s_cluster, ns, job)
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "trainer"]
    cm = json.loads(k8s_cluster.kubectl("-n", ns, "get", "configmap", job, "-o", "json").stdout)
    assert _cli(k8s_cluster, ns, "train", "cancel", job).returncode == 0
    run_config = tmp_path / "run-config" / "train.yaml"
    run_config.parent.mkdir()
    run_config.write_text(cm["data"]["train.yaml"])
    command = [*container["command"], *(container.get("args") or [])]
    assert command[0] == "python" and "/etc/loraplane/run/train.yaml" in command, command
    argv = [
        sys.executable,
        *(str(run_config) if a == "/etc/loraplane/run/train.yaml" else a for a in command[1:]),
    ]
    env = {
        **os.environ,
        **pod_env,
        "LORAPLANE_REGISTRY": "kubernetes",  # any registry read would fail: nothing to connect to
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
        "LORAPLANE_HOME": str(tmp_path / "pod-home"),
        "PYTHONUNBUFFERED": "1",
    }
    assert "LORAPLANE_BASE_ADAPTER" in env

    def pod() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL
        )

    # 3. A swapped weights file is refused before anything loads: exit 2, the Job's FailJob.
    weights = sft_adapter / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + bytes(8))
    swapped = pod()
    assert swapped.returncode == 2, swapped.stderr[-3000:]
    assert "base_adapter: pod-sft@v1:" in swapped.stderr and "changed since registration" in swapped.stderr
    assert not (adapters / "pod-dpo").exists() and not (tmp_path / "dpo-run").exists()

    # 4. The registered bytes: it trains, publishes, and records the base adapter.
    weights.write_bytes(original)
    done = pod()
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    result = json.loads(line[len(RESULT_PREFIX) :])
    manifest = result["manifest"]
    sft_manifest = json.loads((sft_adapter / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["config"]["base_adapter"] == "pod-sft@v1"
    assert manifest["base_adapter"] == {
        "ref": "pod-sft@v1",
        "path": str(sft_adapter),
        "weights_sha256": entry.weights_sha256,
        "method": "sft",
        "run_id": sft_manifest["run_id"],
    }
    assert manifest["lora"]["r"] == sft_manifest["lora"]["r"]
    dpo_entry, created = register_published(settings, result, job=job)
    assert created and dpo_entry.ref == "pod-dpo@v1"
    assert dpo_entry.manifest["base_adapter"]["ref"] == "pod-sft@v1"


def test_preference_data_pushed_for_dpo_is_what_a_dpo_run_trains_on(
    k8s_cluster: Cluster, release: str, tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data push --method dpo`` checks the pairs with the trainer's preference checks and records the
    method with the push; ``train submit`` then resolves the name for a DPO run only. The upload
    itself is ``volume put``'s pod (run for real in tests/test_cluster_walk.py); kwok runs no
    containers, so here a stand-in puts the file into a directory, as the receiver would."""
    from test_dpo import TRAIN_PAIRS, _openai_rows, _write

    from loraplane.common.jsonl import DatasetError
    from loraplane.platform import volume
    from loraplane.platform.data_push import push_dataset, resolve_pushed

    ns = release
    settings = _k8s_registry(k8s_cluster, ns, tmp_path)
    on_volume = tmp_path / "volume"
    uploads: list[str] = []

    def put(_settings: Settings, local: Path, dest: str, **_: Any) -> volume.PutResult:
        uploads.append(dest)
        (on_volume / dest).parent.mkdir(parents=True, exist_ok=True)
        (on_volume / dest).write_bytes(local.read_bytes())
        size = local.stat().st_size
        return volume.PutResult(path=dest, mount_path="/data", files=1, bytes=size, sha256="-", seconds=0.0)

    monkeypatch.setattr(volume, "put", put)
    prefs = _write(tmp_path / "prefs.jsonl", _openai_rows(TRAIN_PAIRS))  # OpenAI's preference format
    pushed = push_dataset(settings, prefs, base_model=str(demo_model), name="openai-prefs", method="dpo")
    assert (pushed.method, pushed.rows, pushed.uploaded) == ("dpo", len(TRAIN_PAIRS), True)
    assert (on_volume / pushed.path.removeprefix("/data/")).read_bytes() == prefs.read_bytes()
    assert resolve_pushed(settings, "openai-prefs")["method"] == "dpo"

    # a bad pair: refused by line and class, nothing uploaded, the name still names the good file
    bad = _write(tmp_path / "bad.jsonl", [*_openai_rows(TRAIN_PAIRS[:5]), {"input": {"messages": []}}])
    with pytest.raises(DatasetError) as refused:
        push_dataset(settings, bad, base_model=str(demo_model), name="openai-prefs", method="dpo")
    assert refused.value.exit_code == 2 and "nothing was uploaded" in refused.value.message
    assert "missing_preference" in refused.value.message and "(line 6)" in refused.value.message
    assert len(uploads) == 1 and resolve_pushed(settings, "openai-prefs")["path"] == pushed.path

    job = _submit(k8s_cluster, ns, _dpo_config(tmp_path, dataset={"pushed": "openai-prefs"}))
    cm = json.loads(k8s_cluster.kubectl("-n", ns, "get", "configmap", job, "-o", "json").stdout)
    assert yaml.safe_load(cm["data"]["train.yaml"])["dataset"]["path"] == pushed.path
    assert _cli(k8s_cluster, ns, "train", "cancel", job).returncode == 0
    sft_run = (str(_config(tmp_path)), "dataset.pushed=openai-prefs", "dataset.path=null")
    sft = _cli(k8s_cluster, ns, "train", "submit", *sft_run)
    assert sft.returncode == 2 and "was pushed as preference pairs (method dpo)" in sft.stderr, sft.stderr

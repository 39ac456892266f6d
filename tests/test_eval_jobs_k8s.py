"""`loraplane evals submit | status`: the in-cluster evaluation Job on a live API server (kwok), and the
command its pod runs, against the session's real vLLM server, writing the verdict into the
LoraAdapter object.

kwok runs no containers. The chart is installed with ``evals.podAnnotations`` keeping each
evaluation pod Running (``loraplane.dev/test-keep-running``, tools/k8s/kwok-stages.yaml); while
``evals submit --wait`` waits, the test runs that pod's own command here: the Job's command and
environment as the API server stored them, each volume mount a local directory holding what the
kubelet would put there (the suite ConfigMap's files, vLLM's key from its Secret, the adapters), and
one substitution, vLLM's Service URL by the live server's. Then it lets kwok end the pod: removing the
annotation makes it exit 0, adding ``loraplane.dev/test-exit-code`` makes it fail with that code.
The release has no vLLM pod (kwok would call it Ready with no server behind it): the command reaches
the live server the direct way, as it does a release whose pods do not watch the registry.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import API_KEY, ROOT, Cluster, Live

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

CHART = ROOT / "charts" / "loraplane"
RELEASE = "platform"
KEY_SECRET = "vllm-key"
KEEP_RUNNING = "loraplane.dev/test-keep-running"
EXIT_CODE = "loraplane.dev/test-exit-code"
SERVICE_URL = "http://platform-loraplane-vllm.{ns}.svc:8000"


@dataclass
class Release:
    cluster: Cluster
    ns: str
    settings: Settings  # the registry of the release's namespace, the live server, the adapters root

    def cli(self, *args: str, registry: str = "kubernetes") -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "loraplane.platform.cli", "--registry", registry, "-n", self.ns, *args]
        env = {**self.cluster.env(), "COLUMNS": "200"}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)

    def submit(self, *args: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "loraplane.platform.cli", "--registry", "kubernetes", "-n", self.ns]
        argv += ["evals", "submit", *args]
        env = {**self.cluster.env(), "COLUMNS": "200"}
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def get(self, *args: str) -> Any:
        return json.loads(self.cluster.kubectl("-n", self.ns, "get", *args, "-o", "json").stdout)


@pytest.fixture(scope="module")
def release(k8s_cluster: Cluster, live: Live, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The chart (vLLM scaled to zero, no gateway, no trainer) in a namespace enforcing Pod Security
    ``restricted``, with vLLM's key in a Secret of the test's own: the live server's key."""
    ns = k8s_cluster.restricted_namespace("lp-eval")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    k8s_cluster.kubectl(
        "-n", ns, "create", "secret", "generic", KEY_SECRET, f"--from-literal=api-key={API_KEY}"
    )
    values = {
        "global": {"storage": {"create": False, "existingClaim": "models"}},
        "trainer": {"enabled": False},
        "gateway": {"enabled": False},
        "serving": {"replicas": 0, "apiKeySecret": {"name": KEY_SECRET}},
        "evals": {"podAnnotations": {KEEP_RUNNING: "true"}},
    }
    work = tmp_path_factory.mktemp("eval-release")
    (work / "values.yaml").write_text(yaml.safe_dump(values))
    k8s_cluster.helm(
        "upgrade", "--install", RELEASE, str(CHART), "-n", ns, "-f", str(work / "values.yaml"), "--wait"
    )
    settings = live.settings.model_copy(
        update={
            "home": work / "state",
            "registry": "kubernetes",
            "namespace": ns,
            "kubeconfig": k8s_cluster.kubeconfig,
        }
    )
    return Release(cluster=k8s_cluster, ns=ns, settings=settings)


def _register(release: Release, live: Live, task: str = "sentiment") -> str:
    """A copy of a trained adapter, registered in the release's registry under a name of its own."""
    name = f"ev-{uuid.uuid4().hex[:6]}"
    copy = release.settings.adapters_dir / name / "v1"
    shutil.copytree(live.adapters[task], copy)
    register_adapter(release.settings, copy, name=name, version="v1")
    return name


def _suite(tmp_path: Path, live: Live, *, gate: dict[str, Any], rows: int | None = None) -> Path:
    lines = live.eval_sets["sentiment"].read_text().splitlines()
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "held-out.jsonl").write_text("\n".join(lines[:rows] if rows else lines) + "\n")
    suite = {
        "name": "sentiment-check",
        "datasets": [
            {"name": "held-out", "path": "data/held-out.jsonl", "max_tokens": 8, "metrics": ["exact_match"]}
        ],
        "gate": gate,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _running_pod(release: Release, adapter: str, waiter: subprocess.Popen[str]) -> tuple[str, str]:
    """(Job, pod) of the adapter's evaluation that has not finished, once its pod is Running."""
    found: list[str] = []

    def running() -> bool:
        assert waiter.poll() is None, waiter.communicate()
        jobs = [
            j
            for j in release.get("jobs", "-l", f"loraplane.dev/adapter={adapter}")["items"]
            if not any(c["status"] == "True" for c in j.get("status", {}).get("conditions", []))
        ]
        if not jobs:
            return False
        (job,) = jobs
        pods = release.get("pods", "-l", f"job-name={job['metadata']['name']}")["items"]
        found[:] = [
            job["metadata"]["name"],
            *(p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"),
        ]
        return len(found) == 2

    release.cluster.wait_for(running, what=f"the evaluation pod of {adapter}")
    return found[0], found[1]


def _run_pod_here(
    release: Release, live: Live, job_name: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """The evaluation pod's command, run here as the kubelet would run it (see the module's docstring)."""
    job = release.get("job", job_name)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    local: dict[str, Path] = {}  # mount path -> the directory standing in for it

    def here(path: str) -> Path:
        """The local path of a path in the pod: under the longest mount path it starts with."""
        mount = max((m for m in local if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        return local[mount] / os.path.relpath(path, mount)

    for mount in sorted(container["volumeMounts"], key=lambda m: len(m["mountPath"])):
        volume, path = volumes[mount["name"]], mount["mountPath"]
        if "persistentVolumeClaim" in volume:  # the shared volume: where the adapters are, here
            assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
            local[path] = release.settings.adapters_dir.parent
            continue
        nested = any(path.startswith(m.rstrip("/") + "/") for m in local)
        directory = here(path) if nested else tmp_path / "pod" / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        local[path] = directory
        if "configMap" in volume:
            data = release.get("configmap", volume["configMap"]["name"])["data"]
            for key, text in data.items():
                (directory / key).write_text(text)
        elif "secret" in volume:
            data = release.get("secret", volume["secret"]["secretName"])["data"]
            for item in volume["secret"]["items"]:
                (directory / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
        else:
            assert "emptyDir" in volume, volume

    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = str(here(var["value"])) if var["value"].startswith("/") else var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
            env[var["name"]] = release.ns
    assert env["LORAPLANE_SERVER_URL"] == SERVICE_URL.format(ns=release.ns), "vLLM's Service, no port-forward"
    env["LORAPLANE_SERVER_URL"] = (
        live.server.url
    )  # the one substitution: the Service's name resolves there only
    env |= {"PATH": os.environ["PATH"], "KUBECONFIG": str(release.cluster.kubeconfig)}
    command = [
        sys.executable if word == "python" else str(here(word)) if word.startswith("/") else word
        for word in container["command"]
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def _latest_eval(release: Release, adapter: str) -> dict[str, Any]:
    """The version's newest evaluation, as the LoraAdapter object holds it."""
    obj = release.get(f"loraadapters.loraplane.dev/{adapter}")
    evals: list[dict[str, Any]] = obj["spec"]["versions"]["v1"]["evals"]
    assert evals, obj["spec"]["versions"]["v1"]
    return evals[-1]


def test_submit_wait_the_pods_command_records_the_verdict_and_submit_prints_it_from_the_registry(
    release: Release, live: Live, tmp_path: Path
) -> None:
    adapter = _register(release, live)
    suite = _suite(tmp_path, live, gate={"beat_base": {"exact_match": 0.0}})
    waiter = release.submit(f"{adapter}@v1", "--suite", str(suite), "--wait", "-o", "json")
    job_name, pod = _running_pod(release, adapter, waiter)
    assert job_name.startswith(f"eval-{adapter}-v1-")

    # The Job and its ConfigMap, as the API server stored them (Pod Security `restricted` admitted the pod).
    job = release.get("job", job_name)
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "eval"
    assert job["metadata"]["labels"]["loraplane.dev/adapter"] == adapter
    annotations = job["metadata"]["annotations"]
    assert (annotations["loraplane.dev/ref"], annotations["loraplane.dev/suite"]) == (
        f"{adapter}@v1",
        "sentiment-check",
    )
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["loraplane.dev/vllm-client"] == "true", (
        "vLLM's NetworkPolicy admits it"
    )
    spec = template["spec"]
    (container,) = spec["containers"]
    assert container["command"] == [
        "python", "-m", "loraplane.platform.cli", "adapters", "eval", f"{adapter}@v1",
        "--suite", "/etc/loraplane/eval/suite.yaml",
    ]  # fmt: skip
    assert container["image"] == "ghcr.io/loraplane/loraplane:0.1.0", "the serving image: it has the CLI"
    assert (
        spec["serviceAccountName"] == "platform-loraplane-eval"
        and spec["automountServiceAccountToken"] is True
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert not any(e["name"] == "LORAPLANE_API_KEY" for e in container["env"]), "the key is a file"
    config_map = release.get("configmap", job_name)
    (owner,) = config_map["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", job_name, job["metadata"]["uid"])
    assert set(config_map["data"]) == {"suite.yaml", "eval-0.jsonl"}
    assert {v["name"]: v for v in spec["volumes"]}["suite"]["configMap"]["name"] == job_name

    # What the pod runs, run here: it evaluates through the live server and records the verdict.
    ran = _run_pod_here(release, live, job_name, tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "gate: PASS" in ran.stdout and f"{adapter}@v1" in ran.stdout, (
        ran.stdout
    )  # `adapters eval`'s tables
    recorded = _latest_eval(release, adapter)
    assert (
        recorded["passed"] is True and recorded["suite_sha256"] == annotations["loraplane.dev/suite-sha256"]
    )
    assert recorded["models"]["candidate"] == f"{adapter}@v1" and recorded["endpoint"] == live.server.url
    assert recorded["suite_path"].endswith("/suite.yaml")

    # The pod ends (exit 0): `submit --wait` prints the verdict it reads back from the registry.
    release.cluster.kubectl("-n", release.ns, "annotate", "pod", pod, f"{KEEP_RUNNING}-")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    answer = json.loads(out)
    assert (answer["job"], answer["ref"], answer["state"]) == (job_name, f"{adapter}@v1", "Succeeded")
    assert answer["verdict"] == recorded

    status = json.loads(release.cli("evals", "status", job_name, "-o", "json").stdout)
    assert status["state"] == "Succeeded" and status["verdict"] == recorded and status["error"] is None
    assert [(p["exit_code"], p["meaning"]) for p in status["pods"]] == [(0, "verdict recorded")]
    shown = release.cli("evals", "status", job_name)
    assert shown.returncode == 0, shown.stderr
    assert f"{job_name} ({adapter}@v1, suite sentiment-check): Succeeded" in shown.stdout
    assert "gate: PASS" in shown.stdout and "beat_base" in shown.stdout and "exact_match" in shown.stdout


def test_a_failed_gate_exits_3_and_a_failed_pod_is_named_with_its_exit_code(
    release: Release, live: Live, tmp_path: Path
) -> None:
    adapter = _register(release, live)
    # a floor no model reaches: the run completes, the gate says no
    suite = _suite(tmp_path, live, gate={"min_score": {"exact_match": 1.01}}, rows=8)
    waiter = release.submit(f"{adapter}@v1", "--suite", str(suite), "--wait", "--timeout", "5m")
    job_name, pod = _running_pod(release, adapter, waiter)
    ran = _run_pod_here(release, live, job_name, tmp_path)
    assert ran.returncode == 0 and "gate: FAIL" in ran.stdout, ran.stdout + ran.stderr
    release.cluster.kubectl("-n", release.ns, "annotate", "pod", pod, f"{KEEP_RUNNING}-")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 3, out + err
    assert "gate: FAIL" in out and "min_score" in out and "held-out" in out, out
    assert _latest_eval(release, adapter)["passed"] is False

    # A pod that exits 2 (bad input: not retried) fails the Job; --wait names the pod and its code.
    waiter = release.submit(f"{adapter}@v1", "--suite", str(suite), "--wait", "--timeout", "5m")
    job_name, pod = _running_pod(release, adapter, waiter)
    release.cluster.kubectl("-n", release.ns, "annotate", "pod", pod, f"{EXIT_CODE}=2", f"{KEEP_RUNNING}-")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 2, out + err
    assert f"evaluation Job {job_name} of {adapter}@v1 failed: PodFailurePolicy" in err, err
    assert f"pod {pod} exited 2 (bad input" in err and f"kubectl -n {release.ns} logs job/{job_name}" in err
    status = json.loads(release.cli("evals", "status", job_name, "-o", "json").stdout)
    assert status["state"] == "Failed" and status["verdict"] is None and "exited 2" in status["error"]


def test_bad_submissions_are_refused_before_anything_is_created(
    release: Release, live: Live, tmp_path: Path
) -> None:
    adapter = _register(release, live)
    suite = _suite(tmp_path, live, gate={"beat_base": {"exact_match": 0.0}})
    before = release.cluster.kubectl("-n", release.ns, "get", "jobs,configmaps", "-o", "name").stdout

    unknown = release.cli("evals", "submit", "nobody@v1", "--suite", str(suite))
    assert unknown.returncode == 2 and "nobody" in unknown.stderr, unknown.stderr
    no_version = release.cli("evals", "submit", f"{adapter}@v9", "--suite", str(suite))
    assert no_version.returncode == 2 and "has no version 'v9'" in no_version.stderr
    missing = release.cli("evals", "submit", f"{adapter}@v1", "--suite", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such eval suite file" in missing.stderr
    neither = release.cli("evals", "submit", f"{adapter}@v1")
    assert neither.returncode == 2 and "exactly one of --suite FILE or --dataset FILE" in neither.stderr
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"prompt": "x" * 2000, "reference": "y"}) + "\n" for _ in range(600)))
    too_big = release.cli("evals", "submit", f"{adapter}@v1", "--dataset", str(big))
    assert too_big.returncode == 2 and "more than a ConfigMap holds (1024 KiB)" in too_big.stderr
    other = release.cli("evals", "submit", f"{adapter}@v1", "--suite", str(suite), "--release", "other")
    assert other.returncode == 2 and "no evaluation Job template of Helm release 'other'" in other.stderr
    local = release.cli("evals", "submit", f"{adapter}@v1", "--suite", str(suite), registry="local")
    assert local.returncode == 2 and "in a Kubernetes cluster" in local.stderr
    assert f"loraplane adapters eval {adapter}@v1 --suite FILE" in local.stderr
    ppl_suite = tmp_path / "ppl.yaml"
    with_ppl = yaml.safe_load(suite.read_text())
    with_ppl["datasets"][0]["metrics"].append("perplexity")
    ppl_suite.write_text(yaml.safe_dump(with_ppl))
    perplexity = release.cli("evals", "submit", f"{adapter}@v1", "--suite", str(ppl_suite))
    said = " ".join(perplexity.stderr.split())
    assert perplexity.returncode == 2 and "ask for perplexity" in said and "vllm#16668" in said, said
    unknown_job = release.cli("evals", "status", "eval-nothing-v1-abcde")
    assert unknown_job.returncode == 2 and "no evaluation Job 'eval-nothing-v1-abcde'" in unknown_job.stderr

    assert release.cluster.kubectl("-n", release.ns, "get", "jobs,configmaps", "-o", "name").stdout == before
    for result in (unknown, no_version, missing, neither, too_big, other, local, perplexity, unknown_job):
        assert "Traceback" not in result.stderr


def test_the_eval_pods_token_may_record_verdicts_and_nothing_more(release: Release) -> None:
    sa = f"system:serviceaccount:{release.ns}:platform-loraplane-eval"

    def can(*args: str) -> bool:
        found = release.cluster.kubectl("-n", release.ns, "auth", "can-i", *args, f"--as={sa}", check=False)
        return found.stdout.strip() == "yes"

    assert can("update", "loraadapters.loraplane.dev") and can("list", "loraadapters.loraplane.dev")
    assert can("patch", "loraadapters.loraplane.dev", "--subresource=status")
    assert can("list", "pods")
    for verb, resource in (
        ("get", "secrets"), ("create", "pods/exec"), ("create", "pods/portforward"),
        ("delete", "loraadapters.loraplane.dev"), ("create", "loraadapters.loraplane.dev"),
        ("create", "jobs"), ("create", "configmaps"),
    ):  # fmt: skip
        assert not can(verb, resource), f"{verb} {resource}"

"""Multi-node training in the chart: torchrun's elastic agent with a c10d rendezvous on pod 0, gang
restarts (an Indexed Job, or a JobSet when its API is served), and Kueue's queue label."""

from __future__ import annotations

from typing import Any

import yaml
from test_chart import CHART, _fails, _helm, _profile, _render, _template_job

from loraplane.platform.training_k8s import REPORT_MODULE, _pod_template, _with_report
from loraplane.trainer.exit_codes import DO_NOT_RETRY, PEER_LOST

JOBSET_API = "jobset.x-k8s.io/v1alpha2/JobSet"
MULTI = ("trainer.nodes=2", "trainer.gpusPerNode=2", "trainer.resources.limits.nvidia\\.com/gpu=2")


def _render_with(*args: str) -> dict[str, dict[str, Any]]:
    result = _helm("template", "platform", str(CHART), "--namespace", "ml", *args)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _sets(*sets: str) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def _run_template(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return _template_job(objs)


def _container(run: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = _pod_template(run)["spec"]["containers"][0]
    return container


def test_multi_node_pods_run_torchrun_elastic_agents_with_a_c10d_rendezvous_on_pod_0() -> None:
    job = _run_template(_render(*MULTI, "trainer.gang.maxRestarts=5", "trainer.gang.joinTimeout=1200"))
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    container = _container(job)
    assert container["command"] == [
        "python", "-m", "loraplane.trainer.elastic",
        "--nnodes=2", "--nproc-per-node=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=$(MASTER_ADDR):29500", "--rdzv-id=$(RUN_NAME)",
        "--rdzv-conf=join_timeout=1200", "--max-restarts=5",
        "-m", "loraplane.trainer", "--config", "/etc/loraplane/run/train.yaml",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["RUN_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    assert env["MASTER_ADDR"]["value"] == "$(RUN_NAME)-0.platform-loraplane-trainer.ml.svc"
    names = [e["name"] for e in container["env"]]
    assert names.index("RUN_NAME") < names.index("MASTER_ADDR"), "$(RUN_NAME) is defined before its use"
    # torchrun's agent forwards SIGTERM, then kills after this: the trainer's save must fit in it
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "585"
    assert _pod_template(job)["spec"]["subdomain"] == "platform-loraplane-trainer"

    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "Ignore", "Ignore"]
    assert rules[0]["onExitCodes"]["values"] == [DO_NOT_RETRY], "exit 2 first: never retried"
    assert rules[1]["onExitCodes"]["values"] == [PEER_LOST], "the others' exit when pod 0 is lost"
    assert rules[2]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    assert job["spec"]["podReplacementPolicy"] == "Failed", "a replacement gets the same hostname"
    assert job["spec"]["backoffLimit"] == 4

    # `train submit` wraps the trainer behind the launcher in run_report (rank 0 prints the result).
    wrapped = _with_report(container["command"])
    assert wrapped[:3] == ["python", "-m", "loraplane.trainer.elastic"]
    assert wrapped[-4:] == ["-m", REPORT_MODULE, "--config", "/etc/loraplane/run/train.yaml"]

    one = _run_template(_render())
    assert [r["action"] for r in one["spec"]["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore"]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in {e["name"] for e in _container(one)["env"]}


def test_the_multi_node_profile_renders_the_elastic_launcher_for_the_initial_run_too() -> None:
    objs = _render(files=(_profile("multi-node-training"),))
    (run,) = [v for k, v in objs.items() if k.startswith("Job/platform-loraplane-run-")]
    assert run["kind"] == "Job", "the initial run is always a Job"
    assert _container(run)["command"][:3] == ["python", "-m", "loraplane.trainer.elastic"]


def test_with_jobset_served_a_multi_node_run_is_a_jobset_that_restarts_the_gang() -> None:
    objs = _render_with("--api-versions", JOBSET_API, *_sets(*MULTI))
    jobset = _run_template(objs)
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    spec = jobset["spec"]
    assert spec["failurePolicy"]["maxRestarts"] == 4, "trainer.backoffLimit: whole-gang restarts"
    assert spec["failurePolicy"]["rules"] == [
        {"name": "do-not-retry", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}
    ]
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert spec["ttlSecondsAfterFinished"] == 604800
    (replicated,) = spec["replicatedJobs"]
    assert (replicated["name"], replicated["replicas"]) == ("node", 1)
    child = replicated["template"]["spec"]
    assert child["backoffLimit"] == 0, "a counted pod failure fails the child Job: JobSet restarts all"
    assert (child["completionMode"], child["completions"], child["parallelism"]) == ("Indexed", 2, 2)
    assert [r["action"] for r in child["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore", "Ignore"]
    assert "ttlSecondsAfterFinished" not in child
    pod = _pod_template(jobset)["spec"]
    assert "subdomain" not in pod, "JobSet sets it to its headless Service"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RUN_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
    )
    assert env["MASTER_ADDR"]["value"] == "$(RUN_NAME)-node-0-0.$(RUN_NAME).ml.svc"
    assert pod["containers"][0]["command"][:3] == ["python", "-m", "loraplane.trainer.elastic"]

    # Forced either way; a single-node run is a Job whatever the backend.
    forced = _run_template(_render(*MULTI, "trainer.gang.backend=jobset"))
    assert forced["kind"] == "JobSet"
    plain = _run_template(
        _render_with("--api-versions", JOBSET_API, *_sets(*MULTI, "trainer.gang.backend=job"))
    )
    assert plain["kind"] == "Job"
    assert _run_template(_render_with("--api-versions", JOBSET_API))["kind"] == "Job"


def test_the_kueue_queue_label_goes_on_what_kueue_admits() -> None:
    assert "kueue.x-k8s.io/queue-name" not in _run_template(_render(*MULTI))["metadata"]["labels"]
    job = _run_template(_render(*MULTI, "trainer.kueue.queueName=team-a"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "suspend" not in job["spec"], "Kueue's webhook suspends it; without Kueue it just runs"
    jobset = _run_template(
        _render_with("--api-versions", JOBSET_API, *_sets(*MULTI, "trainer.kueue.queueName=team-a"))
    )
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    child = jobset["spec"]["replicatedJobs"][0]["template"]
    assert "kueue.x-k8s.io/queue-name" not in (child.get("metadata") or {}).get("labels", {}), (
        "Kueue manages the JobSet, not its child Jobs"
    )
    single = _run_template(_render("trainer.kueue.queueName=team-a"))
    assert single["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_gang_and_kueue_values_are_validated() -> None:
    assert "gang/backend" in _fails("trainer.gang.backend=slurm")
    assert "gang/maxRestarts" in _fails("trainer.gang.maxRestarts=-1")
    assert "gang/joinTimeout" in _fails("trainer.gang.joinTimeout=5")
    assert "kueue/queueName" in _fails("trainer.kueue.queueName=Team_A")
    assert "additional properties 'queue' not allowed" in _fails("trainer.kueue.queue=a")

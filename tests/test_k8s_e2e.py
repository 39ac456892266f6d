"""The chart against a real Kubernetes API server (kwok's binary runtime: real apiserver, controllers,
scheduler and admission; fake nodes; containers do not run, kwok marks pods Running).

What this proves: the API server accepts every rendered object under strict field validation, Pod
Security ``restricted`` admits the chart's pods and rejects a privileged one, the scheduler puts GPU
pods on GPU nodes only, ``helm install --wait`` / ``upgrade`` / ``uninstall`` behave, the PVC is kept.
What it cannot prove: that the containers start (see README, "Testing").
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

CHART = ROOT / "charts" / "loraplane"
GPU_VALUES = {
    "serving": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
}
RELEASE = "platform"


def _values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("-n", namespace, "get", "pods", "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


PROFILES = sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.fixture(scope="module")
def third_party_crds(k8s_cluster: Cluster) -> None:
    """The real third-party CRDs the profiles use, from their Go modules' source zips (cached):
    prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule, the Gateway API's HTTPRoute."""
    import subprocess

    fetched = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-crds.sh")], capture_output=True, text=True
    )
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    crds = fetched.stdout.split()
    assert len(crds) == 4, fetched.stdout
    for crd in crds:
        k8s_cluster.kubectl("apply", "--server-side", "-f", crd)
    kinds = ("servicemonitors", "podmonitors", "prometheusrules")
    monitoring = [f"{kind}.monitoring.coreos.com" for kind in kinds]
    for name in (*monitoring, "httproutes.gateway.networking.k8s.io"):
        # `kubectl wait` fails at once while a new CRD has no conditions yet: poll instead
        k8s_cluster.wait_for(lambda name=name: _established(k8s_cluster, name), what=f"{name} established")


def _established(cluster: Cluster, crd: str) -> bool:
    found = json.loads(cluster.kubectl("get", f"crd/{crd}", "-o", "json").stdout)
    conditions = found.get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name.removesuffix("-values.yaml") for p in PROFILES])
def test_every_rendered_object_of_every_profile_passes_the_api_servers_strict_validation(
    k8s_cluster: Cluster, third_party_crds: None, profile: Path
) -> None:
    rendered = k8s_cluster.helm("template", RELEASE, str(CHART), "-n", "default", "-f", str(profile)).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    # The training Job template is validated too, as the Job `loraplane train submit` makes of it.
    for doc in list(docs):
        if "job.yaml" in doc.get("data", {}):
            job = yaml.safe_load(doc["data"]["job.yaml"])
            job["metadata"]["name"] = "template-check"
            docs.append(job)
    check = k8s_cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(docs),
        check=False,
    )
    assert check.returncode == 0, check.stderr
    created = check.stdout.count("created (server dry run)")
    assert created == len(docs), check.stdout
    assert "Warning" not in check.stderr, check.stderr


def test_strict_validation_is_really_on_an_unknown_field_is_rejected(k8s_cluster: Cluster) -> None:
    """The control for the test above: the same command refuses a typo, naming the field."""
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "typo"},
        "data": {"a": "b"},
        "dataa": {"c": "d"},
    }
    check = k8s_cluster.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=json.dumps(bad), check=False
    )
    assert check.returncode != 0
    assert 'unknown field "dataa"' in check.stderr


def test_helm_install_in_a_restricted_namespace_schedules_vllm_on_gpu_nodes_and_keeps_the_pvc(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    ns = k8s_cluster.restricted_namespace("lp-install")
    claim = f"{RELEASE}-loraplane-data"
    k8s_cluster.volume_for(ns, claim)
    values = _values_file(tmp_path, GPU_VALUES)
    install = k8s_cluster.helm(
        "install", RELEASE, str(CHART), "-n", ns, "-f", values, "--wait", "--timeout", "120s"
    )
    assert "violates PodSecurity" not in install.stderr
    notes = install.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {ns} port-forward svc/{RELEASE}-loraplane-gateway 8080:80" in notes
    assert f"http://{RELEASE}-loraplane-gateway.{ns}.svc:80/v1" in notes
    assert f"loraplane --registry kubernetes -n {ns} train submit train.yaml --release {RELEASE}" in notes
    assert f"helm test {RELEASE} -n {ns}" in notes

    pvc = json.loads(k8s_cluster.kubectl("-n", ns, "get", "pvc", claim, "-o", "json").stdout)
    assert pvc["status"]["phase"] == "Bound"
    pods = _pods(k8s_cluster, ns, "app.kubernetes.io/component=vllm")
    assert len(pods) == 1
    assert pods[0]["status"]["phase"] == "Running"
    assert pods[0]["spec"]["nodeName"].startswith("gpu-node-"), "a GPU pod must land on a GPU node"

    gateway = _pods(k8s_cluster, ns, "app.kubernetes.io/component=gateway")
    assert [p["status"]["phase"] for p in gateway] == ["Running", "Running"], "gateway.replicas is 2"
    for pod in gateway:
        assert not pod["spec"]["nodeName"].startswith("gpu-node-"), "the gateway needs no GPU"
    # `helm test` runs for real in the walk on the real node (tests/test_cluster_walk.py): kwok has no
    # container to run its pod, so here it could only pass or hang whatever the gateway does.

    def secret(name: str) -> dict[str, str]:
        data: dict[str, str] = json.loads(
            k8s_cluster.kubectl("-n", ns, "get", "secret", name, "-o", "json").stdout
        )["data"]
        return data

    keys_before = (secret(f"{RELEASE}-loraplane-vllm-key"), secret(f"{RELEASE}-loraplane-gateway-keys"))

    def deployment(name: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(
            k8s_cluster.kubectl("-n", ns, "get", "deploy", f"{RELEASE}-loraplane-{name}", "-o", "json").stdout
        )
        return found

    def checksums(name: str) -> dict[str, str]:
        annotations = deployment(name)["spec"]["template"]["metadata"].get("annotations", {})
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    # The pod templates carry the checksums of the keys the Secrets really hold (one value per render,
    # shared by the parent chart and the serving subchart).
    vllm_sum = hashlib.sha256(keys_before[0]["api-key"].encode()).hexdigest()
    client_sum = hashlib.sha256(keys_before[1]["keys"].encode()).hexdigest()
    assert checksums("vllm") == {"checksum/vllm-key": vllm_sum}
    assert checksums("gateway") == {"checksum/vllm-key": vllm_sum, "checksum/gateway-keys": client_sum}
    gateway_generation = deployment("gateway")["metadata"]["generation"]

    # vLLM's own service account may read the registry (rehydration) and nothing else.
    vllm_sa = f"--as=system:serviceaccount:{ns}:{RELEASE}-loraplane-vllm"
    for verb, allowed in (("list", "yes"), ("update", "no"), ("delete", "no")):
        answer = k8s_cluster.kubectl(
            "-n", ns, "auth", "can-i", verb, "loraadapters.loraplane.dev", vllm_sa, check=False
        )
        assert answer.stdout.strip() == allowed, (verb, answer.stdout, answer.stderr)
    answer = k8s_cluster.kubectl("-n", ns, "auth", "can-i", "list", "secrets", vllm_sa, check=False)
    assert answer.stdout.strip() == "no"

    # An upgrade with changed values rolls out a new pod with the new vLLM arguments.
    old = pods[0]["metadata"]["name"]
    k8s_cluster.helm(
        "upgrade", RELEASE, str(CHART), "-n", ns, "-f", values, "--set", "serving.maxLoras=8",
        "--wait", "--timeout", "120s",
    )  # fmt: skip

    def rolled_out() -> bool:
        current = _pods(k8s_cluster, ns, "app.kubernetes.io/component=vllm")
        return [p["metadata"]["name"] for p in current] != [old] and all(
            p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
            for p in current
        )

    k8s_cluster.wait_for(rolled_out, what="the upgraded vLLM pod")
    (new,) = _pods(k8s_cluster, ns, "app.kubernetes.io/component=vllm")
    keys_after = (secret(f"{RELEASE}-loraplane-vllm-key"), secret(f"{RELEASE}-loraplane-gateway-keys"))
    assert keys_after == keys_before, "generated keys survive an upgrade (clients keep working)"
    # Kept keys keep their checksums (read back with lookup): nothing rolls for the keys' sake, and the
    # gateway, whose values did not change, is not rolled at all.
    assert checksums("vllm") == {"checksum/vllm-key": vllm_sum}
    assert checksums("gateway") == {"checksum/vllm-key": vllm_sum, "checksum/gateway-keys": client_sum}
    assert deployment("gateway")["metadata"]["generation"] == gateway_generation
    assert "--max-loras=8" in new["spec"]["containers"][0]["args"]
    assert new["spec"]["nodeName"].startswith("gpu-node-")

    k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--wait")
    left = json.loads(k8s_cluster.kubectl("-n", ns, "get", "pvc,deploy", "-o", "json").stdout)["items"]
    assert [(o["kind"], o["metadata"]["name"]) for o in left] == [("PersistentVolumeClaim", claim)], (
        "uninstall removes the release but keeps the data volume"
    )


def test_a_privileged_pod_is_rejected_by_pod_security_admission_with_the_api_servers_message(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    """A deliberately broken copy of the chart: its vLLM container asks for privileged mode."""
    ns = k8s_cluster.restricted_namespace("lp-broken")
    broken = tmp_path / "loraplane"
    shutil.copytree(CHART, broken)
    helpers = broken / "charts" / "serving" / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    assert "allowPrivilegeEscalation: false" in text
    helpers.write_text(text.replace("allowPrivilegeEscalation: false", "privileged: true"))
    values = _values_file(
        tmp_path, {**GPU_VALUES, "global": {"storage": {"create": False, "existingClaim": "none"}}}
    )
    install = k8s_cluster.helm(
        "install", RELEASE, str(broken), "-n", ns, "-f", values, "--wait", "--timeout", "20s", check=False
    )
    assert install.returncode != 0, "pods that violate 'restricted' never become ready"
    privileged = 'privileged (container "vllm" must not set securityContext.privileged=true)'
    warning = install.stderr.replace('\\"', '"')  # helm logs the API server's warning klog-quoted
    assert 'would violate PodSecurity "restricted:latest"' in warning
    assert privileged in warning

    def refused() -> str:
        events = k8s_cluster.kubectl(
            "-n", ns, "get", "events", "--field-selector", "reason=FailedCreate", "-o", "json"
        ).stdout
        return "\n".join(e["message"] for e in json.loads(events)["items"])

    k8s_cluster.wait_for(
        lambda: "violates PodSecurity" in refused(), what="the ReplicaSet's FailedCreate event"
    )
    message = refused()
    assert 'is forbidden: violates PodSecurity "restricted:latest"' in message, message
    assert privileged in message
    assert _pods(k8s_cluster, ns, "app.kubernetes.io/component=vllm") == []


def _trainer_job(name: str, *, backoff_limit: int, annotations: dict[str, str]) -> str:
    """A Job with the failure policy the trainer's exit codes are designed for (see trainer/exit_codes.py)."""
    from loraplane.trainer.exit_codes import DO_NOT_RETRY

    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "In",
                            "values": [DO_NOT_RETRY],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainer"}]},
            },
        },
    }
    return json.dumps(job)


def _job(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = json.loads(cluster.kubectl("-n", ns, "get", "job", name, "-o", "json").stdout)
    return job


def test_the_cluster_fails_job_pods_with_a_chosen_exit_code_for_pod_failure_policies(
    k8s_cluster: Cluster,
) -> None:
    """The fixture's contract for trainer-Job tests: pods exit with the code a test asks for, and an
    evicted pod fails as a kubelet would report it (so the Job controller can tell a disruption)."""
    ns = "lp-jobs"
    k8s_cluster.kubectl("create", "namespace", ns)
    k8s_cluster.wait_for(
        lambda: k8s_cluster.kubectl("-n", ns, "get", "sa", "default", check=False).returncode == 0
    )

    # Exit 2 ("do not retry"): the Job fails at once, although backoffLimit would allow 6 retries.
    job = _trainer_job("bad-data", backoff_limit=6, annotations={"loraplane.dev/test-exit-code": "2"})
    k8s_cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=job)

    def failed(name: str) -> dict[str, Any] | None:
        conditions = _job(k8s_cluster, ns, name)["status"].get("conditions", [])
        return next((c for c in conditions if c["type"] == "Failed" and c["status"] == "True"), None)

    k8s_cluster.wait_for(lambda: failed("bad-data") is not None, what="the Job to fail")
    condition = failed("bad-data")
    assert condition is not None and condition["reason"] == "PodFailurePolicy"
    assert "failed with exit code 2 matching FailJob rule" in condition["message"]
    assert _job(k8s_cluster, ns, "bad-data")["status"].get("failed") == 1, "no retry was made"

    # An evicted pod (a drain, a preemption) does not count against backoffLimit 0: a new pod starts.
    job = _trainer_job("preempted", backoff_limit=0, annotations={"loraplane.dev/test-keep-running": "true"})
    k8s_cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=job)

    def running_pods() -> list[str]:
        pods = _pods(k8s_cluster, ns, "job-name=preempted")
        return [
            p["metadata"]["name"]
            for p in pods
            if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
        ]

    k8s_cluster.wait_for(lambda: len(running_pods()) == 1, what="the trainer pod")
    (first,) = running_pods()
    k8s_cluster.evict(ns, first)
    k8s_cluster.wait_for(
        lambda: running_pods() not in ([], [first]), timeout=60, what="a replacement pod after the eviction"
    )
    status = _job(k8s_cluster, ns, "preempted")["status"]
    assert failed("preempted") is None and status.get("failed", 0) == 0, status


# The GPU preflight (what blocks, what warns): tests/test_chart_gpu_k8s.py.


def test_a_multi_node_initial_run_is_an_indexed_job_whose_pods_find_pod_0_by_name(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    """Two nodes, two pods: each gets its index, the hostname JOB-INDEX under the headless
    Service (so JOB-0.<service> is pod 0's DNS name, MASTER_ADDR), and lands on its own GPU node."""
    ns = k8s_cluster.restricted_namespace("lp-multinode")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    config = yaml.safe_load((CHART / "ci" / "02-multi-node-training-values.yaml").read_text())
    trainer = {
        **config["trainer"],
        "gpusPerNode": 1,
        # No GPU asked: the other tests' GPU pods may still hold them. The node selector and the
        # anti-affinity of the profile still put one pod on each GPU node.
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "priorityClassName": "",
        "podAnnotations": {"loraplane.dev/test-keep-running": "true"},
    }
    values = {
        "serving": {"enabled": False},
        "global": {"storage": {"create": False, "existingClaim": "models"}},
        "trainer": trainer,
    }
    k8s_cluster.helm("install", RELEASE, str(CHART), "-n", ns, "-f", _values_file(tmp_path, values))
    try:
        _check_the_multi_node_run(k8s_cluster, ns)
    finally:  # its pods hold both fake GPUs: a failure here must not starve every later GPU test
        k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--wait")


def _check_the_multi_node_run(k8s_cluster: Cluster, ns: str) -> None:
    jobs = json.loads(k8s_cluster.kubectl("-n", ns, "get", "jobs", "-o", "json").stdout)["items"]
    (job,) = [j for j in jobs if j["metadata"]["name"].startswith(f"{RELEASE}-loraplane-run-")]
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2

    def running() -> list[dict[str, Any]]:
        pods = _pods(k8s_cluster, ns, f"batch.kubernetes.io/job-name={name}")
        return [p for p in pods if p["status"].get("phase") == "Running"]

    k8s_cluster.wait_for(lambda: len(running()) == 2, what="both nodes of the run")
    pods = sorted(
        running(), key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
    )
    service = f"{RELEASE}-loraplane-trainer"
    for index, pod in enumerate(pods):
        assert pod["spec"]["hostname"] == f"{name}-{index}" and pod["spec"]["subdomain"] == service
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert "JOB_COMPLETION_INDEX" in env, "the Job controller injects the node rank"
        assert env["MASTER_ADDR"]["value"] == f"$(RUN_NAME)-0.{service}.{ns}.svc"
        assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == name, "what $(RUN_NAME) reads"
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-node-0", "gpu-node-1"}, "one GPU node each"

    # The headless Service publishes each pod under its hostname: pod 0 answers to NAME-0.<service>.
    def hostnames() -> set[str]:
        slices = k8s_cluster.kubectl(
            "-n", ns, "get", "endpointslices", "-l", f"kubernetes.io/service-name={service}", "-o", "json"
        ).stdout
        return {e.get("hostname", "") for s in json.loads(slices)["items"] for e in s.get("endpoints") or []}

    k8s_cluster.wait_for(lambda: hostnames() == {f"{name}-0", f"{name}-1"}, what="the rendezvous DNS names")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("serving.replicaz=2", "serving:\n- at '': additional properties 'replicaz' not allowed"),
        ("serving.replicas=-1", "serving:\n- at '/replicas': minimum: got -1, want 0"),
        (
            "gpu.resourceName=acme.com/gpu",
            "gpu:\n- at '/resourceName': value must be one of 'nvidia.com/gpu'",
        ),
        ("trainer.nodes=0", "trainer:\n- at '/nodes': minimum: got 0, want 1"),
        (
            "global.storage.sise=1Gi",
            "loraplane:\n- at '/global/storage': additional properties 'sise' not allowed",
        ),
    ],
)
def test_invalid_values_fail_the_install_with_the_schemas_message_and_install_nothing(
    k8s_cluster: Cluster, bad: str, message: str
) -> None:
    ns = "lp-invalid"
    if k8s_cluster.kubectl("get", "namespace", ns, check=False).returncode != 0:
        k8s_cluster.kubectl("create", "namespace", ns)
    install = k8s_cluster.helm("install", RELEASE, str(CHART), "-n", ns, "--set", bad, check=False)
    assert install.returncode != 0
    assert "values don't meet the specifications of the schema(s)" in install.stderr
    assert message in install.stderr
    assert k8s_cluster.helm("list", "-n", ns, "-a", "-q").stdout.split() == []


def test_the_clusters_controllers_run_without_leader_election(k8s_cluster: Cluster) -> None:
    """With leader election a controller-manager that misses a renewal on a loaded machine exits, and
    kwokctl never restarts it (CI: namespaces without their ServiceAccount). Without it, no Lease."""
    leases = json.loads(k8s_cluster.kubectl("-n", "kube-system", "get", "leases", "-o", "json").stdout)
    names = {lease["metadata"]["name"] for lease in leases["items"]}
    assert not names & {"kube-controller-manager", "kube-scheduler"}, names
    # ...and the controllers do run: a new namespace gets its default ServiceAccount.
    k8s_cluster.restricted_namespace("lease-check")

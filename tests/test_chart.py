"""The Helm chart, rendered by the real helm binary that `make setup` builds.

The umbrella chart (charts/loraplane) vendors three subcharts, each behind a condition: gpu (GPU
prerequisites), trainer (the training Job template and an initial run), serving (vLLM). The tests
read the rendered objects and assert the fields that matter; profiles live in charts/loraplane/ci/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_client import helm_args

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraplane"
SUBCHARTS = ("gpu", "trainer", "serving")
PROFILES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *helm_args(args)], capture_output=True, text=True)


def _render(*sets: str, files: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    args = ["template", "platform", str(CHART), "--namespace", "ml"]
    for f in files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    result = _helm(*args)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _profile(name: str) -> Path:
    (path,) = [p for p in PROFILES if p.name.endswith(f"-{name}-values.yaml")]
    return path


def _fails(*sets: str) -> str:
    args = ["template", "platform", str(CHART)]
    for s in sets:
        args += ["--set", s]
    result = _helm(*args)
    assert result.returncode != 0, f"{sets} rendered"
    return result.stderr


def _vllm(objs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    deploy = objs["Deployment/platform-loraplane-vllm"]
    pod = deploy["spec"]["template"]["spec"]
    return deploy, pod, pod["containers"][0]


def _template_job(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load(
        objs["ConfigMap/platform-loraplane-trainer-template"]["data"]["job.yaml"]
    )
    return job


# --- structure -------------------------------------------------------------------------------------


def test_helm_lint_is_clean_for_every_profile() -> None:
    assert len(PROFILES) >= 6, "the documented profiles are in charts/loraplane/ci/"
    for profile in [None, *PROFILES]:
        extra = ["-f", str(profile)] if profile else []
        result = _helm("lint", "--strict", str(CHART), *extra)
        assert result.returncode == 0, f"{profile}: {result.stdout}{result.stderr}"


def test_the_subcharts_are_vendored_directories_each_behind_its_condition() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in chart["dependencies"] if d["name"] != "gpu-operator"}
    assert set(deps) == set(SUBCHARTS)
    for name, dep in deps.items():
        assert dep["condition"] == f"{name}.enabled"
        assert "repository" not in dep, "nothing to download: the subchart is a directory under charts/"
        sub = yaml.safe_load((CHART / "charts" / name / "Chart.yaml").read_text())
        assert sub["version"] == dep["version"]
    # Helm sees ours as present (unpacked); NVIDIA's GPU operator is the one downloaded (an archive
    # that scripts/chart-deps.sh puts there: tests/test_chart_gpu.py).
    listed = _helm("dependency", "list", str(CHART))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:] if line.strip()]
    statuses = {r[0]: r[-1] for r in rows}
    # `helm dependency list` looks for an archive `gpu-*.tgz` before the directory, finds NVIDIA's
    # gpu-operator archive and calls our `gpu` "misnamed": a quirk of that listing only (rendering
    # loads the directory; tests/test_chart_gpu.py renders both).
    assert statuses["gpu"] in ("unpacked", "misnamed")
    assert {name: statuses[name] for name in ("trainer", "serving")} == {
        "trainer": "unpacked",
        "serving": "unpacked",
    }
    assert set(statuses) == {*SUBCHARTS, "gpu-operator"}


VLLM = "Deployment/platform-loraplane-vllm"
TEMPLATE = "ConfigMap/platform-loraplane-trainer-template"


@pytest.mark.parametrize(
    ("switch", "gone", "kept"),
    [
        ("gpu.enabled=false", [], VLLM),
        ("trainer.enabled=false", [TEMPLATE], VLLM),
        (
            "serving.enabled=false",
            [
                VLLM,
                "Deployment/platform-loraplane-gateway",
                "Secret/platform-loraplane-vllm-key",
                "ConfigMap/platform-loraplane-eval-template",
            ],
            TEMPLATE,
        ),
    ],
)
def test_each_condition_turns_its_part_off(switch: str, gone: list[str], kept: str) -> None:
    objs = _render(switch, "gpu.runtimeClass.create=true")
    assert not set(gone) & set(objs), switch
    assert kept in objs
    assert "PersistentVolumeClaim/platform-loraplane-data" in objs, "shared parts stay in the parent"
    assert ("RuntimeClass/nvidia" in objs) is (switch != "gpu.enabled=false")


def test_the_parent_schema_knows_every_subchart_value_name() -> None:
    """A typo under a subchart's section fails even when that subchart is off (its schema is not run)."""
    parent = json.loads((CHART / "values.schema.json").read_text())
    for name in SUBCHARTS:
        sub = json.loads((CHART / "charts" / name / "values.schema.json").read_text())
        assert set(parent["properties"][name]["properties"]) == set(sub["properties"]), name
        assert (
            sub["additionalProperties"] is False
            and parent["properties"][name]["additionalProperties"] is False
        )
        values = yaml.safe_load((CHART / "charts" / name / "values.yaml").read_text())
        assert set(values) | {"global"} == set(sub["properties"]), (
            f"{name}: values.yaml and its schema differ"
        )
    assert "additional properties 'replicaz' not allowed" in _fails(
        "serving.enabled=false", "serving.replicaz=2"
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("serving.maxLoraRank=12", "at '/maxLoraRank': value must be one of 1, 8, 16"),
        ("global.storage.size=lots", "at '/global/storage/size': 'lots' does not match pattern"),
        ("serving.unknown=1", "additional properties 'unknown' not allowed"),
        ("serving.replicas=-1", "at '/replicas': minimum: got -1, want 0"),
        ("gpu.resourceName=acme.com/gpu", "at '/resourceName': value must be one of 'nvidia.com/gpu'"),
        ("rbac.creat=true", "additional properties 'creat' not allowed"),
        ("trainer.nodes=0", "at '/nodes': minimum: got 0, want 1"),
        ("trainer.backoffLimit=-2", "at '/backoffLimit': minimum: got -2, want 0"),
        (
            "gpu.devicePlugin.image.tag=latest",
            "at '/devicePlugin/image/tag': 'latest' does not match pattern",
        ),
        ("serving.modelSource=s3", "at '/modelSource': value must be one of 'pvc', 'hub'"),
        ("storage.existingClaim=old", "additional properties 'storage' not allowed"),
    ],
)
def test_schema_rejects_bad_values_with_its_message(bad: str, message: str) -> None:
    stderr = _fails(bad)
    assert "values don't meet the specifications of the schema" in stderr
    assert message in stderr


def test_template_checks_fail_with_what_to_change() -> None:
    grace = _fails("serving.terminationGracePeriodSeconds=40")
    assert (
        "serving.terminationGracePeriodSeconds (40) must be at least serving.drain.preStopSeconds (15)"
        in grace
    )
    assert "+ serving.drain.shutdownTimeoutSeconds (45) + 5 = 65" in grace
    model = _fails("serving.model=org/model")
    assert 'serving.model "org/model" is neither a directory on the shared volume' in model
    assert "hf://ORG/NAME@REVISION" in model
    gpus = _fails("trainer.gpusPerNode=4")
    assert "trainer.gpusPerNode (4) must equal the nvidia.com/gpu limit in trainer.resources (1)" in gpus
    hpa = _fails(
        "serving.autoscaling.enabled=true",
        "serving.autoscaling.minReplicas=5",
        "serving.autoscaling.maxReplicas=2",
    )
    assert "minReplicas (5) is above serving.autoscaling.maxReplicas (2)" in hpa


# --- shared parts ----------------------------------------------------------------------------------


def test_default_render_has_kept_pvc_and_hardened_vllm() -> None:
    objs = _render()
    pvc = objs["PersistentVolumeClaim/platform-loraplane-data"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    deploy, pod, container = _vllm(objs)
    pod_meta = deploy["spec"]["template"]["metadata"]
    assert container["command"] == ["python", "-m", "loraplane.serving"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsUser"] == 10001
    # Rehydration: vLLM reads the registry at startup with a read-only token of its own.
    assert (
        pod["serviceAccountName"] == "platform-loraplane-vllm" and pod["automountServiceAccountToken"] is True
    )
    assert {"--registry=kubernetes", "--namespace=ml", "--adapters-root=/data/adapters"} <= set(
        container["args"]
    )
    role = objs["Role/platform-loraplane-registry-reader"]
    assert role["rules"] == [
        {"apiGroups": ["loraplane.dev"], "resources": ["loraadapters"], "verbs": ["get", "list", "watch"]}
    ]
    readers = objs["RoleBinding/platform-loraplane-registry-reader"]["subjects"]
    assert [s["name"] for s in readers] == ["platform-loraplane-vllm", "platform-loraplane-gateway"]
    # The reconciler reports in the status subresource only: it can never change a spec.
    reporter = objs["Role/platform-loraplane-registry-reporter"]
    assert reporter["rules"] == [
        {"apiGroups": ["loraplane.dev"], "resources": ["loraadapters/status"], "verbs": ["patch"]}
    ]
    reporters = objs["RoleBinding/platform-loraplane-registry-reporter"]["subjects"]
    assert [s["name"] for s in reporters] == ["platform-loraplane-vllm"]
    # The label the CLI finds watching pods by (platform/convergence.py SELECTOR).
    assert pod_meta["labels"]["loraplane.dev/reconciler"] == "watch"
    static = _render("serving.rehydrate=false", "gateway.enabled=false")
    static_deploy, static_pod, static_container = _vllm(static)
    assert "loraplane.dev/reconciler" not in static_deploy["spec"]["template"]["metadata"]["labels"]
    assert "Role/platform-loraplane-registry-reporter" not in static
    assert static_pod["automountServiceAccountToken"] is False
    assert not any(a.startswith("--registry") for a in static_container["args"])
    assert not any(a.startswith("--registry") for a in static_container["readinessProbe"]["exec"]["command"])
    assert "Role/platform-loraplane-registry-reader" not in static
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "platform-loraplane-data"
    assert objs["Service/platform-loraplane-vllm"]["spec"]["type"] == "ClusterIP"


def test_global_names_storage_and_runtime_class_reach_every_subchart() -> None:
    objs = _render(files=(_profile("existing-pvc"),))
    assert not any(k.startswith("PersistentVolumeClaim/") for k in objs)
    _, pod, container = _vllm(objs)
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert {"name": "data", "mountPath": "/models"} in container["volumeMounts"]
    assert (
        "--model=/models/base" in container["args"]
        and "--adapters-root=/models/adapters" in container["args"]
    )
    job = _template_job(objs)["spec"]["template"]["spec"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared-models"
    assert {"name": "HF_HOME", "value": "/models/hf-cache"} in job["containers"][0]["env"]

    renamed = _render(
        "global.fullnameOverride=lp",
        "global.runtimeClassName=nvidia",
        "global.imagePullSecrets[0].name=regcred",
    )
    assert {
        "Deployment/lp-vllm",
        "Deployment/lp-gateway",
        "ConfigMap/lp-trainer-template",
        "PersistentVolumeClaim/lp-data",
    } <= set(renamed)
    vllm_pod = renamed["Deployment/lp-vllm"]["spec"]["template"]["spec"]
    trainer_pod = yaml.safe_load(renamed["ConfigMap/lp-trainer-template"]["data"]["job.yaml"])["spec"][
        "template"
    ]["spec"]
    for pod_spec in (vllm_pod, trainer_pod):
        assert pod_spec["runtimeClassName"] == "nvidia"
        assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert renamed["Deployment/lp-gateway"]["spec"]["template"]["spec"].get("runtimeClassName") is None, (
        "no GPU"
    )
    assert "runtimeClassName" not in pod, "unset by default: the node's default runtime"


def test_existing_claim_and_api_key_secret() -> None:
    objs = _render("global.storage.existingClaim=shared", "serving.apiKeySecret.name=vllm-key")
    assert not any(k.startswith("PersistentVolumeClaim/") for k in objs)
    _, pod, container = _vllm(objs)
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared"
    assert "--api-key-file=/etc/loraplane/api-key/api-key" in container["args"]
    assert {"name": "api-key", "secret": {"secretName": "vllm-key"}} in pod["volumes"]


PVC = "PersistentVolumeClaim/platform-loraplane-data"


def test_storage_class_default_none_or_named() -> None:
    # "" leaves the field out: the cluster's default class provisions the volume.
    assert "storageClassName" not in _render()[PVC]["spec"]
    # "-" is "no class": an empty storageClassName turns dynamic provisioning off, so the claim
    # binds a PersistentVolume made beforehand (NFS, hostPath), never the default class.
    assert _render("global.storage.storageClass=-")[PVC]["spec"]["storageClassName"] == ""
    assert _render("global.storage.storageClass=efs-sc")[PVC]["spec"]["storageClassName"] == "efs-sc"
    assert "at '/global/storage/storageClass'" in _fails("global.storage.storageClass=Not A Class")


def test_no_claim_created_and_none_named_is_refused() -> None:
    stderr = _fails("global.storage.create=false")
    assert (
        "global.storage.create=false with an empty global.storage.existingClaim" in stderr
        and '"platform-loraplane-data", which does not exist' in stderr
        and "Set global.storage.existingClaim to the name of your PVC" in stderr
        and "global.storage.create=true" in stderr
    )
    # Named, it is mounted and none is created; with only the GPU prerequisites nothing mounts one.
    named = _render("global.storage.create=false", "global.storage.existingClaim=mine")
    assert PVC not in named
    assert _vllm(named)[1]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mine"
    gpu_only = _render("global.storage.create=false", "trainer.enabled=false", "serving.enabled=false")
    assert not any(k.startswith("PersistentVolumeClaim/") for k in gpu_only)


SAME_NODE = {
    "topologyKey": "kubernetes.io/hostname",
    "labelSelector": {
        "matchLabels": {"app.kubernetes.io/instance": "platform"},
        "matchExpressions": [
            {
                "key": "app.kubernetes.io/component",
                "operator": "In",
                "values": ["vllm", "trainer", "volume-put", "model-fetch", "eval"],
            }
        ],
    },
}


def _required_pod_affinity(template: dict[str, Any]) -> list[Any]:
    affinity = template["spec"].get("affinity") or {}
    terms: list[Any] = (affinity.get("podAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", []
    )
    return terms


def test_single_node_storage_claims_read_write_once_and_holds_the_volumes_pods_on_one_node() -> None:
    objs = _render(files=(_profile("single-node-storage"),))
    assert objs[PVC]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in objs[PVC]["spec"], "the cluster's default (block) class"
    pods = _pod_templates(objs)
    holders = {
        k for k, (_, t) in pods.items() if any("persistentVolumeClaim" in v for v in t["spec"]["volumes"])
    }
    assert {VLLM, "ConfigMap/platform-loraplane-trainer-template/job.yaml"} <= holders
    assert any(k.startswith("Job/platform-loraplane-run-") for k in holders), "the initial run"
    for key, (_, template) in pods.items():
        terms = _required_pod_affinity(template)
        if key not in holders:
            assert SAME_NODE not in terms, f"{key} mounts no volume: it may run anywhere"
            continue
        assert terms == [SAME_NODE], key
        # Each holder matches its own term: the first one schedules anywhere, the others follow it.
        labels = template["metadata"]["labels"]
        assert SAME_NODE["labelSelector"]["matchLabels"].items() <= labels.items(), key
        assert (
            labels["app.kubernetes.io/component"]
            in SAME_NODE["labelSelector"]["matchExpressions"][0]["values"]
        )
    # The user's own affinity stays next to it.
    trainer = _template_job(objs)["spec"]["template"]["spec"]["affinity"]
    assert trainer["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 50
    assert _vllm(objs)[0]["spec"]["replicas"] == 2

    # Off (the default), nothing pins a pod to another's node.
    for key, (_, template) in _pod_templates(_render()).items():
        assert not _required_pod_affinity(template), key
    # An existing ReadWriteOnce claim: the same affinity, no claim created.
    own = _render("global.storage.singleNode=true", "global.storage.existingClaim=rwo")
    assert PVC not in own
    assert _required_pod_affinity(_vllm(own)[0]["spec"]["template"]) == [SAME_NODE]
    # A user's required pod affinity is kept and the volume's term added after it.
    mine = {"topologyKey": "topology.kubernetes.io/zone", "labelSelector": {"matchLabels": {"app": "db"}}}
    both = _render(
        "global.storage.singleNode=true",
        "serving.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey="
        "topology.kubernetes.io/zone",
        "serving.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector.matchLabels.app=db",
    )
    assert _required_pod_affinity(both[VLLM]["spec"]["template"]) == [mine, SAME_NODE]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("global.storage.singleNode=true", "global.storage.accessModes={ReadWriteMany}"),
            'global.storage.accessModes ["ReadWriteMany"] contradicts global.storage.singleNode=true',
        ),
        (
            ("global.storage.accessModes={ReadWriteOnce}",),
            'global.storage.accessModes ["ReadWriteOnce"] lacks ReadWriteMany',
        ),
        (
            ("global.storage.accessModes={ReadWriteOncePod}",),
            "or set global.storage.singleNode=true to claim ReadWriteOnce",
        ),
        (
            ("global.storage.singleNode=true", "global.storage.accessModes={ReadWriteOncePod}"),
            "Leave accessModes empty (or [ReadWriteOnce])",
        ),
        (
            ("global.storage.singleNode=true", "trainer.nodes=2"),
            "trainer.nodes (2) spreads each run over 2 nodes, but global.storage.singleNode=true",
        ),
    ],
)
def test_storage_modes_that_cannot_work_are_refused(sets: tuple[str, ...], message: str) -> None:
    assert message in _fails(*sets)


def test_explicit_access_modes_that_fit_render_as_given() -> None:
    assert _render("global.storage.accessModes={ReadWriteMany}")[PVC]["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    one = _render("global.storage.singleNode=true", "global.storage.accessModes={ReadWriteOnce}")
    assert one[PVC]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_users_reach_vllm_only_through_the_gateway_with_generated_keys() -> None:
    objs = _render()
    _, vllm, _ = _vllm(objs)
    assert "--api-key-file=/etc/loraplane/api-key/api-key" in vllm["containers"][0]["args"]
    assert {"name": "api-key", "secret": {"secretName": "platform-loraplane-vllm-key"}} in vllm["volumes"]
    assert set(objs["Secret/platform-loraplane-vllm-key"]["data"]) == {"api-key"}
    assert set(objs["Secret/platform-loraplane-gateway-keys"]["data"]) == {"keys"}

    gateway = objs["Deployment/platform-loraplane-gateway"]["spec"]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    assert vllm["containers"][0]["image"] == "ghcr.io/loraplane/loraplane:0.1.0"
    assert gateway["containers"][0]["image"] == "ghcr.io/loraplane/loraplane-gateway:0.1.0", "its slim image"
    assert "--upstream=http://platform-loraplane-vllm:8000" in args
    assert {"--registry=kubernetes", "--namespace=ml", "--host=0.0.0.0"} <= set(args)
    assert "--upstream-api-key-file=/etc/loraplane/api-key/api-key" in args
    assert "--api-keys-file=/etc/loraplane/gateway-keys/keys" in args
    assert gateway["containers"][0]["livenessProbe"] == {"tcpSocket": {"port": "http"}, "periodSeconds": 10}
    assert gateway["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

    policy = objs["NetworkPolicy/platform-loraplane-vllm"]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "vllm"
    assert len(policy["ingress"]) == 1, "no metrics scrapers unless a ServiceMonitor is on"
    sources = [p["podSelector"]["matchLabels"] for p in policy["ingress"][0]["from"]]
    assert sources == [
        {"app.kubernetes.io/instance": "platform", "app.kubernetes.io/component": "gateway"},
        {"loraplane.dev/vllm-client": "true"},
    ]
    assert policy["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]

    # a Pod, named as helm test --logs looks it up; the only test hook (another would break --logs)
    hooks = [k for k, o in objs.items() if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert hooks == ["Pod/platform-loraplane-test-models"], hooks
    hook = objs["Pod/platform-loraplane-test-models"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert hook["spec"]["restartPolicy"] == "Never" and hook["spec"]["activeDeadlineSeconds"] == 120
    # it needs only Python and httpx: the gateway's slim image, never the multi-GB serving image
    gateway_image = objs["Deployment/platform-loraplane-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert hook["spec"]["containers"][0]["image"] == gateway_image["image"]
    script = hook["spec"]["containers"][0]["command"][2]
    assert "/v1/models" in script and "/v1/chat/completions" in script and '"max_tokens": 1' in script
    # what it runs is tested against the real gateway in tests/test_gateway_e2e.py

    own = _render(
        "serving.apiKeySecret.name=mine", "serving.apiKeySecret.key=token", "gateway.apiKeysSecret.name=users"
    )
    assert not any(k.startswith("Secret/") for k in own), "the user's Secrets are used, none generated"
    own_gw = own["Deployment/platform-loraplane-gateway"]["spec"]["template"]["spec"]
    assert "--upstream-api-key-file=/etc/loraplane/api-key/token" in own_gw["containers"][0]["args"]
    assert {"name": "gateway-keys", "secret": {"secretName": "users"}} in own_gw["volumes"]
    own_container = _vllm(own)[2]
    assert "--api-key-file=/etc/loraplane/api-key/token" in own_container["readinessProbe"]["exec"]["command"]


GATEWAY = "Deployment/platform-loraplane-gateway"
VLLM_KEY = "Secret/platform-loraplane-vllm-key"
CLIENT_KEYS = "Secret/platform-loraplane-gateway-keys"
# The only labels a pod template may carry: none changes with a chart release (train submit and the
# initial run add the adapter's name).
STABLE_POD_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
}


def _pod_templates(objs: dict[str, dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every pod template of a render with the object holding it: workloads' spec.template, bare Pods,
    CronJobs' job template, and the training Job template inside its ConfigMap (what `train submit`
    creates)."""
    found: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for key, obj in objs.items():
        spec = obj.get("spec")
        if obj["kind"] == "Pod":
            found[key] = (obj, obj)
        elif obj["kind"] == "CronJob":
            found[key] = (obj, obj["spec"]["jobTemplate"]["spec"]["template"])
        elif isinstance(spec, dict) and isinstance(spec.get("template"), dict) and "spec" in spec["template"]:
            found[key] = (obj, spec["template"])
        elif obj["kind"] == "ConfigMap" and "job.yaml" in obj.get("data", {}):
            job = yaml.safe_load(obj["data"]["job.yaml"])
            found[f"{key}/job.yaml"] = (job, job["spec"]["template"])
    return found


def _sha256(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def _checksums(template: dict[str, Any]) -> dict[str, str]:
    annotations = template["metadata"].get("annotations") or {}
    return {k: v for k, v in annotations.items() if k.startswith("checksum/")}


@pytest.mark.parametrize("profile", [None, *PROFILES], ids=lambda p: p.name if p else "defaults")
def test_pod_templates_carry_only_stable_labels(profile: Path | None) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    objs = _render(files=(profile,) if profile else ())
    pods = _pod_templates(objs)
    assert any(k.endswith("/job.yaml") for k in pods) or any(k.startswith("Deployment/") for k in pods), (
        "the walk found the chart's pod templates"
    )
    for key, (owner, template) in pods.items():
        labels = template["metadata"]["labels"]
        assert set(labels) >= STABLE_POD_LABELS, key
        extra = {"loraplane.dev/adapter", "loraplane.dev/reconciler", "loraplane.dev/vllm-client"}
        assert set(labels) - STABLE_POD_LABELS <= extra, f"{key}: {labels}"
        assert labels["app.kubernetes.io/instance"] == "platform"
        for value in labels.values():
            assert chart["version"] not in value and chart["appVersion"] not in value, f"{key}: {labels}"
        selector = (owner.get("spec") or {}).get("selector") or {}
        assert selector.get("matchLabels", {}).items() <= labels.items(), f"{key}: the selector matches"
        if owner is template:  # a bare Pod (the helm test hook) is its own template
            continue
        # The object itself keeps the full set.
        assert owner["metadata"]["labels"]["helm.sh/chart"].endswith(f"-{chart['version']}"), key
        assert owner["metadata"]["labels"]["app.kubernetes.io/version"] == chart["appVersion"], key


@pytest.mark.parametrize("profile", [None, *PROFILES], ids=lambda p: p.name if p else "defaults")
def test_pods_on_the_shared_volume_chown_it_only_on_a_root_mismatch(profile: Path | None) -> None:
    objs = _render(files=(profile,) if profile else ())
    claim = (yaml.safe_load(profile.read_text()) if profile else {}).get("global", {}).get("storage", {})
    claim_name = claim.get("existingClaim") or "platform-loraplane-data"
    mounting = []
    for key, (_, template) in _pod_templates(objs).items():
        spec = template["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        ]
        security = spec.get("securityContext") or {}
        if claims:
            assert claims == [claim_name], key
            mounting.append(key)
            # fsGroup makes the volume writable by uid 10001 on any provisioner that honours it ...
            assert security.get("fsGroup") == 10001, key
        if "fsGroup" in security:
            # ... and OnRootMismatch spares a recursive chown of every adapter file at each start.
            assert security.get("fsGroupChangePolicy") == "OnRootMismatch", key
    # Every vLLM and training pod (the Job template, the initial run where a profile has one).
    workloads = {
        k for k in _pod_templates(objs) if k == VLLM or k.startswith("Job/") or k.endswith("/job.yaml")
    }
    assert workloads and workloads <= set(mounting), (workloads, mounting)


def test_generated_keys_roll_the_pods_that_use_them() -> None:
    first, second = _render(), _render()
    for objs in (first, second):
        vllm_key = objs[VLLM_KEY]["data"]["api-key"]
        client_keys = objs[CLIENT_KEYS]["data"]["keys"]
        assert len(base64.b64decode(vllm_key)) == 40 and vllm_key != client_keys
        pods = _pod_templates(objs)
        # Each pod that reads a generated key at start carries the checksum of that key, the very
        # Secret of the same render (vLLM's template lives in the serving subchart).
        assert _checksums(pods[VLLM][1]) == {"checksum/vllm-key": _sha256(vllm_key)}
        assert _checksums(pods[GATEWAY][1]) == {
            "checksum/vllm-key": _sha256(vllm_key),
            "checksum/gateway-keys": _sha256(client_keys),
        }
        for key, (_, template) in pods.items():
            if key not in (VLLM, GATEWAY):
                assert not _checksums(template), f"{key} reads no key at start, nothing to roll"
    # helm template has no cluster to read kept keys back from: each render makes new keys, and the
    # checksums follow them (the kept path, where they stay, is tests/test_k8s_e2e.py's upgrade).
    assert first[VLLM_KEY]["data"] != second[VLLM_KEY]["data"]
    assert _checksums(first[VLLM]["spec"]["template"]) != _checksums(second[VLLM]["spec"]["template"])

    # The user's pod annotations stay next to the checksum; a renamed key names the generated data.
    objs = _render("serving.podAnnotations.team=ml", "gateway.apiKeysSecret.key=clients")
    clients = objs[CLIENT_KEYS]["data"]
    assert set(clients) == {"clients"}
    gateway = objs[GATEWAY]["spec"]["template"]
    assert "--api-keys-file=/etc/loraplane/gateway-keys/clients" in gateway["spec"]["containers"][0]["args"]
    assert _checksums(gateway)["checksum/gateway-keys"] == _sha256(clients["clients"])
    assert objs[VLLM]["spec"]["template"]["metadata"]["annotations"] == {
        "team": "ml",
        "checksum/vllm-key": _sha256(objs[VLLM_KEY]["data"]["api-key"]),
    }


def test_a_secret_the_user_names_is_not_generated_and_has_no_checksum() -> None:
    own = _render(files=(_profile("external-secrets"),))
    assert not any(k.startswith("Secret/") for k in own)
    for key, (_, template) in _pod_templates(own).items():
        assert not _checksums(template), f"{key}: the chart cannot see the user's Secret"
    assert "annotations" not in own[VLLM]["spec"]["template"]["metadata"]
    # One of each: only the generated key is checksummed, on the pods that use it.
    mixed = _render("serving.apiKeySecret.name=mine")
    assert VLLM_KEY not in mixed and CLIENT_KEYS in mixed
    assert not _checksums(mixed[VLLM]["spec"]["template"])
    assert _checksums(mixed[GATEWAY]["spec"]["template"]) == {
        "checksum/gateway-keys": _sha256(mixed[CLIENT_KEYS]["data"]["keys"])
    }
    other = _render("gateway.apiKeysSecret.name=users")
    assert CLIENT_KEYS not in other
    assert _checksums(other[GATEWAY]["spec"]["template"]) == {
        "checksum/vllm-key": _sha256(other[VLLM_KEY]["data"]["api-key"])
    }


def test_the_readmes_gitops_recipe_pre_creates_the_secrets_the_chart_then_uses(tmp_path: Path) -> None:
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Keys", 1)[1].split("\n## ", 1)[0]
    create = r"^kubectl -n ml create secret generic (\S+) --from-literal=([\w-]+)="
    commands = re.findall(create, section, re.M)
    (values_block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    values = yaml.safe_load(values_block)
    named = {
        values["serving"]["apiKeySecret"]["name"]: values["serving"]["apiKeySecret"]["key"],
        values["gateway"]["apiKeysSecret"]["name"]: values["gateway"]["apiKeysSecret"]["key"],
    }
    assert dict(commands) == named, "the kubectl commands create the Secrets and keys the values name"
    path = tmp_path / "values.yaml"
    path.write_text(values_block)
    objs = _render(files=(path,))
    assert not any(k.startswith("Secret/") for k in objs), "nothing generated: nothing changes per render"
    vllm = objs[VLLM]["spec"]["template"]["spec"]
    gateway = objs[GATEWAY]["spec"]["template"]["spec"]
    vllm_secret = values["serving"]["apiKeySecret"]["name"]
    assert {"name": "api-key", "secret": {"secretName": vllm_secret}} in vllm["volumes"]
    assert {"name": "api-key", "secret": {"secretName": vllm_secret}} in gateway["volumes"]
    client_secret = values["gateway"]["apiKeysSecret"]["name"]
    assert {"name": "gateway-keys", "secret": {"secretName": client_secret}} in gateway["volumes"]


# --- serving ---------------------------------------------------------------------------------------


def test_vllm_arguments_match_the_values() -> None:
    objs = _render(
        "serving.maxLoras=6", "serving.maxLoraRank=64", "serving.maxModelLen=8192", "serving.dtype=bfloat16",
        "serving.servedModelName=qwen", "serving.port=8123", "serving.drain.shutdownTimeoutSeconds=30",
    )  # fmt: skip
    _, _, container = _vllm(objs)
    assert container["args"][:15] == [
        "--model=/data/models/base",
        "--served-model-name=qwen",
        "--host=0.0.0.0",
        "--port=8123",
        "--max-loras=6",
        "--max-lora-rank=64",
        "--max-model-len=8192",
        "--max-num-seqs=256",
        "--dtype=bfloat16",
        "--tensor-parallel-size=1",
        "--gpu-memory-utilization=0.9",
        "--enable-prefix-caching",
        "--runtime-lora-updating",
        "--shutdown-timeout=30",
        "--api-key-file=/etc/loraplane/api-key/api-key",
    ]
    # the reconciler's metrics port (serving.metricsPort) beside vLLM's (tests/test_monitoring.py)
    assert container["ports"] == [
        {"name": "http", "containerPort": 8123},
        {"name": "metrics", "containerPort": 9400},
    ]
    closed = _vllm(_render("serving.runtimeLoraUpdating=false"))[2]
    assert "--no-runtime-lora-updating" in closed["args"]


def test_the_serving_entry_point_accepts_every_argument_the_chart_passes(tmp_path: Path) -> None:
    """The chart's args, parsed by the real `python -m loraplane.serving` (it prints vLLM's command)."""
    _, _, container = _vllm(_render("serving.rehydrate=false", "serving.drain.shutdownTimeoutSeconds=33"))
    key = tmp_path / "api-key"
    key.write_text("k")
    args = [a.replace("/etc/loraplane/api-key/api-key", str(key)) for a in container["args"]]
    result = subprocess.run(
        [sys.executable, *container["command"][1:], *args, "--print-argv"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    vllm_argv = shlex.split(result.stdout)
    assert vllm_argv[vllm_argv.index("--shutdown-timeout") + 1] == "33"
    assert vllm_argv[vllm_argv.index("--max-loras") + 1] == "4" and "--enable-lora" in vllm_argv
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in vllm_argv


def _arg(args: list[str], flag: str) -> str:
    """The value of ``--flag=value`` in a container's args."""
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    return value


def test_probes_are_sized_for_long_loads_and_readiness_runs_the_readiness_module() -> None:
    _, _, container = _vllm(
        _render("serving.startupTimeoutSeconds=2400", "serving.readiness.timeoutSeconds=20")
    )
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2400
    readiness = container["readinessProbe"]
    assert readiness["exec"]["command"] == [
        "python", "-m", "loraplane.serving.readiness",
        "--url=http://127.0.0.1:8000",
        "--api-key-file=/etc/loraplane/api-key/api-key",
        "--base-model=base",
        "--registry=kubernetes",
        "--namespace=ml",
        "--adapters-root=/data/adapters",
        f"--max-lora-rank={_arg(container['args'], '--max-lora-rank')}",
        f"--state-file={_arg(container['args'], '--state-file')}",
        "--timeout=20",
    ]  # fmt: skip
    # the probe reads the state the supervisor keeps on the pod's own /tmp, not a shared volume
    assert _arg(container["args"], "--state-file").startswith("/tmp/")
    assert readiness["timeoutSeconds"] > 20, "the probe outlives the module's own deadline"
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_the_readiness_module_accepts_the_probes_arguments() -> None:
    """The exec probe's flags, parsed by the real module's own parser (argparse exits on a bad flag)."""
    from loraplane.serving import readiness

    _, _, container = _vllm(_render())
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:3] == ["python", "-m", readiness.__name__]
    parsed = readiness._parse(command[3:])
    assert parsed.url == "http://127.0.0.1:8000" and parsed.base_model == "base"
    assert parsed.registry == "kubernetes" and parsed.namespace == "ml" and parsed.timeout == 10
    assert str(parsed.api_key_file) == "/etc/loraplane/api-key/api-key"
    # the limits it applies to registered versions are the server's own
    assert str(parsed.adapters_root) == _arg(container["args"], "--adapters-root")
    assert parsed.max_lora_rank == int(_arg(container["args"], "--max-lora-rank"))
    _, _, wide = _vllm(_render("serving.maxLoraRank=64"))
    assert (
        "--max-lora-rank=64" in wide["args"]
        and "--max-lora-rank=64" in wide["readinessProbe"]["exec"]["command"]
    )


def test_drain_settings_are_consistent_and_tested_at_their_limit() -> None:
    for pre, shutdown in ((15, 45), (5, 10), (30, 120)):
        grace = pre + shutdown + 5
        objs = _render(
            f"serving.drain.preStopSeconds={pre}",
            f"serving.drain.shutdownTimeoutSeconds={shutdown}",
            f"serving.terminationGracePeriodSeconds={grace}",
        )
        _, pod, container = _vllm(objs)
        assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": pre}}
        assert f"--shutdown-timeout={shutdown}" in container["args"]
        assert pod["terminationGracePeriodSeconds"] >= pre + shutdown + 5
        assert "terminationGracePeriodSeconds" in _fails(
            f"serving.drain.preStopSeconds={pre}",
            f"serving.drain.shutdownTimeoutSeconds={shutdown}",
            f"serving.terminationGracePeriodSeconds={grace - 1}",
        )
    _, default_pod, default_container = _vllm(_render())
    pre = default_container["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = int(
        next(a for a in default_container["args"] if a.startswith("--shutdown-timeout=")).split("=")[1]
    )
    assert default_pod["terminationGracePeriodSeconds"] >= pre + shutdown + 5


def test_rollouts_work_on_a_single_gpu_node() -> None:
    one, _, _ = _vllm(_render())
    assert one["spec"]["strategy"] == {"type": "Recreate"}, "no surge pod waiting for a second GPU"
    assert one["spec"]["replicas"] == 1
    assert one["spec"]["progressDeadlineSeconds"] > 1800, "a rollout may take a model load"
    two, _, _ = _vllm(_render("serving.replicas=2"))
    assert two["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    own, _, _ = _vllm(
        _render(
            "serving.strategy.type=RollingUpdate",
            "serving.strategy.rollingUpdate.maxSurge=1",
            "serving.strategy.rollingUpdate.maxUnavailable=0",
        )
    )
    assert own["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_disruption_budget_autoscaler_and_service_monitors() -> None:
    objs = _render()
    pdb = objs["PodDisruptionBudget/platform-loraplane-vllm"]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["selector"]["matchLabels"] == {
        "app.kubernetes.io/instance": "platform",
        "app.kubernetes.io/component": "vllm",
    }
    assert not any(k.startswith(("HorizontalPodAutoscaler/", "ServiceMonitor/")) for k in objs)
    assert "PodDisruptionBudget/platform-loraplane-vllm" not in _render(
        "serving.podDisruptionBudget.enabled=false"
    )

    scaled = _render(files=(_profile("autoscaling-monitoring"),))
    deploy, _, _ = _vllm(scaled)
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    hpa = scaled["HorizontalPodAutoscaler/platform-loraplane-vllm"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "platform-loraplane-vllm",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    for part in ("vllm", "gateway"):
        monitor = scaled[f"ServiceMonitor/platform-loraplane-{part}"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == part
        assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "30s"}
        # vLLM's pods also serve their reconciler's metrics (serving.metricsPort)
        assert [e["port"] for e in monitor["spec"]["endpoints"][1:]] == (
            ["metrics"] if part == "vllm" else []
        )
        service = scaled[f"Service/platform-loraplane-{part}"]
        assert service["spec"]["ports"][0]["name"] == "http"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    scrape = scaled["NetworkPolicy/platform-loraplane-vllm"]["spec"]["ingress"][1]
    assert scrape["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    assert scrape["ports"] == [
        {"port": 8000, "protocol": "TCP"},
        {"port": 9400, "protocol": "TCP"},
    ]  # vLLM, reconciler


# --- the gateway tier ------------------------------------------------------------------------------

GATEWAY_NAME = "platform-loraplane-gateway"
GATEWAY_PODS = {"app.kubernetes.io/instance": "platform", "app.kubernetes.io/component": "gateway"}


def _gateway_deploy(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    deploy: dict[str, Any] = objs[f"Deployment/{GATEWAY_NAME}"]
    return deploy


def test_the_gateway_runs_two_replicas_under_a_budget_that_selects_only_its_pods() -> None:
    objs = _render()
    deploy = _gateway_deploy(objs)
    assert deploy["spec"]["replicas"] == 2
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    pdb = objs[f"PodDisruptionBudget/{GATEWAY_NAME}"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"] == {"matchLabels": GATEWAY_PODS}
    assert GATEWAY_PODS.items() <= pod_labels.items()
    # The budget's selector matches no other pod of the release (vLLM has a budget of its own).
    for key, obj in objs.items():
        template = (obj.get("spec") or {}).get("template")
        if key != f"Deployment/{GATEWAY_NAME}" and isinstance(template, dict) and "metadata" in template:
            assert not GATEWAY_PODS.items() <= template["metadata"].get("labels", {}).items(), key
    # Soft anti-affinity by default: replicas prefer different nodes, and still schedule on one.
    (term,) = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"] == {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": GATEWAY_PODS},
    }
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in str(deploy["spec"]["template"])
    assert not any(k.startswith(("HorizontalPodAutoscaler/", "Ingress/", "HTTPRoute/")) for k in objs)

    assert f"PodDisruptionBudget/{GATEWAY_NAME}" not in _render("gateway.replicas=1"), (
        "one replica: a budget could only block drains"
    )
    assert f"PodDisruptionBudget/{GATEWAY_NAME}" not in _render("gateway.podDisruptionBudget.enabled=false")
    by_min = _render("gateway.replicas=3", "gateway.podDisruptionBudget.minAvailable=50%")
    assert by_min[f"PodDisruptionBudget/{GATEWAY_NAME}"]["spec"] == {
        "minAvailable": "50%",
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": GATEWAY_PODS},
    }
    own = _gateway_deploy(
        _render("gateway.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
                "gateway.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists")
    )  # fmt: skip
    assert set(own["spec"]["template"]["spec"]["affinity"]) == {"nodeAffinity"}, "yours replaces the default"


def test_the_gateway_runs_its_own_slim_image_and_keeps_its_budget() -> None:
    """gateway.image, not serving.image: the tier users talk to pulls no torch or vLLM."""
    for objs, image, policy in (
        (_render(), "ghcr.io/loraplane/loraplane-gateway:0.1.0", "IfNotPresent"),
        (
            _render("gateway.image.repository=registry.example/gw", "gateway.image.tag=1.2.3",
                    "gateway.image.pullPolicy=Always", "serving.image.repository=registry.example/vllm"),
            "registry.example/gw:1.2.3",
            "Always",
        ),
        (
            _render(files=(_profile("cpu-node"),)),
            "localhost/loraplane/loraplane-gateway:0.1.0",
            "IfNotPresent",
        ),
    ):  # fmt: skip
        (container,) = _gateway_deploy(objs)["spec"]["template"]["spec"]["containers"]
        assert (container["image"], container["imagePullPolicy"]) == (image, policy)
        _, _, vllm = _vllm(objs)
        assert vllm["image"] != container["image"], "the serving image stays vLLM's"
        pdb = objs[f"PodDisruptionBudget/{GATEWAY_NAME}"]
        assert pdb["spec"]["selector"] == {"matchLabels": GATEWAY_PODS}, "the gateway keeps its budget"
    assert "at '/gateway/image/tag': got number, want string" in _fails("gateway.image.tag=1")
    unknown = _fails("gateway.image.registry=x")
    assert "at '/gateway/image': additional properties 'registry' not allowed" in unknown
    assert "at '/gateway/image/pullPolicy'" in _fails("gateway.image.pullPolicy=Sometimes")


def test_the_gateway_autoscaler_owns_the_replica_count() -> None:
    objs = _render("gateway.autoscaling.enabled=true", "gateway.autoscaling.maxReplicas=8")
    deploy = _gateway_deploy(objs)
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    hpa = objs[f"HorizontalPodAutoscaler/{GATEWAY_NAME}"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": GATEWAY_NAME,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]
    assert deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "100m"
    assert f"PodDisruptionBudget/{GATEWAY_NAME}" in objs, "minReplicas 2: the budget stays"
    single = _render("gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=1")
    assert f"PodDisruptionBudget/{GATEWAY_NAME}" not in single
    assert "HorizontalPodAutoscaler/platform-loraplane-vllm" not in objs, "each tier scales on its own"


def test_ingress_and_httproute_send_every_path_to_the_gateway_service_and_nothing_else() -> None:
    objs = _render(files=(_profile("autoscaling-monitoring"),))
    service = objs[f"Service/{GATEWAY_NAME}"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 80
    container = _gateway_deploy(objs)["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    backend = {"service": {"name": GATEWAY_NAME, "port": {"number": 80}}}

    ingress = objs[f"Ingress/{GATEWAY_NAME}"]
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    assert ingress["spec"]["rules"] == [
        {
            "host": "llm.example.com",
            "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]},
        }
    ]
    assert "defaultBackend" not in ingress["spec"]

    route = objs[f"HTTPRoute/{GATEWAY_NAME}"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [
        {"name": "public", "namespace": "gateway-system", "sectionName": "https"}
    ]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    assert route["spec"]["rules"] == [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [{"name": GATEWAY_NAME, "port": 80}],
            "timeouts": {"request": "600s"},
        }
    ]
    # The backends follow the Service's port, and a host-less Ingress has one rule for any host.
    moved = _render(
        "gateway.service.port=8081", "gateway.ingress.enabled=true", "gateway.httpRoute.enabled=true",
        "gateway.httpRoute.parentRefs[0].name=public",
    )  # fmt: skip
    assert moved[f"Ingress/{GATEWAY_NAME}"]["spec"] == {
        "rules": [
            {
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": GATEWAY_NAME, "port": {"number": 8081}}},
                        }
                    ]
                }
            }
        ]
    }
    moved_route = moved[f"HTTPRoute/{GATEWAY_NAME}"]["spec"]
    assert moved_route["rules"][0]["backendRefs"] == [{"name": GATEWAY_NAME, "port": 8081}]
    assert "hostnames" not in moved_route and "timeouts" not in moved_route["rules"][0]
    # vLLM's Service (its admin routes) is never a backend.
    assert "loraplane-vllm" not in json.dumps([objs[f"Ingress/{GATEWAY_NAME}"], route])


def _gateway_config(objs: dict[str, dict[str, Any]], tmp_path: Path) -> Any:
    """The config the gateway's entry point makes of the rendered args and environment (key files
    replaced by local ones)."""
    from loraplane.serving.gateway.app import parse_args
    from loraplane.serving.gateway.config import config_from_args

    container = _gateway_deploy(objs)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "loraplane.serving.gateway"]
    keys = tmp_path / "keys"
    keys.write_text("client-key\n")
    args = [
        re.sub(r"^(--api-keys-file|--upstream-api-key-file)=.*$", rf"\1={keys}", a)
        for a in container["args"]
        if not a.startswith("--home=")
    ]
    environ = {e["name"]: e["value"] for e in container["env"]}
    return config_from_args(parse_args([*args, f"--home={tmp_path}"]), environ)


def test_canary_values_reach_the_gateways_config(tmp_path: Path) -> None:
    from loraplane.serving.gateway.canary import CanaryRule

    env = _gateway_deploy(_render())["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "LORAPLANE_GATEWAY_CANARIES" not in {e["name"] for e in env}
    assert _gateway_config(_render(), tmp_path).canaries == {}

    values = tmp_path / "canary.yaml"  # a file: --set would make 12.5 a string
    values.write_text(
        "gateway:\n  canary:\n    support-bot: {percent: 12.5}\n    faq: {alias: beta, percent: 1}\n"
    )
    objs = _render(files=(values,))
    env = _gateway_deploy(objs)["spec"]["template"]["spec"]["containers"][0]["env"]
    (canaries,) = [e for e in env if e["name"] == "LORAPLANE_GATEWAY_CANARIES"]
    assert json.loads(canaries["value"]) == {
        "support-bot": {"percent": 12.5},
        "faq": {"alias": "beta", "percent": 1},
    }
    assert _gateway_config(objs, tmp_path).canaries == {
        "support-bot": CanaryRule(alias="canary", percent=12.5),
        "faq": CanaryRule(alias="beta", percent=1),
    }
    profile = _gateway_config(_render(files=(_profile("autoscaling-monitoring"),)), tmp_path)
    assert profile.canaries == {"support-bot": CanaryRule(alias="canary", percent=10)}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            "gateway.canary.support-bot.percent=0",
            "at '/gateway/canary/support-bot/percent': exclusiveMinimum",
        ),
        ("gateway.canary.support-bot.percent=101", "at '/gateway/canary/support-bot/percent': maximum"),
        (
            "gateway.canary.Support.percent=5",
            "at '/gateway/canary': additional properties 'Support' not allowed",
        ),
        ("gateway.canary.faq.weight=5", "at '/gateway/canary/faq': missing property 'percent'"),
        (
            "gateway.podDisruptionBudget.maxUnavailable=half",
            "at '/gateway/podDisruptionBudget/maxUnavailable'",
        ),
        (
            "gateway.autoscaling.minReplicas=0",
            "at '/gateway/autoscaling/minReplicas': minimum: got 0, want 1",
        ),
        ("gateway.ingress.hosts[0]=https://llm.example.com", "at '/gateway/ingress/hosts/0'"),
        ("gateway.ingress.tls[0].secret=x", "additional properties 'secret' not allowed"),
        (
            "gateway.httpRoute.parentRefs[0].namespace=x",
            "at '/gateway/httpRoute/parentRefs/0': missing property 'name'",
        ),
        ("gateway.httpRoute.timeouts.request=10min", "at '/gateway/httpRoute/timeouts/request'"),
    ],
)
def test_the_gateway_tier_schema_rejects_bad_values(bad: str, message: str) -> None:
    stderr = _fails(bad)
    assert "values don't meet the specifications of the schema" in stderr
    assert message in stderr


def test_the_gateway_tier_template_checks_say_what_to_change() -> None:
    hpa = _fails("gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=7")
    assert "gateway.autoscaling.minReplicas (7) is above gateway.autoscaling.maxReplicas (6)" in hpa
    cpu = _fails("gateway.autoscaling.enabled=true", "gateway.resources.requests=null")
    assert "gateway.autoscaling.enabled needs gateway.resources.requests.cpu" in cpu
    budget = _fails("gateway.podDisruptionBudget.minAvailable=2")
    assert "gateway.podDisruptionBudget.minAvailable (2) must be below the gateway's replicas (2)" in budget
    scaled = _fails("gateway.autoscaling.enabled=true", "gateway.podDisruptionBudget.minAvailable=3")
    assert "minAvailable (3) must be below the gateway's autoscaling.minReplicas (2)" in scaled
    route = _fails("gateway.httpRoute.enabled=true")
    assert "gateway.httpRoute.enabled needs gateway.httpRoute.parentRefs" in route
    prod = _fails("gateway.canary.faq.alias=prod", "gateway.canary.faq.percent=5")
    assert "gateway.canary.faq.alias is prod" in prod and "--alias canary" in prod


def _fetch_job(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (job,) = [o for k, o in objs.items() if k.startswith("Job/platform-loraplane-model-fetch-")]
    return job


def test_a_model_on_the_volume_is_never_downloaded() -> None:
    objs = _render()
    _, pod, container = _vllm(objs)
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1", "a model on the volume: nothing is ever downloaded"
    assert env["HF_HOME"]["value"] == "/data/hf-cache"
    assert "HF_TOKEN_PATH" not in env and "HF_TOKEN" not in env
    assert "--model=/data/models/base" in container["args"] and "--wait-for-model=1800" in container["args"]
    assert "initContainers" not in pod, "nothing to wait for but the directory itself"
    assert not any(k.startswith("Job/platform-loraplane-model-fetch-") for k in objs)


def test_a_hub_model_is_fetched_once_by_a_job_with_the_token_and_vllm_waits_for_it() -> None:
    objs = _render(files=(_profile("external-secrets"),))
    assert not any(k.startswith("Secret/") for k in objs)
    _, pod, container = _vllm(objs)
    ref = "hf://meta-llama/Llama-3.1-8B-Instruct@main"
    # vLLM: the reference resolved under the models root; it never downloads and never sees the token
    assert f"--model={ref}" in container["args"] and "--models-root=/data/models" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert "HF_TOKEN_PATH" not in env
    assert not any("hf-token" in v["name"] for v in pod["volumes"])
    assert {"name": "hf-cache", "emptyDir": {"sizeLimit": "40Gi"}} in pod["volumes"]
    # the startup probe's clock starts once the model is whole: an init container waits for it
    (wait,) = pod["initContainers"]
    assert wait["command"][:4] == ["python", "-m", "loraplane.common.model_fetch", ref]
    assert "--wait=0" in wait["command"] and "--models-root=/data/models" in wait["command"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in wait["volumeMounts"]

    job = _fetch_job(objs)
    assert job["metadata"]["annotations"]["loraplane.dev/model"] == ref
    fail_fast, ignore = job["spec"]["podFailurePolicy"]["rules"]
    assert fail_fast == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "fetch", "operator": "In", "values": [2]},
    }
    assert ignore["action"] == "Ignore"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    (fetch,) = spec["containers"]
    module = ["python", "-m", "loraplane.common.model_fetch"]
    assert fetch["command"] == [*module, ref, "--models-root=/data/models", "--field=serving.model"]
    assert fetch["terminationMessagePolicy"] == "FallbackToLogsOnError"
    fenv = {e["name"]: e for e in fetch["env"]}
    assert fenv["HF_HUB_OFFLINE"]["value"] == "0", "the image is offline by default; this pod downloads"
    # The token is a mounted file, never an env value or a chart value.
    assert fenv["HF_TOKEN_PATH"]["value"] == "/etc/loraplane/hf-token/token"
    assert {"name": "hf-token", "secret": {"secretName": "hf-token"}} in spec["volumes"]
    assert not any(
        "value" in e and "token" in str(e["value"]).lower() and e["name"] != "HF_TOKEN_PATH"
        for e in fetch["env"]
    )
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["global"]["models"]["hfToken"]) == {"secretName", "key"}, (
        "no field for the token itself"
    )


def test_the_fetch_jobs_name_follows_its_pod_template_so_upgrades_never_patch_it() -> None:
    model = "serving.model=hf://Qwen/Qwen2.5-0.5B@main"
    first = _fetch_job(_render(model))["metadata"]["name"]
    assert first == _fetch_job(_render(model, "serving.replicas=3"))["metadata"]["name"], (
        "nothing in it changed"
    )
    for change in (
        "serving.image.tag=0.2.0",
        "serving.model=hf://Qwen/Qwen2.5-0.5B@v2",
        "global.models.hfToken.secretName=t",
    ):
        sets = (model, change) if "image" in change or "hfToken" in change else (change,)
        assert _fetch_job(_render(*sets))["metadata"]["name"] != first, change
    assert len(first) <= 63


def test_an_s3_model_takes_its_credentials_and_endpoint_from_values_and_a_secret() -> None:
    sets = (
        "serving.model=s3://models/llama/8b",
        "global.models.s3.credentialsSecret=s3-creds",
        "global.models.s3.endpointUrl=http://minio.storage:9000",
        "global.models.s3.region=eu-west-1",
    )
    objs = _render(*sets)
    (fetch,) = _fetch_job(objs)["spec"]["template"]["spec"]["containers"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and env["AWS_REGION"] == "eu-west-1"
    # training runs read s3:// (and hf://) base models with the same settings, into the same root
    trainer = _template_job(objs)["spec"]["template"]["spec"]["containers"][0]
    tenv = {e["name"]: e.get("value") for e in trainer["env"]}
    assert (
        tenv["LORAPLANE_MODELS_ROOT"] == "/data/models"
        and tenv["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
    )
    assert trainer["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    # a bare hub id is read as hf:// only with modelSource hub
    legacy = _render("serving.model=org/model", "serving.modelSource=hub")
    assert "--model=hf://org/model" in _vllm(legacy)[2]["args"]
    assert _fetch_job(legacy)["metadata"]["annotations"]["loraplane.dev/model"] == "hf://org/model"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("hf://just-a-name", "is not a model reference loraplane can fetch"),
        ("s3://Upper/x", "is not a model reference loraplane can fetch"),
        ("ftp://host/model", "is neither a directory on the shared volume"),
        ("models/base", "is neither a directory on the shared volume"),
    ],
)
def test_a_model_value_that_names_nothing_fetchable_is_refused_at_render(model: str, message: str) -> None:
    err = _fails(f"serving.model={model}")
    assert f'serving.model "{model}" {message}' in err, err


# --- trainer ---------------------------------------------------------------------------------------


def test_the_training_job_template_fails_fast_on_the_trainers_do_not_retry_code() -> None:
    from loraplane.trainer.exit_codes import DO_NOT_RETRY

    objs = _render("trainer.activeDeadlineSeconds=86400", "trainer.priorityClassName=training")
    template = objs["ConfigMap/platform-loraplane-trainer-template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer-template"
    job = _template_job(objs)
    assert job["metadata"]["name"] == "TO-BE-NAMED-BY-SUBMIT"
    fail_fast, ignore = job["spec"]["podFailurePolicy"]["rules"]
    assert fail_fast["action"] == "FailJob" and fail_fast["onExitCodes"]["values"] == [DO_NOT_RETRY]
    assert fail_fast["onExitCodes"]["containerName"] == "trainer"
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    assert job["spec"]["ttlSecondsAfterFinished"] == 604800 and job["spec"]["backoffLimit"] == 4
    assert "completionMode" not in job["spec"], "one node: a plain Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training" and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "platform-loraplane-trainer"
    assert pod["terminationGracePeriodSeconds"] == 600, "one step plus one checkpoint"
    container = pod["containers"][0]
    assert container["command"] == [
        "python",
        "-m",
        "loraplane.trainer",
        "--config",
        "/etc/loraplane/run/train.yaml",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "run-config", "configMap": {"name": "TO-BE-NAMED-BY-SUBMIT"}} in pod["volumes"]
    sa = objs["ServiceAccount/platform-loraplane-trainer"]
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    assert not any(k.startswith(("Role", "ClusterRoleBinding")) and "trainer" in k for k in objs), (
        "no API access"
    )
    assert not objs["NetworkPolicy/platform-loraplane-trainer"]["spec"].get("ingress"), (
        "one node takes no connections"
    )
    assert "Service/platform-loraplane-trainer" not in objs
    assert not [k for k in objs if k.startswith("Job/platform-loraplane-run-")], "no initial run by default"


def test_multi_node_training_is_an_indexed_job_with_torchrun_rendezvous_on_pod_0() -> None:
    objs = _render(files=(_profile("multi-node-training"),))
    for job in (
        _template_job(objs),
        next(v for k, v in objs.items() if k.startswith("Job/platform-loraplane-run-")),
    ):
        spec = job["spec"]
        assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
        pod = spec["template"]["spec"]
        assert pod["subdomain"] == "platform-loraplane-trainer"
        container = pod["containers"][0]
        # torchrun's elastic agent, c10d rendezvous on pod 0: tests/test_chart_multinode.py
        assert container["command"][:3] == ["python", "-m", "loraplane.trainer.elastic"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MASTER_ADDR"]["value"] == "$(RUN_NAME)-0.platform-loraplane-trainer.ml.svc"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert (
            pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
                "topologyKey"
            ]
            == "kubernetes.io/hostname"
        )
        assert pod["priorityClassName"] == "training"
        assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
        assert spec["podReplacementPolicy"] == "Failed"
    headless = objs["Service/platform-loraplane-trainer"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert headless["selector"] == {
        "app.kubernetes.io/instance": "platform",
        "app.kubernetes.io/component": "trainer",
    }
    assert headless["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": "rendezvous"}]
    peers = objs["NetworkPolicy/platform-loraplane-trainer"]["spec"]["ingress"]
    assert peers == [{"from": [{"podSelector": {"matchLabels": headless["selector"]}}]}], (
        "only the run's own pods"
    )
    multi_gpu = _template_job(_render("trainer.gpusPerNode=4", "trainer.resources.limits.nvidia\\.com/gpu=4"))
    assert multi_gpu["spec"]["template"]["spec"]["containers"][0]["command"][:3] == [
        "torchrun",
        "--standalone",
        "--nproc-per-node=4",
    ]


def test_the_initial_run_is_a_job_with_its_config_that_an_upgrade_does_not_retrain() -> None:
    objs = _render(files=(_profile("multi-node-training"),))
    (run_key,) = [k for k in objs if k.startswith("Job/platform-loraplane-run-")]
    run = objs[run_key]
    name = run["metadata"]["name"]
    config_map = objs[f"ConfigMap/{name}"]
    config = yaml.safe_load(config_map["data"]["train.yaml"])
    assert config["output"] == {"adapters_root": "/data/adapters", "name": "support-bot"}
    assert run["metadata"]["labels"]["loraplane.dev/adapter"] == "support-bot"
    assert run["spec"]["template"]["metadata"]["labels"]["loraplane.dev/adapter"] == "support-bot"
    pod = run["spec"]["template"]["spec"]
    assert {"name": "run-config", "configMap": {"name": name}} in pod["volumes"]
    assert "ttlSecondsAfterFinished" not in run["spec"], "a deleted finished Job would train again on upgrade"
    assert run["spec"]["podFailurePolicy"] == _template_job(objs)["spec"]["podFailurePolicy"]
    # The same config keeps the name (an upgrade leaves the Job alone); a new config is a new run.
    again = _render(files=(_profile("multi-node-training"),))
    assert run_key in again
    changed = _render("trainer.initialRun.config.training.epochs=3", files=(_profile("multi-node-training"),))
    assert run_key not in changed and any(k.startswith("Job/platform-loraplane-run-") for k in changed)
    long = _render("global.fullnameOverride=" + "a" * 63, files=(_profile("multi-node-training"),))
    (long_run,) = [k for k in long if k.startswith("Job/") and "-run-" in k]
    assert len(long_run.split("/")[1]) + len("-99") <= 63, "pod hostnames NAME-INDEX stay DNS labels"
    assert "at '/initialRun/config': missing properties 'base_model', 'dataset', 'output'" in _fails(
        "trainer.initialRun.enabled=true"
    )


def test_the_initial_run_prints_the_result_line_train_register_reads() -> None:
    """Like `train submit`, the chart's initial run goes through run_report (else its adapter could not
    be registered: "has no 'loraplane-result:' line"); the template `train submit` copies keeps the
    trainer itself, which the CLI wraps the same way."""
    from loraplane.platform.training_k8s import REPORT_MODULE, TRAINER_MODULE

    one_gpu = ("trainer.nodes=1", "trainer.gpusPerNode=1", "trainer.resources.limits.nvidia\\.com/gpu=1")
    objs = _render(*one_gpu, files=(_profile("multi-node-training"),))
    (run_key,) = [k for k in objs if k.startswith("Job/platform-loraplane-run-")]
    (container,) = objs[run_key]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == [
        "python",
        "-m",
        REPORT_MODULE,
        "--config",
        "/etc/loraplane/run/train.yaml",
    ]
    assert _template_job(objs)["spec"]["template"]["spec"]["containers"][0]["command"][1:3] == [
        "-m",
        TRAINER_MODULE,
    ]
    # multi-node: the launcher keeps its arguments, the module it runs becomes run_report
    multi = _render(files=(_profile("multi-node-training"),))
    (run_key,) = [k for k in multi if k.startswith("Job/platform-loraplane-run-")]
    (container,) = multi[run_key]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "loraplane.trainer.elastic"]
    assert container["command"][-4:] == ["-m", REPORT_MODULE, "--config", "/etc/loraplane/run/train.yaml"]


# --- gpu -------------------------------------------------------------------------------------------


# The gpu modes, the preflight and the operator dependency: tests/test_chart_gpu.py.


# --- documentation ---------------------------------------------------------------------------------


def test_the_chart_readmes_are_generated_from_the_current_values() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chart-readme.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for chart in (CHART, *(CHART / "charts" / n for n in SUBCHARTS)):
        readme = (chart / "README.md").read_text()
        assert "| Key | Type | Default | Description |" in readme
    parent = (CHART / "README.md").read_text()
    assert '| global.storage.existingClaim | string | `""` |' in parent
    assert "charts/serving/README.md" in parent
    serving = (CHART / "charts" / "serving" / "README.md").read_text()
    assert "| serving.drain.shutdownTimeoutSeconds | int | `45` |" in serving


def test_every_value_is_documented(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_readme", ROOT / "scripts" / "chart-readme.py")
    assert spec is not None and spec.loader is not None
    readme = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = readme
    spec.loader.exec_module(readme)
    control = tmp_path / "values.yaml"
    control.write_text(
        "# -- documented\na: 1\nb:\n  # -- documented\n  c: 2\n  d: 3\nres:\n  # -- a map\n  e: {f: 1}\n"
    )
    assert readme.undocumented(control) == ["b.d"], "the check finds an undocumented value"
    for chart in (CHART, *(CHART / "charts" / n for n in SUBCHARTS)):
        undocumented = readme.undocumented(chart / "values.yaml")
        assert not undocumented, f"{chart.name}: values without a '# --' comment: {undocumented}"


# --- vLLM's engine values --------------------------------------------------------------------------


def test_every_engine_value_reaches_vllms_command_line(tmp_path: Path) -> None:
    """Each serving value is one flag of the container's command, and the entry point parses them all."""
    from loraplane.serving.__main__ import _parse

    _, _, default = _vllm(_render())
    args = default["args"]
    gpu_share = tmp_path / "gpu-share.yaml"  # --set would pass 0.85 as a string
    gpu_share.write_text("serving: {gpuMemoryUtilization: 0.85}\n")
    assert _arg(args, "--max-num-seqs") == "256" and _arg(args, "--tensor-parallel-size") == "1"
    assert _arg(args, "--gpu-memory-utilization") == "0.9" and "--enable-prefix-caching" in args
    assert not any(a.startswith(("--kv-cache-gib", "--max-cpu-loras")) for a in args), "unset: ours"
    assert "--" not in args, "no extraArgs, no separator"
    _, _, tuned = _vllm(
        _render(
            "serving.maxNumSeqs=8", "serving.maxCpuLoras=12", "serving.tensorParallelSize=4",
            "serving.enablePrefixCaching=false", "serving.kvCacheGiB=2",
            "serving.maxModelLen=512", "serving.dtype=bfloat16",
            "serving.extraArgs={--enable-chunked-prefill,--max-num-batched-tokens=8192}",
            "serving.env[0].name=VLLM_CPU_OMP_THREADS_BIND", "serving.env[0].value=nobind",
            files=(gpu_share,),
        )
    )  # fmt: skip
    args = tuned["args"]
    expected = {
        "--max-num-seqs": "8", "--max-cpu-loras": "12", "--tensor-parallel-size": "4",
        "--gpu-memory-utilization": "0.85", "--kv-cache-gib": "2", "--max-model-len": "512",
        "--dtype": "bfloat16",
    }  # fmt: skip
    assert {flag: _arg(args, flag) for flag in expected} == expected
    assert "--no-enable-prefix-caching" in args and "--enable-prefix-caching" not in args
    assert args[args.index("--") + 1 :] == ["--enable-chunked-prefill", "--max-num-batched-tokens=8192"]
    assert {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "nobind"} in tuned["env"]
    parsed = _parse(args)  # the container's entry point accepts exactly what the chart renders
    assert (parsed.max_num_seqs, parsed.max_cpu_loras, parsed.tensor_parallel_size) == (8, 12, 4)
    assert parsed.gpu_memory_utilization == 0.85 and parsed.enable_prefix_caching is False
    assert parsed.kv_cache_gib == 2
    assert parsed.vllm_args == ["--enable-chunked-prefill", "--max-num-batched-tokens=8192"]


@pytest.mark.parametrize(
    "arg",
    ["--api-key=x", "--host=0.0.0.0", "--port=9000", "--enable-lora", "--max_loras=9", "--max-lora-rank=64",
     "--lora-modules=a=/x", "-tp=2", "--model=/other"],
)  # fmt: skip
def test_extra_args_cannot_override_a_flag_the_chart_owns(arg: str) -> None:
    from loraplane.serving.launcher import OPTIONAL_FLAGS, OWNED_FLAGS

    stderr = _fails(f"serving.extraArgs[0]={arg}")
    assert "serving.extraArgs" in stderr and "which the chart sets from its own values" in stderr
    # the chart's list and the entry point's are the same list
    owned = {*OWNED_FLAGS, *(f for flags in OPTIONAL_FLAGS.values() for f in flags)}
    flag = arg.split("=", 1)[0].replace("_", "-")
    assert flag in owned


def test_the_entry_point_refuses_the_same_flags_the_chart_does() -> None:
    from loraplane.serving.__main__ import main
    from loraplane.serving.launcher import OPTIONAL_FLAGS, OWNED_FLAGS

    for flag in [*OWNED_FLAGS, *(f for flags in OPTIONAL_FLAGS.values() for f in flags)]:
        stderr = _fails(f"serving.extraArgs[0]={flag}=1")
        assert f"sets {flag}," in stderr, (flag, stderr)
    # OPTIONAL flags are owned by the entry point only when their value is set (the chart always sets them)
    assert main(["--model", "/m", "--served-model-name", "b", "--print-argv", "--", "--max-loras=3"]) == 2
    assert main(["--model", "/m", "--served-model-name", "b", "--print-argv", "--", "-tp=2"]) == 0
    assert main(["--model", "/m", "--served-model-name", "b", "--tensor-parallel-size", "2", "--print-argv",
                 "--", "-tp=2"]) == 2  # fmt: skip


def test_the_registry_crd_keeps_reports_in_its_status_subresource() -> None:
    """A spec write (the CLI) never touches the pods' reports, and a pod's report never the spec."""
    crd = yaml.safe_load(
        (ROOT / "charts" / "loraplane" / "crds" / "loraadapters.loraplane.dev.yaml").read_text()
    )
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    report = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["servers"]
    fields = report["additionalProperties"]["properties"]
    assert set(fields) == {"loaded", "failed", "observedGeneration", "at"}
    edit = _render()["ClusterRole/platform-loraplane-ml-registry-edit"]
    assert {
        "apiGroups": ["loraplane.dev"],
        "resources": ["loraadapters/status"],
        "verbs": ["get", "patch"],
    } in edit["rules"]


EVAL_TEMPLATE = "ConfigMap/platform-loraplane-eval-template"


def test_the_eval_job_template_is_a_hardened_vllm_client_that_reads_the_volume_and_records_verdicts() -> None:
    """`loraplane evals submit` instantiates it (platform/eval_jobs.py): `adapters eval` in a pod that
    vLLM's NetworkPolicy admits, through vLLM's Service, with vLLM's key as a file, the volume read-only,
    and a token that may only update LoraAdapter objects and list pods."""
    objs = _render()
    job = yaml.safe_load(objs[EVAL_TEMPLATE]["data"]["job.yaml"])
    assert objs[EVAL_TEMPLATE]["metadata"]["labels"]["app.kubernetes.io/component"] == "eval-template"
    assert job["kind"] == "Job" and job["metadata"]["labels"]["app.kubernetes.io/component"] == "eval"
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (1, 3600)
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "eval", "operator": "In", "values": [2, 3]},
    }
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    pod = job["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    # vLLM's NetworkPolicy admits it (the policy's second peer), and only that label is needed
    peers = [p["podSelector"]["matchLabels"] for p in objs["NetworkPolicy/platform-loraplane-vllm"]["spec"]
             ["ingress"][0]["from"]]  # fmt: skip
    assert any(peer.items() <= pod["metadata"]["labels"].items() for peer in peers)
    assert pod["metadata"]["labels"]["loraplane.dev/vllm-client"] == "true"
    assert not objs["NetworkPolicy/platform-loraplane-eval"]["spec"].get("ingress"), "it serves nothing"
    assert container["image"] == _vllm(objs)[2]["image"], "vLLM's image: already on its nodes"
    assert container["command"] == [
        "python", "-m", "loraplane.platform.cli", "adapters", "eval", "TO-BE-SET-BY-SUBMIT",
        "--suite", "/etc/loraplane/eval/suite.yaml",
    ]  # fmt: skip
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["LORAPLANE_SERVER_URL"] == "http://platform-loraplane-vllm.ml.svc:8000", "the Service"
    assert env["LORAPLANE_REGISTRY"] == "kubernetes"
    assert env["LORAPLANE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert (env["LORAPLANE_HOME"], env["LORAPLANE_ADAPTERS_ROOT"]) == ("/tmp/loraplane", "/data/adapters")
    assert "LORAPLANE_API_KEY" not in env, "the key is a file: $LORAPLANE_HOME/serving/vllm-api-key"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["api-key"]["mountPath"] == "/tmp/loraplane/serving"
    assert volumes["api-key"]["secret"] == {
        "secretName": "platform-loraplane-vllm-key",
        "items": [{"key": "api-key", "path": "vllm-api-key"}],
    }
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "platform-loraplane-data",
        "readOnly": True,
    }
    assert volumes["suite"] == {"name": "suite", "configMap": {"name": "TO-BE-NAMED-BY-SUBMIT"}}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert spec["securityContext"]["runAsUser"] == 10001 and spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == "platform-loraplane-eval" and spec["automountServiceAccountToken"]
    assert objs["ServiceAccount/platform-loraplane-eval"]["automountServiceAccountToken"] is False
    assert objs["Role/platform-loraplane-eval"]["rules"] == [
        {
            "apiGroups": ["loraplane.dev"],
            "resources": ["loraadapters"],
            "verbs": ["get", "list", "watch", "update"],
        },
        {"apiGroups": ["loraplane.dev"], "resources": ["loraadapters/status"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    ]
    binding = objs["RoleBinding/platform-loraplane-eval"]
    assert binding["roleRef"]["name"] == "platform-loraplane-eval"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "platform-loraplane-eval", "namespace": "ml"}
    ]

    # values reach it; the user's Secret and port too
    own = _render(
        "evals.image.repository=r/eval", "evals.image.tag=t1", "evals.image.pullPolicy=Always",
        "serving.port=8123", "serving.apiKeySecret.name=mine", "serving.apiKeySecret.key=k",
        "evals.podAnnotations.team=ml", "evals.activeDeadlineSeconds=0",
    )  # fmt: skip
    job = yaml.safe_load(own[EVAL_TEMPLATE]["data"]["job.yaml"])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("r/eval:t1", "Always")
    assert {
        "name": "LORAPLANE_SERVER_URL",
        "value": "http://platform-loraplane-vllm.ml.svc:8123",
    } in container["env"]
    secret = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["api-key"]["secret"]
    assert secret == {"secretName": "mine", "items": [{"key": "k", "path": "vllm-api-key"}]}
    assert job["spec"]["template"]["metadata"]["annotations"] == {"team": "ml"}
    assert "activeDeadlineSeconds" not in job["spec"]

    for switch in ("evals.enabled=false", "serving.enabled=false"):
        off = _render(switch)
        assert not [k for k in off if k.endswith(("-eval", "-eval-template"))], switch

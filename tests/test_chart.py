"""The Helm chart, rendered by the real helm binary that `make setup` builds.

The umbrella chart (charts/loraplane) vendors three subcharts, each behind a condition: gpu (GPU
prerequisites), trainer (the training Job template and an initial run), serving (vLLM). The tests
read the rendered objects and assert the fields that matter; profiles live in charts/loraplane/ci/.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraplane"
SUBCHARTS = ("gpu", "trainer", "serving")
PROFILES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True)


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
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert set(deps) == set(SUBCHARTS)
    for name, dep in deps.items():
        assert dep["condition"] == f"{name}.enabled"
        assert "repository" not in dep, "nothing to download: the subchart is a directory under charts/"
        sub = yaml.safe_load((CHART / "charts" / name / "Chart.yaml").read_text())
        assert sub["version"] == dep["version"]
    # Helm sees them as present (unpacked), so `helm dependency build` is never needed.
    listed = _helm("dependency", "list", str(CHART))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:] if line.strip()]
    assert {r[0]: r[-1] for r in rows} == {name: "unpacked" for name in SUBCHARTS}


VLLM = "Deployment/platform-loraplane-vllm"
TEMPLATE = "ConfigMap/platform-loraplane-trainer-template"


@pytest.mark.parametrize(
    ("switch", "gone", "kept"),
    [
        ("gpu.enabled=false", [], VLLM),
        ("trainer.enabled=false", [TEMPLATE], VLLM),
        (
            "serving.enabled=false",
            [VLLM, "Deployment/platform-loraplane-gateway", "Secret/platform-loraplane-vllm-key"],
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
    assert 'serving.model "org/model" is not a path' in model and "serving.modelSource=hub" in model
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
    _, pod, container = _vllm(objs)
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
        {"apiGroups": ["loraplane.dev"], "resources": ["loraadapters"], "verbs": ["get", "list"]}
    ]
    readers = objs["RoleBinding/platform-loraplane-registry-reader"]["subjects"]
    assert [s["name"] for s in readers] == ["platform-loraplane-vllm", "platform-loraplane-gateway"]
    static = _render("serving.rehydrate=false", "gateway.enabled=false")
    _, static_pod, static_container = _vllm(static)
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


def test_users_reach_vllm_only_through_the_gateway_with_generated_keys() -> None:
    objs = _render()
    _, vllm, _ = _vllm(objs)
    assert "--api-key-file=/etc/loraplane/api-key/api-key" in vllm["containers"][0]["args"]
    assert {"name": "api-key", "secret": {"secretName": "platform-loraplane-vllm-key"}} in vllm["volumes"]
    assert set(objs["Secret/platform-loraplane-vllm-key"]["data"]) == {"api-key"}
    assert set(objs["Secret/platform-loraplane-gateway-keys"]["data"]) == {"keys"}

    gateway = objs["Deployment/platform-loraplane-gateway"]["spec"]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    assert (
        gateway["containers"][0]["image"]
        == vllm["containers"][0]["image"]
        == "ghcr.io/loraplane/loraplane:0.1.0"
    )
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

    hook = objs["Job/platform-loraplane-test-models"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = hook["spec"]["template"]["spec"]["containers"][0]["command"][2]
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
    assert container["ports"] == [{"name": "http", "containerPort": 8123}]
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
        assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
        service = scaled[f"Service/platform-loraplane-{part}"]
        assert service["spec"]["ports"][0]["name"] == "http"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    scrape = scaled["NetworkPolicy/platform-loraplane-vllm"]["spec"]["ingress"][1]
    assert scrape["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    assert scrape["ports"] == [{"port": 8000, "protocol": "TCP"}]


def test_model_source_hf_token_and_cache() -> None:
    _, pod, container = _vllm(_render())
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1", "a model on the volume: nothing is ever downloaded"
    assert env["HF_HOME"]["value"] == "/data/hf-cache"
    assert "HF_TOKEN_PATH" not in env and "HF_TOKEN" not in env

    objs = _render(files=(_profile("external-secrets"),))
    assert not any(k.startswith("Secret/") for k in objs)
    _, pod, container = _vllm(objs)
    env = {e["name"]: e for e in container["env"]}
    assert "--model=meta-llama/Llama-3.1-8B-Instruct" in container["args"]
    assert env["HF_HUB_OFFLINE"]["value"] == "0"
    assert env["HF_HOME"]["value"] == "/cache/hf"
    assert {"name": "hf-cache", "emptyDir": {"sizeLimit": "40Gi"}} in pod["volumes"]
    # The token is a mounted file, never an env value or a chart value.
    assert env["HF_TOKEN_PATH"]["value"] == "/etc/loraplane/hf-token/token"
    assert {"name": "hf-token", "secret": {"secretName": "hf-token"}} in pod["volumes"]
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
    values = yaml.safe_load((CHART / "charts" / "serving" / "values.yaml").read_text())
    assert set(values["hfToken"]) == {"secretName", "key"}, "no field for the token itself"


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
        assert container["command"] == [
            "torchrun", "--nnodes=2", "--nproc-per-node=2", "--node-rank=$(JOB_COMPLETION_INDEX)",
            "--master-addr=$(MASTER_ADDR)", "--master-port=29500",
            "-m", "loraplane.trainer", "--config", "/etc/loraplane/run/train.yaml",
        ]  # fmt: skip
        env = {e["name"]: e for e in container["env"]}
        assert (
            env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['batch.kubernetes.io/job-name']"
        )
        names = [e["name"] for e in container["env"]]
        assert names.index("JOB_NAME") < names.index("MASTER_ADDR"), "$(JOB_NAME) is defined before its use"
        assert env["MASTER_ADDR"]["value"] == "$(JOB_NAME)-0.platform-loraplane-trainer.ml.svc"
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


# --- gpu -------------------------------------------------------------------------------------------


def test_gpu_prerequisites_runtime_class_operator_namespace_and_device_plugin() -> None:
    default = _render()
    assert not any(k.startswith(("RuntimeClass/", "Namespace/", "DaemonSet/")) for k in default)

    objs = _render(files=(_profile("gpu-device-plugin"),))
    assert objs["RuntimeClass/nvidia"]["handler"] == "nvidia"
    assert _vllm(objs)[1]["runtimeClassName"] == "nvidia"
    ns = objs["Namespace/gpu-operator"]["metadata"]
    for mode in ("enforce", "audit", "warn"):
        assert ns["labels"][f"pod-security.kubernetes.io/{mode}"] == "privileged"
    assert ns["annotations"]["helm.sh/resource-policy"] == "keep"

    ds = objs["DaemonSet/platform-loraplane-nvidia-device-plugin"]
    assert ds["metadata"]["namespace"] == "kube-system", (
        "a hostPath pod stays out of the restricted namespace"
    )
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    image, _, tag = container["image"].partition(":")
    assert image == "nvcr.io/nvidia/k8s-device-plugin" and tag.startswith("v") and tag[1].isdigit()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in container["securityContext"]
    assert container["volumeMounts"] == [
        {"name": "device-plugin", "mountPath": "/var/lib/kubelet/device-plugins"}
    ]
    assert pod["volumes"] == [
        {
            "name": "device-plugin",
            "hostPath": {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"},
        }
    ], "the kubelet's device-plugin directory, nothing else of the host"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical" and pod["automountServiceAccountToken"] is False


def test_the_gpu_preflight_only_reads_nodes() -> None:
    """It is a render-time `lookup` with the installer's credentials: no Job, no ServiceAccount, no Role."""
    text = (CHART / "charts" / "gpu" / "templates" / "preflight.yaml").read_text()
    lookups = [line.strip() for line in text.splitlines() if "lookup " in line]
    assert lookups == ['{{- $nodes := lookup "v1" "Node" "" "" }}']
    assert "kind:" not in text, "the preflight creates nothing"


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
    assert not any(a.startswith(("--kv-cache-gib", "--max-cpu-loras")) for a in args), "unset: vLLM's own"
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

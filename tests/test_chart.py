"""The Helm chart, rendered by the real helm binary that `make setup` builds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraplane"
HELM = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True)


def _render(*sets: str) -> dict[str, dict[str, Any]]:
    args = ["template", "platform", str(CHART), "--namespace", "ml"]
    for s in sets:
        args += ["--set", s]
    result = _helm(*args)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_helm_lint_is_clean() -> None:
    result = _helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_render_has_kept_pvc_and_hardened_vllm() -> None:
    objs = _render()
    pvc = objs["PersistentVolumeClaim/platform-loraplane-data"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    deploy = objs["Deployment/platform-loraplane-vllm"]
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "loraplane.serving"]
    assert "--no-runtime-lora-updating" in container["args"]  # admin routes stay closed by default
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
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
    static_pod = static["Deployment/platform-loraplane-vllm"]["spec"]["template"]["spec"]
    assert static_pod["automountServiceAccountToken"] is False
    assert not any(a.startswith("--registry") for a in static_pod["containers"][0]["args"])
    assert "Role/platform-loraplane-registry-reader" not in static
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "platform-loraplane-data"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert objs["Service/platform-loraplane-vllm"]["spec"]["type"] == "ClusterIP"


def test_existing_claim_and_api_key_secret() -> None:
    objs = _render("storage.existingClaim=shared", "serving.apiKeySecret.name=vllm-key")
    assert not any(k.startswith("PersistentVolumeClaim/") for k in objs)
    pod = objs["Deployment/platform-loraplane-vllm"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared"
    assert "--api-key-file=/etc/loraplane/api-key/api-key" in pod["containers"][0]["args"]
    assert {"name": "api-key", "secret": {"secretName": "vllm-key"}} in pod["volumes"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("serving.maxLoraRank=12", "maxLoraRank"),
        ("storage.size=lots", "size"),
        ("serving.unknown=1", "unknown"),
        ("serving.replicas=-1", "replicas"),
        ("gpu.resourceName=acme.com/gpu", "/gpu/resourceName': value must be one of 'nvidia.com/gpu'"),
        ("rbac.creat=true", "additional properties 'creat' not allowed"),
    ],
)
def test_schema_rejects_bad_values(bad: str, message: str) -> None:
    result = _helm("template", "platform", str(CHART), "--set", bad)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_training_job_template_fails_fast_on_the_trainers_do_not_retry_code() -> None:
    from loraplane.trainer.exit_codes import DO_NOT_RETRY

    objs = _render("trainer.activeDeadlineSeconds=86400", "trainer.priorityClassName=training")
    template = objs["ConfigMap/platform-loraplane-trainer-template"]
    job = yaml.safe_load(template["data"]["job.yaml"])
    fail_fast, ignore = job["spec"]["podFailurePolicy"]["rules"]
    assert fail_fast["action"] == "FailJob" and fail_fast["onExitCodes"]["values"] == [DO_NOT_RETRY]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training" and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "platform-loraplane-trainer"
    assert pod["terminationGracePeriodSeconds"] == 600, "one step plus one checkpoint"
    sa = objs["ServiceAccount/platform-loraplane-trainer"]
    assert sa["automountServiceAccountToken"] is False
    assert "ConfigMap/platform-loraplane-trainer-template" not in _render("trainer.enabled=false")


def test_users_reach_vllm_only_through_the_gateway_with_generated_keys() -> None:
    objs = _render()
    vllm = objs["Deployment/platform-loraplane-vllm"]["spec"]["template"]["spec"]
    assert "--api-key-file=/etc/loraplane/api-key/api-key" in vllm["containers"][0]["args"]
    assert {"name": "api-key", "secret": {"secretName": "platform-loraplane-vllm-key"}} in vllm["volumes"]
    assert set(objs["Secret/platform-loraplane-vllm-key"]["data"]) == {"api-key"}
    assert set(objs["Secret/platform-loraplane-gateway-keys"]["data"]) == {"keys"}

    gateway = objs["Deployment/platform-loraplane-gateway"]["spec"]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    assert "--upstream=http://platform-loraplane-vllm:8000" in args
    assert {"--registry=kubernetes", "--namespace=ml", "--host=0.0.0.0"} <= set(args)
    assert "--upstream-api-key-file=/etc/loraplane/api-key/api-key" in args
    assert "--api-keys-file=/etc/loraplane/gateway-keys/keys" in args
    assert gateway["containers"][0]["livenessProbe"] == {"tcpSocket": {"port": "http"}, "periodSeconds": 10}
    assert gateway["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

    policy = objs["NetworkPolicy/platform-loraplane-vllm"]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "vllm"
    sources = [p["podSelector"]["matchLabels"] for p in policy["ingress"][0]["from"]]
    assert sources == [
        {"app.kubernetes.io/instance": "platform", "app.kubernetes.io/component": "gateway"},
        {"loraplane.dev/vllm-client": "true"},
    ]
    assert policy["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]

    hook = objs["Job/platform-loraplane-test-models"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/v1/models" in hook["spec"]["template"]["spec"]["containers"][0]["command"][2]

    own = _render(
        "serving.apiKeySecret.name=mine", "serving.apiKeySecret.key=token", "gateway.apiKeysSecret.name=users"
    )
    assert not any(k.startswith("Secret/") for k in own), "the user's Secrets are used, none generated"
    own_gw = own["Deployment/platform-loraplane-gateway"]["spec"]["template"]["spec"]
    assert "--upstream-api-key-file=/etc/loraplane/api-key/token" in own_gw["containers"][0]["args"]
    assert {"name": "gateway-keys", "secret": {"secretName": "users"}} in own_gw["volumes"]

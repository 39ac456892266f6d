"""A third-party Kubernetes linter (checkov, installed by `make setup` in an environment of its own)
on the chart's rendered manifests, the training Job template inside its ConfigMap included: zero
findings, and every exemption is written on its object with its reason."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_client import helm_args

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraplane"
HELM = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")
CHECKOV = shutil.which("checkov") or str(ROOT / ".venv" / "bin" / "checkov")

# Every values profile in the chart's ci/ folder, plus a few switch combinations.
CI_PROFILES = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
SETS = {
    "own-secrets": [
        "serving.apiKeySecret.name=vllm",
        "gateway.apiKeysSecret.name=users",
        "global.storage.existingClaim=m",
    ],
    "no-gateway": ["gateway.enabled=false"],
    "training-only": ["serving.enabled=false", "gpu.enabled=false"],
    "replicas": ["serving.replicas=2", "gateway.replicas=3", "serving.rehydrate=false"],
    "monitoring": ["monitoring.dashboards.enabled=true", "monitoring.rules.enabled=true"],
}
PROFILES: dict[str, list[str]] = {
    **{name: ["-f", str(path)] for name, path in CI_PROFILES.items()},
    **{name: [a for s in sets for a in ("--set", s)] for name, sets in SETS.items()},
}


def _manifests(path: Path, extra: list[str]) -> Path:
    args = [HELM, *helm_args(("template", "platform", str(CHART), "-n", "ml", *extra))]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    templates = [
        yaml.safe_load(d["data"]["job.yaml"])
        for d in docs
        if d["kind"] == "ConfigMap" and "job.yaml" in d.get("data", {})
    ]
    path.write_text(yaml.safe_dump_all(docs + templates))
    return path


@pytest.fixture(scope="module")
def checkov_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[Any]]]:
    """One checkov run over every profile (a file each): checkov's start-up is most of its time."""
    folder = tmp_path_factory.mktemp("checkov")
    for name, extra in PROFILES.items():
        _manifests(folder / f"{name}.yaml", extra)
    result = subprocess.run(
        [CHECKOV, "-d", str(folder), "--framework", "kubernetes", "-o", "json", "--compact"],
        capture_output=True,
        text=True,
    )
    report: Any = json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else None
    assert report is not None, result.stdout[-2000:] + result.stderr[-2000:]
    reports = report if isinstance(report, list) else [report]
    by_profile: dict[str, dict[str, list[Any]]] = {
        name: {"passed": [], "failed": [], "skipped": []} for name in PROFILES
    }
    for r in reports:
        for kind in ("passed", "failed", "skipped"):
            for check in r["results"].get(f"{kind}_checks", []):
                by_profile[Path(check["file_path"]).stem][kind].append(check)
    return by_profile


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_checkov_finds_nothing_and_every_exemption_has_a_reason(
    checkov_results: dict[str, dict[str, list[Any]]], profile: str
) -> None:
    found = checkov_results[profile]
    assert len(found["passed"]) > 50, "checkov checked next to nothing"
    failed = found["failed"]
    assert not failed, "\n".join(f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in failed)
    for check in found["skipped"]:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"

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

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraplane"
HELM = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")
CHECKOV = shutil.which("checkov") or str(ROOT / ".venv" / "bin" / "checkov")

PROFILES = {
    "default": [],
    "own-secrets": [
        "serving.apiKeySecret.name=vllm",
        "gateway.apiKeysSecret.name=users",
        "storage.existingClaim=m",
    ],
    "no-gateway": ["gateway.enabled=false"],
    "training-only": ["serving.enabled=false", "gateway.enabled=false", "gpu.preflight.enabled=false"],
    "replicas": ["serving.replicas=2", "gateway.replicas=3", "serving.rehydrate=false"],
}


def _manifests(tmp_path: Path, sets: list[str]) -> Path:
    args = [HELM, "template", "platform", str(CHART), "-n", "ml"]
    for s in sets:
        args += ["--set", s]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    templates = [
        yaml.safe_load(d["data"]["job.yaml"])
        for d in docs
        if d["kind"] == "ConfigMap" and "job.yaml" in d.get("data", {})
    ]
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs + templates))
    return path


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_checkov_finds_nothing_and_every_exemption_has_a_reason(tmp_path: Path, profile: str) -> None:
    manifests = _manifests(tmp_path, PROFILES[profile])
    result = subprocess.run(
        [CHECKOV, "-f", str(manifests), "--framework", "kubernetes", "-o", "json", "--quiet", "--compact"],
        capture_output=True,
        text=True,
    )
    report: Any = json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else None
    assert report is not None, result.stdout[-2000:] + result.stderr[-2000:]
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r["results"].get("failed_checks", [])]
    skipped = [c for r in reports for c in r["results"].get("skipped_checks", [])]
    assert sum(r["summary"]["passed"] for r in reports) > 50, "checkov checked next to nothing"
    assert not failed, "\n".join(f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in failed)
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"

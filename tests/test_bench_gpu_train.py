"""bench/gpu_train.py --dry-run: every arm of the GPU training benchmark runs (or says why not) on the CPU.

The dry run goes through the same code as the GPU run (arms, checks, JSON and Markdown reports) with
the tiny demo model, so the script works the first time it meets a GPU. Nothing here asserts a speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_train.py"
ARMS = ["A", "A2", "B0", "B", "B-packed", "B-fa2", "B-packed-flex", "B-qlora", "B-liger"]
ALWAYS_MEASURED = ["A", "A2", "B0", "B", "B-packed"]  # the arms that need no GPU and no extra library


@dataclass
class DryRun:
    returncode: int
    output: str
    report: dict[str, Any]
    markdown: str
    json_path: Path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> DryRun:
    tmp = tmp_path_factory.mktemp("gpu-train")
    out = tmp / "results"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--workdir", str(tmp / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = proc.stdout + proc.stderr
    reports = sorted(out.glob("*.json"))
    assert len(reports) == 1, f"expected one JSON report in {out}, found {reports}\n{output}"
    markdowns = sorted(out.glob("*.md"))
    assert [p.stem for p in markdowns] == [reports[0].stem], output
    return DryRun(
        proc.returncode, output, json.loads(reports[0].read_text()), markdowns[0].read_text(), reports[0]
    )


def test_dry_run_exits_zero_and_names_its_files_by_date_and_device(dry_run: DryRun) -> None:
    assert dry_run.returncode == 0, dry_run.output
    assert re.fullmatch(r"gpu-train-\d{8}-\d{6}-cpu\.json", dry_run.json_path.name)
    report = dry_run.report
    assert report["schema"] == "loraplane.bench.gpu_train/1"
    assert report["dry_run"] is True
    assert report["device"]["kind"] == "cpu"
    assert report["device"]["name"] == "cpu"
    assert report["device"]["peak_bf16_tflops"] is None
    assert report["model"]["preset"] == "tiny"
    assert report["model"]["params"] > 0


def test_every_arm_is_measured_or_skipped_with_a_reason(dry_run: DryRun) -> None:
    arms = {a["name"]: a for a in dry_run.report["arms"]}
    assert list(arms) == ARMS
    for name, arm in arms.items():
        assert arm["status"] in ("measured", "skipped"), f"{name}: {arm['status']} {arm['reason']}"
        if arm["status"] == "skipped":
            assert arm["reason"], f"{name} skipped without a reason"
    for name in ALWAYS_MEASURED:
        assert arms[name]["status"] == "measured", f"{name}: {arms[name]['reason']}"


def test_measured_arms_have_throughput_a_finite_loss_and_a_memory_field(dry_run: DryRun) -> None:
    measured = [a for a in dry_run.report["arms"] if a["status"] == "measured"]
    assert measured
    for arm in measured:
        name = arm["name"]
        assert arm["tokens_per_s"] > 0, name
        assert arm["loss_tokens_per_s"] > 0, name
        for key in ("loss_first", "loss_last", "train_loss"):
            assert arm[key] is not None and math.isfinite(arm[key]), (name, key, arm[key])
        assert "peak_gpu_mem_gib" in arm, name
        assert arm["peak_gpu_mem_gib"] is None or arm["peak_gpu_mem_gib"] > 0, name
        assert arm["min_grad_norm"] > 0, name
        assert arm["lora_b_abs_sum"] > 0, name
        assert arm["problems"] == [], (name, arm["problems"])
        assert arm["steps"] >= 1 and arm["measured_steps"] >= 1, name
        assert arm["mfu_4n"] is None, name  # no bf16 peak is known for the CPU


def test_plain_and_loraplane_arms_see_the_same_tokens(dry_run: DryRun) -> None:
    arms = {a["name"]: a for a in dry_run.report["arms"]}
    # One epoch over the same examples: every arm trains the same label tokens (equal work).
    assert len({arms[name]["loss_tokens"] for name in ALWAYS_MEASURED}) == 1
    assert arms["A"]["padding_fraction"] > arms["B"]["padding_fraction"]  # grouping removes padding
    assert arms["B-packed"]["padding_fraction"] == 0  # padding-free


def test_qlora_arm_is_measured_or_says_why_not(dry_run: DryRun) -> None:
    qlora = next(a for a in dry_run.report["arms"] if a["name"] == "B-qlora")
    assert qlora["status"] == "measured" or (qlora["status"] == "skipped" and qlora["reason"].strip())
    if qlora["status"] == "skipped" and importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes not installed on the device" in qlora["reason"]


def test_ratio_and_goals_are_reported_but_not_judged_in_a_dry_run(dry_run: DryRun) -> None:
    ratios = dry_run.report["ratios"]
    assert ratios["best_ours"] in ALWAYS_MEASURED
    assert ratios["B_over_A"] > 0
    goals = dry_run.report["goals"]
    assert [g["goal"].split(" ")[0] for g in goals] == ["MFU_4N", "B/A"]
    assert all(g["met"] is None and g["note"] for g in goals)
    assert "B/A = " in dry_run.output


def test_markdown_has_a_row_per_arm(dry_run: DryRun) -> None:
    rows = [line for line in dry_run.markdown.splitlines() if line.startswith("| ")]
    for arm in dry_run.report["arms"]:
        matching = [r for r in rows if r.startswith(f"| {arm['name']} |")]
        assert len(matching) == 1, f"no single row for {arm['name']} in:\n{dry_run.markdown}"
        assert f"| {arm['status']} |" in matching[0]
        if arm["reason"]:
            assert arm["reason"][:40] in matching[0]
    assert "Dry run" in dry_run.markdown


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("device_name", "label", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H200", "H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.0),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ],
)
def test_peak_table_matches_device_names(device_name: str, label: str, tflops: float) -> None:
    assert _load_script().peak_for(device_name) == (label, tflops)


def test_unknown_device_has_no_peak() -> None:
    assert _load_script().peak_for("Some Future GPU") is None

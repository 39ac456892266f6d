"""What a user outside this repository installs: the wheel (built here by uv from the tracked tree, as
scripts/release.sh does), installed into a fresh virtualenv without extras, gives the control layer
and CLI with the chart packaged inside, never touching torch, transformers or vLLM; a command that
needs an extra names it; and the release dry run builds every artefact and pushes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import API_KEY, BASE, ROOT, Live
from test_evals_e2e import _suite

from loraplane import __version__

CACHE = Path(os.environ.get("LORAPLANE_CACHE", Path.home() / ".cache" / "loraplane"))
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "vllm", "mlflow", "tensorboard")
# Records every attempt to import a heavy module (even one caught by the caller) into IMPORT_LOG.
GUARD = """
import os, sys
class _Guard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy!r}:
            with open(os.environ["IMPORT_LOG"], "a") as log:
                log.write(name + "\\n")
        return None
sys.meta_path.insert(0, _Guard())
"""


def _uv() -> str:
    found = sorted(CACHE.glob("tools/uv-*/bin/uv"))
    assert found, f"uv is installed by make setup into {CACHE}/tools"
    return str(found[-1])


@dataclass
class WheelEnv:
    wheel: Path
    venv: Path
    guard: Path  # a directory with the import guard's sitecustomize.py
    log: Path

    def run(
        self, *args: str, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {
            **os.environ,
            "PYTHONPATH": str(self.guard),
            "IMPORT_LOG": str(self.log),
            "LORAPLANE_HELM": str(ROOT / ".venv" / "bin" / "helm"),
            "KUBECONFIG": str(cwd / "no-kubeconfig"),
            "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
            **(env or {}),
        }
        return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=environ)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> WheelEnv:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        rel = name.decode()
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    for archive in (ROOT / "charts" / "loraplane" / "charts").glob("gpu-operator-*.tgz"):
        (src / "charts" / "loraplane" / "charts" / archive.name).write_bytes(archive.read_bytes())
    env = {**os.environ, "UV_CACHE_DIR": str(CACHE / "uv")}
    dist = tmp / "dist"
    built = subprocess.run(
        [_uv(), "build", "--wheel", "--out-dir", str(dist), str(src)], capture_output=True, text=True, env=env
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("loraplane-*.whl")
    venv = tmp / "venv"
    made = subprocess.run(
        [_uv(), "venv", "--python", sys.executable, str(venv)], capture_output=True, text=True, env=env
    )
    assert made.returncode == 0, made.stderr
    lock = str(ROOT / "requirements" / "lock.txt")
    installed = subprocess.run(
        [_uv(), "pip", "install", "--python", str(venv / "bin" / "python"), "-c", lock, str(wheel)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    guard = tmp / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD.format(heavy=set(HEAVY)))
    return WheelEnv(wheel, venv, guard, tmp / "imports.log")


def test_the_wheel_metadata_declares_the_heavy_parts_as_extras(wheel_env: WheelEnv) -> None:
    with zipfile.ZipFile(wheel_env.wheel) as whl:
        names = whl.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(meta_name).decode()
    requires = [
        line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")
    ]
    always = [r for r in requires if "extra ==" not in r]
    assert not [r for r in always if r.split("<")[0].split(">")[0].split("=")[0].strip() in HEAVY], always
    for extra, dist in (
        ("train", "torch"),
        ("train", "trl"),
        ("train", "tensorboard"),
        ("serve", "fastapi"),
        ("serve", "aiohttp"),
        ("track", "mlflow-skinny"),
    ):
        assert any(r.startswith(dist) and f'extra == "{extra}"' in r for r in requires), (extra, dist)
    assert 'loraplane[serve,track,train]; extra == "all"' in requires
    assert f"Version: {__version__}" in meta
    # the chart and its subcharts are package data, with NVIDIA's operator archive
    chart = "loraplane/charts/loraplane/"
    for part in ("Chart.yaml", "values.yaml", "values.schema.json", "crds/loraadapters.loraplane.dev.yaml"):
        assert chart + part in names, part
    assert [n for n in names if n.startswith(chart + "charts/gpu-operator-") and n.endswith(".tgz")]
    assert not [n for n in names if n.startswith(("loraplane/tests/", "loraplane/docs/"))]


def test_the_version_has_one_source() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "loraplane" / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__, "scripts/release.sh refuses a release otherwise"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (
        'dynamic = ["version"]' in pyproject and 'version = { attr = "loraplane.__version__" }' in pyproject
    )


def test_the_cli_from_the_wheel_runs_and_renders_its_packaged_chart_without_importing_torch(
    wheel_env: WheelEnv, tmp_path: Path
) -> None:
    absent = wheel_env.run("python", "-c", "import torch", cwd=tmp_path)
    assert absent.returncode != 0 and "No module named 'torch'" in absent.stderr, "no extras: no torch"
    wheel_env.log.unlink(missing_ok=True)

    helped = wheel_env.run("loraplane", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "install" in helped.stdout, helped.stderr
    version = wheel_env.run("loraplane", "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"loraplane {__version__}"

    # from an empty directory: the chart comes from the installed package, not a checkout
    rendered = wheel_env.run("loraplane", "-n", "ml", "install", "--dry-run", cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    assert "(chart minimum); nothing was installed" in rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    assert {
        "Deployment/platform-loraplane-vllm",
        "CustomResourceDefinition/loraadapters.loraplane.dev",
    } <= kinds
    assert all(
        d["metadata"].get("namespace", "ml") == "ml" for d in docs if d["kind"] != "CustomResourceDefinition"
    )
    operator = wheel_env.run(
        "loraplane", "-n", "ml", "install", "--dry-run", "--gpu-mode", "operator", cwd=tmp_path
    )
    assert operator.returncode == 0, operator.stderr
    assert "kind: ClusterPolicy" in operator.stdout, "NVIDIA's chart is packaged with ours"
    bad = wheel_env.run(
        "loraplane", "-n", "ml", "install", "--dry-run", "--set", "serving.replicas=-1", cwd=tmp_path
    )
    assert bad.returncode == 2 and "at '/replicas': minimum: got -1, want 0" in bad.stderr

    attempted = wheel_env.log.read_text().split() if wheel_env.log.exists() else []
    assert attempted == [], f"the control layer tried to import {sorted(set(attempted))}"


def test_a_command_that_needs_an_extra_says_which(wheel_env: WheelEnv, tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = tmp_path / "train.yaml"
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": {"path": str(tmp_path / "model")},
                "dataset": {"path": str(tmp_path / "data.jsonl")},
                "output": {"adapters_root": str(home / "adapters"), "name": "x"},
            }
        )
    )
    trained = wheel_env.run("loraplane", "--home", str(home), "train", "submit", str(config), cwd=tmp_path)
    assert trained.returncode == 2, trained.stdout + trained.stderr
    assert "part of loraplane[train], which is not installed" in trained.stderr
    assert "pip install 'loraplane[train]'" in trained.stderr and "Traceback" not in trained.stderr


@pytest.mark.e2e
def test_evals_run_from_the_wheel_against_the_live_server(
    wheel_env: WheelEnv, live: Live, tmp_path: Path
) -> None:
    """The evaluation client is part of the control layer: a suite against a live vLLM, from the
    wheel's environment, with no torch, transformers or vLLM there."""
    suite = _suite(tmp_path, "sentiment", live.eval_sets["sentiment"], {"min_score": {"exact_match": 0.0}})
    wheel_env.log.unlink(missing_ok=True)
    ran = wheel_env.run(
        "loraplane", "evals", "run", str(suite), "--endpoint", f"{live.server.url}/v1", "--candidate", BASE,
        "--report-dir", str(tmp_path / "report"), "-o", "json",
        cwd=tmp_path, env={"LORAPLANE_API_KEY": API_KEY},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout)
    assert report["complete"] and report["gate"]["passed"] is True
    assert list((tmp_path / "report").glob("*.png")), "the report's charts (matplotlib is in the base)"
    attempted = wheel_env.log.read_text().split() if wheel_env.log.exists() else []
    assert attempted == [], f"evals run tried to import {sorted(set(attempted))}"


@pytest.mark.e2e
def test_the_release_dry_run_builds_every_artefact_and_pushes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    ran = subprocess.run(
        ["bash", str(ROOT / "scripts" / "release.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    chart = yaml.safe_load((ROOT / "charts" / "loraplane" / "Chart.yaml").read_text())
    wheel = out / f"loraplane-{__version__}-py3-none-any.whl"
    sdist = out / f"loraplane-{__version__}.tar.gz"
    packaged = out / f"loraplane-{chart['version']}.tgz"
    assert wheel.is_file() and sdist.is_file() and packaged.is_file(), sorted(p.name for p in out.iterdir())
    with tarfile.open(packaged) as tgz:
        meta = yaml.safe_load(tgz.extractfile("loraplane/Chart.yaml").read())  # type: ignore[union-attr]
        assert meta["appVersion"] == __version__
        assert "loraplane/charts/gpu-operator/Chart.yaml" in tgz.getnames(), "NVIDIA's chart inside ours"
    would = [line for line in ran.stdout.splitlines() if line.startswith("would run: ")]
    assert any(" push " in line and "oci://" in line for line in would), would
    assert any(line.endswith(f"/loraplane:{__version__}") for line in would), "the serving image"
    assert any(" publish " in line and wheel.name in line for line in would), would
    assert "the wheel installs without torch and renders its packaged chart" in ran.stderr
    for artefact in (wheel, sdist, packaged):
        assert f"{artefact.name}" in ran.stdout, "each artefact's sha256 is printed"


def test_the_release_workflow_tests_first_then_runs_the_release_script_on_a_tag() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    triggers = workflow.get("on") or workflow.get(True)  # YAML 1.1 reads a bare `on` as true
    assert triggers == {"push": {"tags": ["v*"]}}
    jobs = workflow["jobs"]
    assert any(".ci/run" in step.get("run", "") for step in jobs["test"]["steps"]), (
        "the README's test command"
    )
    release = jobs["release"]
    assert release["needs"] == "test"
    runs = [step.get("run", "") for step in release["steps"]]
    assert any("scripts/release.sh" in r and "--dry-run" not in r for r in runs)
    assert release["env"]["RELEASE_TAG"] == "${{ github.ref_name }}", (
        "release.sh checks the tag is v<version>"
    )
    assert release["permissions"]["id-token"] == "write", "PyPI trusted publishing, no stored token"

"""The images the chart runs, checked statically (no Docker engine here): pinned bases, non-root,
locked dependencies, and every third-party module loraplane imports installed in the image."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CHART = ROOT / "charts" / "loraplane"
CHART_UID = re.search(
    r"runAsUser: (\d+)", (CHART / "charts" / "serving" / "templates" / "deployment.yaml").read_text()
).group(1)  # type: ignore[union-attr]
# What each base image brings (vLLM's official image: vLLM and its stack; PyTorch's: torch).
BASE_PROVIDES = {
    "serving.Dockerfile": {
        "vllm",
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "numpy",
        "huggingface-hub",
    },
    "trainer.Dockerfile": {"torch", "numpy"},
}
# Which source folders each image must be able to import (its entry points' reach).
IMAGE_SOURCES = {
    "serving.Dockerfile": ("common", "platform", "serving", "evals"),
    "trainer.Dockerfile": ("common", "trainer"),
}


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _pip_installed(name: str) -> set[str]:
    packages: set[str] = set()
    for op, arg in _instructions(name):
        if op != "RUN":
            continue
        for command in arg.split("&&"):
            words = command.split()
            if "pip" not in words or "install" not in words:
                continue
            for word in words[words.index("install") + 1 :]:
                word = word.strip('"')
                if word.startswith("-") or word in (".", "requirements/lock.txt"):
                    continue
                packages.add(re.split(r"[=<>\[]", word)[0].lower().replace("_", "-"))
    return packages


def _third_party_imports(folders: tuple[str, ...]) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in stdlib and top != "loraplane":
                        found.add(top)
    return found


@pytest.mark.parametrize("name", sorted(BASE_PROVIDES))
def test_the_image_is_pinned_non_root_and_installs_locked_versions(name: str) -> None:
    steps = _instructions(name)
    (base,) = [arg for op, arg in steps if op == "FROM"]
    _, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: base image {base!r} is not pinned"
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] == CHART_UID, "runs as the uid the chart's securityContext sets"
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "-c requirements/lock.txt" in runs, "dependencies are constrained to the tested lock"
    assert "--no-deps ." in runs, "loraplane itself installs without re-resolving the base image's stack"
    assert not re.search(r"curl[^|]*\|\s*(ba)?sh|ADD\s+https?://", (DOCKER / name).read_text()), (
        "no piped installers"
    )
    assert not {"torchvision", "torchaudio", "torchcodec"} & _pip_installed(name)


@pytest.mark.parametrize("name", sorted(BASE_PROVIDES))
def test_every_third_party_module_loraplane_imports_is_in_the_image(name: str) -> None:
    dists = importlib.metadata.packages_distributions()
    needed = set()
    for module in _third_party_imports(IMAGE_SOURCES[name]):
        candidates = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        needed.add(min(candidates))
    have = _pip_installed(name) | BASE_PROVIDES[name]
    # Installed transitively by what the Dockerfile names (and pinned by the lock the same way).
    transitive = {"starlette", "anyio", "urllib3", "pydantic-core", "typing-extensions", "filelock", "tqdm"}
    missing = sorted(needed - have - transitive)
    assert not missing, f"{name} lacks {missing}: add them to its pip install line"


def _values(part: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "charts" / part / "values.yaml").read_text())
    return values


def test_the_chart_runs_these_images() -> None:
    """Repositories, default tags (the appVersion) and versions agree between chart and Dockerfiles."""
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for part, dockerfile, repository in (
        ("serving", "serving.Dockerfile", "ghcr.io/loraplane/loraplane"),
        ("trainer", "trainer.Dockerfile", "ghcr.io/loraplane/loraplane-trainer"),
    ):
        image = _values(part)["image"]
        assert image["repository"] == repository
        assert image["tag"] == "", "the tag defaults to the chart's appVersion"
        text = (DOCKER / dockerfile).read_text()
        assert f"{repository}:{app_version} " in text, (
            f"{dockerfile}'s build command tags {repository}:{app_version}"
        )
        args = dict(arg.split("=", 1) for op, arg in _instructions(dockerfile) if op == "ARG" and "=" in arg)
        assert args["LORAPLANE_VERSION"] == app_version, f"{dockerfile} labels the chart's appVersion"


def test_every_command_the_chart_runs_is_in_its_image() -> None:
    """The first word of each container command and exec probe the chart renders, per image."""
    helm = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")
    multi = CHART / "ci" / "02-multi-node-training-values.yaml"
    commands: dict[str, set[str]] = {}
    for extra in ([], ["-f", str(multi)]):
        out = subprocess.run(
            [helm, "template", "p", str(CHART), *extra], capture_output=True, text=True, check=True
        ).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        docs += [yaml.safe_load(d["data"]["job.yaml"]) for d in docs if "job.yaml" in d.get("data", {})]
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                words = [
                    c.get("command", [None])[0],
                    *(c.get("readinessProbe", {}).get("exec", {}).get("command", [])[:1]),
                ]
                commands.setdefault(c["image"].split(":")[0], set()).update(w for w in words if w)
    assert commands["ghcr.io/loraplane/loraplane"] == {"python"}
    assert commands["ghcr.io/loraplane/loraplane-trainer"] == {"python", "torchrun"}
    serving = (DOCKER / "serving.Dockerfile").read_text()
    # vLLM's image is Python 3 from the distribution: the image makes sure `python` names it.
    assert re.search(r"ln -s[f]? .*python3.* /usr/local/bin/python\b", serving), (
        "serving image provides `python`"
    )
    (base,) = [arg for op, arg in _instructions("trainer.Dockerfile") if op == "FROM"]
    assert base.startswith("pytorch/pytorch:"), "PyTorch's image (conda) provides python and torchrun"

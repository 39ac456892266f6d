"""The images the chart runs, checked statically (no Docker engine here): pinned bases, non-root,
locked dependencies, and every third-party module loraplane imports installed in the image. The slim
gateway image installs exactly the gateway's distributions (scripts/gateway-dists.py), which the
gateway's imports, followed through loraplane's modules, never leave; tests/test_images.py runs the CPU
build of it."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_client import helm_args

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
    "gateway.Dockerfile": set(),  # a slim Python: nothing but the interpreter and pip
}
# Which source folders each image must be able to import (its entry points' reach).
IMAGE_SOURCES = {
    "serving.Dockerfile": ("common", "registry", "platform", "serving", "evals"),
    "trainer.Dockerfile": ("common", "registry", "trainer"),
}
# Imported only when a user asked for it and installed it (tracking.wandb: `pip install wandb`).
OPTIONAL_MODULES = {"wandb"}
# What the slim gateway image exists to leave out.
HEAVY = {"torch", "vllm", "transformers", "tokenizers", "safetensors", "peft", "trl", "datasets", "numpy"}


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


def _imports(path: Path) -> list[str]:
    """Every module PATH imports, at module level or inside functions (absolute imports; a
    `from loraplane.x import y` also names loraplane.x.y, which may be a module)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module.split(".")[0] == "loraplane":
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _third_party_imports(folders: tuple[str, ...]) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                if top not in stdlib and top != "loraplane":
                    found.add(top)
    return found


def _source(module: str) -> Path | None:
    """The file of a loraplane module (the repository root is the package), None for a namespace
    package or a name that is not a module (an attribute from `from loraplane.x import y`)."""
    base = ROOT.joinpath(*module.split(".")[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _reach(module: str) -> tuple[set[str], dict[str, set[str]]]:
    """The loraplane modules MODULE imports, directly or through each other (lazy imports too), and
    the third-party top-level modules they import, each with the loraplane modules importing it."""
    stdlib = set(sys.stdlib_module_names)
    seen: set[str] = set()
    third: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in _imports(path):
            parts = imported.split(".")
            if parts[0] == "loraplane":
                todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            elif parts[0] not in stdlib:
                third.setdefault(parts[0], set()).add(name)
    return seen, third


def _gateway_dists() -> Any:
    spec = importlib.util.spec_from_file_location("gateway_dists", ROOT / "scripts" / "gateway-dists.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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
    modules = (
        set(_reach("loraplane.serving.gateway.__main__")[1])
        if name == "gateway.Dockerfile"
        else _third_party_imports(IMAGE_SOURCES[name])
    )
    have = _pip_installed(name) | BASE_PROVIDES[name]
    for module in modules - OPTIONAL_MODULES:
        candidates = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        # a module several distributions provide (mlflow: mlflow or mlflow-skinny) needs any one of them
        needed.add(min(candidates & have or candidates))
    # Installed transitively by what the Dockerfile names (and pinned by the lock the same way).
    transitive = {"starlette", "anyio", "urllib3", "pydantic-core", "typing-extensions", "filelock", "tqdm"}
    missing = sorted(needed - have - transitive)
    assert not missing, f"{name} lacks {missing}: add them to its pip install line"


def _values(part: str) -> dict[str, Any]:
    """A subchart's values, or the parent's gateway section for "gateway"."""
    if part == "gateway":
        parent: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]
        return parent
    values: dict[str, Any] = yaml.safe_load((CHART / "charts" / part / "values.yaml").read_text())
    return values


@pytest.mark.parametrize("name", sorted(BASE_PROVIDES))
def test_the_image_carries_the_oci_labels(name: str) -> None:
    labels = " ".join(arg for op, arg in _instructions(name) if op == "LABEL")
    for key in ("title", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{name} lacks org.opencontainers.image.{key}"
    assert 'org.opencontainers.image.title="loraplane-' in labels


def test_the_gateway_image_installs_the_gateway_distributions_and_no_ml_stack() -> None:
    dists = _gateway_dists()
    installed = _pip_installed("gateway.Dockerfile")
    assert installed == {_canonical(r) for r in dists.ROOTS}, "it installs scripts/gateway-dists.py's ROOTS"
    assert not HEAVY & installed
    steps = _instructions("gateway.Dockerfile")
    (base,) = [arg for op, arg in steps if op == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), f"a slim Python 3.11 (the lock's): {base}"
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "pip uninstall -y -q pip setuptools wheel" in runs, "no installer or build tool left in the image"
    for heavy in ("torch", "vllm", "transformers"):
        assert heavy in runs.split("for m in", 1)[1].split(";", 1)[0], f"the build proves {heavy} is absent"
    # The same distributions at the lock's versions: what the CPU build (scripts/build-images.sh) copies.
    lock = dict(
        line.split("==", 1)
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    closure = dists.closure()
    assert not HEAVY & set(closure), sorted(HEAVY & set(closure))
    for name, dist in closure.items():
        assert lock.get(name) == dist.version, f"{name} {dist.version} is not the lock's {lock.get(name)}"


def test_the_gateways_imports_stay_inside_its_distributions() -> None:
    """Followed from loraplane.serving.gateway through loraplane's modules (lazy imports too), every
    third-party module comes from a root of scripts/gateway-dists.py, and none is the ML stack's."""
    modules, third = _reach("loraplane.serving.gateway.__main__")
    assert "loraplane.registry.kubernetes" in modules, "the kubernetes registry is followed"
    heavy = {m: sorted(by) for m, by in third.items() if m in HEAVY}
    assert not heavy, f"the gateway's path imports the ML stack: {heavy}"
    assert not {m for m in modules if m.startswith(("loraplane.trainer", "loraplane.serving.launcher"))}
    packages = importlib.metadata.packages_distributions()
    roots = {_canonical(r) for r in _gateway_dists().ROOTS}
    outside = {m: sorted(by) for m, by in third.items() if not {_canonical(d) for d in packages[m]} & roots}
    assert not outside, f"add their distributions to ROOTS in scripts/gateway-dists.py: {outside}"


def test_the_chart_runs_these_images() -> None:
    """Repositories, default tags (the appVersion) and versions agree between chart and Dockerfiles."""
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for part, dockerfile, repository in (
        ("serving", "serving.Dockerfile", "ghcr.io/loraplane/loraplane"),
        ("trainer", "trainer.Dockerfile", "ghcr.io/loraplane/loraplane-trainer"),
        ("gateway", "gateway.Dockerfile", "ghcr.io/loraplane/loraplane-gateway"),
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
    one_node_gpus = ["--set", "trainer.gpusPerNode=2", "--set", "trainer.resources.limits.nvidia\\.com/gpu=2"]
    for extra in ([], ["-f", str(multi)], one_node_gpus):
        out = subprocess.run(
            [helm, *helm_args(("template", "p", str(CHART), *extra))],
            capture_output=True,
            text=True,
            check=True,
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
    assert commands["ghcr.io/loraplane/loraplane-gateway"] == {"python"}, "the gateway runs its own image"
    serving = (DOCKER / "serving.Dockerfile").read_text()
    # vLLM's image is Python 3 from the distribution: the image makes sure `python` names it.
    assert re.search(r"ln -s[f]? .*python3.* /usr/local/bin/python\b", serving), (
        "serving image provides `python`"
    )
    (base,) = [arg for op, arg in _instructions("trainer.Dockerfile") if op == "FROM"]
    assert base.startswith("pytorch/pytorch:"), "PyTorch's image (conda) provides python and torchrun"
    (base,) = [arg for op, arg in _instructions("gateway.Dockerfile") if op == "FROM"]
    assert base.startswith("python:"), "Python's official image provides python"

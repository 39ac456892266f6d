"""The repository root is the package `loraplane`; `platform/` must never shadow the stdlib module."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_component_folders_are_not_regular_top_level_packages() -> None:
    for folder in ("platform", "trainer", "serving", "evals", "common", "registry"):
        assert (ROOT / folder).is_dir()
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow or leak"


def test_python_c_import_platform_from_repo_root_gets_stdlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out).resolve().parent == STDLIB, out


def test_python_m_pytest_from_repo_root_gets_stdlib(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    result_file = tmp_path / "platform_file.txt"
    probe.write_text(
        "import platform, sys\n"
        "def test_probe():\n"
        f"    open({str(result_file)!r}, 'w').write('\\n'.join([platform.__file__, *sys.path]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    platform_file, *sys_path = result_file.read_text().splitlines()
    assert Path(platform_file).resolve().parent == STDLIB
    # The repo root really was on sys.path (that is what would make a regular `platform` shadow it).
    assert ROOT in {Path(p).resolve() for p in sys_path if p} or "" in sys_path


def test_components_import_as_loraplane_subpackages() -> None:
    code = (
        "import loraplane.platform.cli, loraplane.trainer.config, loraplane.serving.launcher, "
        "loraplane.evals.runner, platform; print(platform.python_version())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == sys.version.split()[0]


def test_cli_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from loraplane.platform import cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'vllm', 'peft', 'mlflow', 'tensorboard') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""The readiness probe's own behaviour without a server: light, one line, exit 1 (the checks against
a live vLLM, a hung engine included, are in tests/test_rehydrate_e2e.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def closed_url() -> Iterator[str]:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraplane.serving.readiness", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unreachable_server_is_not_ready_with_one_line(closed_url: str) -> None:
    proc = _probe("--url", closed_url, "--base-model", "demo-base", "--timeout", "3")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"not ready: cannot reach vLLM at {closed_url}"
    )


def test_a_broken_registry_or_key_file_is_not_ready(closed_url: str, tmp_path: Path) -> None:
    (tmp_path / "registry.json").write_text(json.dumps({"adapters": {"x": {"versions": 3}}}))
    proc = _probe("--url", closed_url, "--base-model", "b", "--registry-home", str(tmp_path))
    assert proc.returncode == 1 and "registry file is corrupt" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _probe("--url", closed_url, "--base-model", "b", "--api-key-file", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "No such file" in proc.stderr


def test_the_probe_imports_neither_torch_nor_vllm(closed_url: str, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from loraplane.serving import readiness\n"
        f"rc = readiness.main(['--url', '{closed_url}', '--base-model', 'b',\n"
        f"                     '--registry-home', '{tmp_path}'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'transformers'))\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "1 []", proc.stdout + proc.stderr

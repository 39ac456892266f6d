"""The readiness probe's own behaviour: light, one line, exit 1 without a server, no 'hung' verdict
when /metrics stalls too; against the session's vLLM, which registered versions it requires given
the server's limits (a hung engine, a busy one, a restart and drift are in tests/test_rehydrate_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from support import API_KEY, BASE, Live
from test_gateway import serve

from loraplane.platform.adapters import register_adapter
from loraplane.serving.readiness import NotReady, check


@pytest.fixture
def closed_url() -> Iterator[str]:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraplane.serving.readiness", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
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


@pytest.mark.e2e
def test_a_version_the_server_would_skip_is_required_only_within_the_given_limits(
    live: Live, tmp_path: Path
) -> None:
    """A registered rank-8 version the server has not loaded. Without limits the probe requires it;
    with the server's root and rank limit 8 too; with rank limit 4, or another root, a server started
    with those limits would have skipped it (serving/rehydrate.py), so it is not required."""
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    name = "rd-" + tmp_path.name.lower().replace("_", "-")[-20:].strip("-")
    copy = settings.adapters_dir / name / "v1"
    shutil.copytree(live.adapters["sentiment"], copy)
    register_adapter(settings, copy, name=name, version="v1")
    base = ["--url", live.server.url, "--base-model", BASE, "--registry-home", str(settings.home)]
    root = ["--adapters-root", str(settings.adapters_dir)]
    env = {**os.environ, "VLLM_API_KEY": API_KEY}
    missing = f"not ready: 1 registered adapter version(s) not loaded: {name}@v1\n"

    plain = _probe(*base, env=env)
    assert (plain.returncode, plain.stderr) == (1, missing)
    within = _probe(*base, *root, "--max-lora-rank", "8", env=env)
    assert (within.returncode, within.stderr) == (1, missing)
    above = _probe(*base, *root, "--max-lora-rank", "4", env=env)
    assert (above.returncode, above.stdout, above.stderr) == (0, "ready\n", "")
    elsewhere = _probe(*base, "--adapters-root", str(tmp_path / "other"), "--max-lora-rank", "8", env=env)
    assert (elsewhere.returncode, elsewhere.stderr) == (0, "")
    alone = _probe(*base, "--max-lora-rank", "8", env=env)
    assert alone.returncode == 2 and "--adapters-root and --max-lora-rank go together" in alone.stderr


def test_a_server_whose_metrics_do_not_answer_is_not_called_hung() -> None:
    """A completion that waits out its budget while /metrics does not answer either: the probe cannot
    tell a busy engine from a hung one, and says that (not 'hung'). A real vLLM cannot be made to stall
    /metrics while /health answers, so a small HTTP server plays one whose API server is starved."""
    app = FastAPI()
    released = threading.Event()  # set once the probe has given its verdict: the server can then stop

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/metrics")
    @app.post("/v1/completions")
    async def stalled() -> dict[str, str]:
        await asyncio.to_thread(released.wait, 60)
        return {}

    with serve(app) as url:
        try:
            with pytest.raises(NotReady) as caught:
                asyncio.run(check(url, base_model=BASE, api_key=None, timeout=2, required=None))
        finally:
            released.set()
    reason = str(caught.value)
    assert reason.startswith(f"a one-token completion on {BASE!r} did not finish within"), reason
    assert "/metrics did not answer often enough to tell a busy engine from a hung one" in reason
    assert "hung" not in reason.split("from a hung one")[1]

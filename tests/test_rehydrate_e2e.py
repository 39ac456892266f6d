"""A restarted vLLM server serves every registered adapter before it reports ready.

The server is started the way the chart starts it, through ``python -m loraplane.serving`` with
``--registry-home``: nobody runs ``adapters load`` after the (re)start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, BASE, Live

from loraplane.platform.quickstart import free_port

pytestmark = pytest.mark.e2e

DEADLINE_S = 600.0


def test_a_fresh_server_answers_with_every_registered_adapter_as_soon_as_it_is_healthy(
    live: Live, demo_model: Path, tmp_path: Path
) -> None:
    settings = live.settings
    port = free_port()
    argv = [
        sys.executable, "-m", "loraplane.serving",
        "--model", str(demo_model), "--served-model-name", BASE, "--port", str(port),
        "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "256", "--dtype", "float32",
        "--kv-cache-gib", "1",
        "--registry-home", str(settings.home), "--adapters-root", str(settings.adapters_dir),
    ]  # fmt: skip
    log = (tmp_path / "vllm.log").open("w")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LORAPLANE_API_KEY": API_KEY}
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM did not become healthy"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        # Healthy: every registered version answers at once, with no load call in between.
        served = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers).json()["data"]}
        assert {"sentiment@v1", "animals@v1"} <= served
        for name in ("sentiment@v1", "animals@v1"):
            reply = httpx.post(
                f"{url}/v1/completions",
                headers=headers,
                json={"model": name, "prompt": "Hello", "max_tokens": 2, "temperature": 0},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
        assert "registered adapter version(s) from startup" in (tmp_path / "vllm.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

"""The slim gateway image scripts/build-images.sh builds (localhost/loraplane/loraplane-gateway), run:
unpacked from its OCI layout and started as uid 10001 in a chroot of its root filesystem (a private
mount namespace, as the script's own smoke test), with nothing from the host's Python. The gateway
imports and serves there; torch, vLLM and transformers do not import; the image's config is what the
chart's pod expects. Marker `node`: root, and a Debian mirror the first time (about 2 min cold, the
image comes from the cache afterwards)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplane.platform.quickstart import free_port

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "build-images.sh"
UID = 10001


def _script(*args: str) -> str:
    proc = subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"build-images.sh {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def layout() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building the images needs root (root-owned layers, chroot)")
    (line,) = _script("build", "gateway").split()
    return Path(line)


@pytest.fixture(scope="module")
def rootfs(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    bundle = tmp_path_factory.mktemp("gateway-image") / "bundle"
    tag = _script("ref", "gateway").strip().rsplit(":", 1)[1]
    unpack = ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)]
    subprocess.run(unpack, check=True, capture_output=True)
    yield bundle / "rootfs"
    shutil.rmtree(bundle, ignore_errors=True)


def _chroot(rootfs: Path, *argv: str) -> list[str]:
    """ARGV as uid 10001 in a chroot of ROOTFS, with only the image's PATH (the host's network)."""
    inner = (
        'r="$1"; shift; mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" && '
        'exec chroot --userspec=10001:10001 "$r" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin '
        'HOME=/tmp "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c", inner, "_", str(rootfs), *argv]


def _run(rootfs: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_chroot(rootfs, *argv), capture_output=True, text=True, timeout=120)


def _config(layout: Path) -> dict[str, Any]:
    def blob(digest: str) -> Path:
        algorithm, value = digest.split(":")
        return layout / "blobs" / algorithm / value

    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    manifest = json.loads(blob(entry["digest"]).read_text())
    config: dict[str, Any] = json.loads(blob(manifest["config"]["digest"]).read_text())
    return config


def test_the_gateway_imports_in_its_image_and_the_ml_stack_does_not(rootfs: Path) -> None:
    ok = _run(
        rootfs,
        "python",
        "-c",
        "import os, loraplane.serving.gateway.app, loraplane.registry.kubernetes, kubernetes.client, "
        "kubernetes.config, uvicorn; "
        "print(os.getuid(), loraplane.serving.gateway.app.__file__)",
    )
    assert ok.returncode == 0, ok.stderr
    uid, module = ok.stdout.split()
    assert int(uid) == UID
    assert module.startswith("/opt/venv/lib/python3.11/site-packages/loraplane/"), "a regular install"
    for heavy in ("torch", "vllm", "transformers"):
        proc = _run(rootfs, "python", "-c", f"import {heavy}")
        assert proc.returncode != 0 and f"No module named '{heavy}'" in proc.stderr, (heavy, proc.stderr)
    # what the chart runs: `python -m loraplane.serving.gateway` with the Deployment's flags
    usage = _run(rootfs, "python", "-m", "loraplane.serving.gateway", "--help")
    assert usage.returncode == 0, usage.stderr
    flags = {"--upstream", "--registry", "--api-keys-file", "--upstream-api-key-file"}
    assert flags <= set(usage.stdout.split()), usage.stdout


class _Upstream(BaseHTTPRequestHandler):
    """vLLM's routes the test sends through the gateway."""

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "base", "object": "model"}]})
        else:
            self._send(404, {"error": self.path})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(200, {"object": "chat.completion", "model": body["model"], "choices": [{"index": 0}]})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_gateway_serves_from_its_image(rootfs: Path) -> None:
    """Started as the chart starts it (uvicorn, uvloop, httptools from the image): /health and a chat
    completion reach the upstream through it, /metrics counts them."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    gateway = subprocess.Popen(
        _chroot(
            rootfs,
            "python",
            "-m",
            "loraplane.serving.gateway",
            f"--upstream=http://127.0.0.1:{upstream.server_address[1]}",
            "--registry=local",
            "--home=/tmp/loraplane",
            "--allow-unauthenticated",
            "--host=127.0.0.1",
            f"--port={port}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if gateway.poll() is not None:
                pytest.fail(f"the gateway exited:\n{gateway.stdout.read() if gateway.stdout else ''}")
            try:
                health = httpx.get(f"{url}/health", timeout=5, trust_env=False)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not listen within 60 s"
                time.sleep(0.5)
        assert health.status_code == 200, health.text
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            timeout=30,
            trust_env=False,
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == "base"
        metrics = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
        assert metrics.status_code == 200 and "chat" in metrics.text, metrics.text[:2000]
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
        upstream.shutdown()


def test_the_gateway_image_runs_as_the_charts_user_with_its_labels_and_no_build_tools(
    layout: Path, rootfs: Path
) -> None:
    config = _config(layout)
    assert config["config"]["User"] == f"{UID}:{UID}"
    assert config["config"]["Cmd"] == ["python", "-m", "loraplane.serving.gateway", "--help"]
    env = config["config"]["Env"]
    assert "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in env
    labels = config["config"]["Labels"]
    version = _script("ref", "gateway").strip().rsplit(":", 1)[1]
    assert labels["org.opencontainers.image.title"] == "loraplane-gateway"
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.source"] == "https://github.com/loraplane/loraplane"
    assert "no torch" in labels["org.opencontainers.image.description"]
    # No compiler, no installer: the venv holds the interpreter's links and nothing else to run.
    for tool in ("gcc", "cc", "c++", "make", "pip", "pip3"):
        for directory in ("usr/bin", "usr/local/bin", "opt/venv/bin"):
            assert not (rootfs / directory / tool).exists(), f"/{directory}/{tool} in the image"
    assert sorted(p.name for p in (rootfs / "opt" / "venv" / "bin").iterdir()) == [
        "python",
        "python3",
        "python3.11",
    ]
    site = rootfs / "opt" / "venv" / "lib" / "python3.11" / "site-packages"
    for heavy in ("torch", "vllm", "transformers", "numpy"):
        assert not (site / heavy).exists(), heavy
    assert not list((rootfs / "opt" / "python" / "lib" / "python3.11" / "site-packages").iterdir()), (
        "nothing from the builder's own interpreter"
    )

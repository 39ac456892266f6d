"""`loraplane adapters sync` without a live server: an unreachable replica is reported, exit 1 (the
real server's sync is in tests/test_rehydrate_e2e.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from support import write_fake_adapter

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter


def test_sync_reports_an_unreachable_replica_and_exits_1(settings: Settings) -> None:
    register_adapter(
        settings, write_fake_adapter(settings.adapters_dir / "bot" / "v1"), name="bot", version="v1"
    )
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        argv = [
            sys.executable, "-m", "loraplane.platform.cli", "--home", str(settings.home),
            "--adapters-root", str(settings.adapters_dir), "adapters", "sync", "--server-url", down,
        ]  # fmt: skip
        as_json = subprocess.run([*argv, "-o", "json"], capture_output=True, text=True, env=dict(os.environ))
    assert as_json.returncode == 1, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    (replica,) = report["replicas"]
    assert (
        replica["url"] == down
        and replica["loaded"] == []
        and "cannot reach the vLLM server" in replica["error"]
    )

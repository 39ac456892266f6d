"""``python -m loraplane.serving.check_adapter``: the checks the CLI runs in a vLLM pod (through
``kubectl exec``) when the adapter's files are on a volume only the pods mount. Run here as the same
process the pod runs, on real adapter files; the walk on the real node runs it in a real pod."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import write_fake_adapter

from loraplane.common.files import sha256_file
from loraplane.registry.model import AdapterVersion

WEIGHTS = "adapter_model.safetensors"


def version(path: Path) -> AdapterVersion:
    return AdapterVersion(
        name="demo", version="v1", served_name="demo@v1", path=str(path),
        weights_sha256=sha256_file(path / WEIGHTS),
    )  # fmt: skip


def check(entry: AdapterVersion | str, root: Path, *, rank: int = 8) -> tuple[int, dict[str, object]]:
    stdin = entry if isinstance(entry, str) else entry.model_dump_json()
    proc = subprocess.run(
        [sys.executable, "-m", "loraplane.serving.check_adapter", "--adapters-root", str(root),
         "--max-lora-rank", str(rank)],
        input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    return proc.returncode, json.loads(lines[0])


def test_a_sound_version_passes(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    code, verdict = check(version(write_fake_adapter(root / "demo" / "v1")), root)
    assert (code, verdict["ok"]) == (0, True), verdict


def test_a_rank_over_the_servers_limit_is_refused_as_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    code, verdict = check(version(write_fake_adapter(root / "demo" / "v1", r=16)), root, rank=8)
    assert code == 2 and verdict["ok"] is False and verdict["exit_code"] == 2, verdict
    assert "16" in str(verdict["error"]) and "8" in str(verdict["error"]), verdict


def test_weights_changed_since_registration_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    entry = version(write_fake_adapter(root / "demo" / "v1"))
    write_fake_adapter(root / "demo" / "v1", r=4)  # other weights in the registered place
    code, verdict = check(entry, root)
    assert code == 3 and "changed since registration" in str(verdict["error"]), verdict
    assert "new version" in str(verdict["hint"]), verdict


def test_an_adapter_outside_the_adapters_root_is_refused(tmp_path: Path) -> None:
    entry = version(write_fake_adapter(tmp_path / "elsewhere" / "v1"))
    code, verdict = check(entry, tmp_path / "adapters")
    assert code == 2 and verdict["ok"] is False, verdict
    assert str(tmp_path / "adapters") in str(verdict["error"]) + str(verdict["hint"]), verdict


def test_input_that_is_not_a_version_says_so(tmp_path: Path) -> None:
    code, verdict = check('{"name": "demo"}', tmp_path)
    assert code == 1 and "is not the registry's JSON of one" in str(verdict["error"]), verdict

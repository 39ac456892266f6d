"""Published directories and state files appear whole or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loraplane.common.files import atomic_write_text, staged_directory


def test_staged_directory_publishes_complete_and_readable(tmp_path: Path) -> None:
    final = tmp_path / "bot" / "v1"
    with staged_directory(final) as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"weights")
        assert not final.exists()  # nothing visible until the block completes
    assert (final / "adapter_model.safetensors").read_bytes() == b"weights"
    assert oct(final.stat().st_mode & 0o777) == oct(0o755 & ~_umask())
    assert [p.name for p in final.parent.iterdir()] == ["v1"]


def test_staged_directory_cleans_up_on_error_and_never_overwrites(tmp_path: Path) -> None:
    final = tmp_path / "bot" / "v1"
    with pytest.raises(RuntimeError), staged_directory(final) as staging:
        (staging / "half").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert list(final.parent.iterdir()) == []
    final.mkdir()
    with pytest.raises(FileExistsError):
        staged_directory(final).__enter__()  # refused on entry: a published directory is never reused


def test_process_killed_mid_write_publishes_nothing(tmp_path: Path) -> None:
    final = tmp_path / "bot" / "v1"
    ready = tmp_path / "ready"
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from loraplane.common.files import staged_directory\n"
        f"with staged_directory(Path({str(final)!r})) as s:\n"
        "    (s / 'adapter_model.safetensors').write_bytes(b'half')\n"
        f"    Path({str(ready)!r}).write_text('x')\n"
        "    sys.stdin.read()\n"  # block until killed
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        for _ in range(600):
            if ready.exists():
                break
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
        assert ready.exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not final.exists()  # a reader never sees a half-written adapter


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["registry.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

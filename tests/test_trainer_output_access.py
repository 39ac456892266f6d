"""A training run whose output directory it cannot write fails with exit 2 (do not retry) at once.

A permission error is not transient: a Job that retried it (exit 1) failed the same way three times,
after loading the model and the data each time. The check runs before either is read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplane.common.errors import InvalidInputError
from loraplane.trainer.exit_codes import DO_NOT_RETRY
from loraplane.trainer.train import require_writable

NOBODY = 65534


def _as_nobody(directory: Path) -> tuple[int, str]:
    """``require_writable(directory)`` in a child process running as uid/gid 65534: (exit code, message)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report through the pipe
        os.close(read)
        code, message = 0, ""
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            require_writable(directory / "adapters", directory / "runs" / "bot")
        except InvalidInputError as exc:
            code, message = exc.exit_code, str(exc)
        except BaseException as exc:  # anything else is a test failure, reported as such
            code, message = 99, f"{type(exc).__name__}: {exc}"
        os.write(write, f"{code}\n{message}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    code, _, message = text.partition("\n")
    return int(code), message


@pytest.fixture
def volume() -> Iterator[Path]:
    """A root-owned directory every user can reach (pytest's tmp_path is root's alone, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="loraplane-volume-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
def test_an_output_directory_the_trainer_cannot_write_is_a_do_not_retry_error(volume: Path) -> None:
    volume.chmod(0o755)  # root's, like a hostPath volume that ignores the pod's fsGroup
    code, message = _as_nobody(volume)
    assert code == DO_NOT_RETRY, message
    assert (
        f"cannot write to {volume / 'adapters'} (as uid {NOBODY}, gid {NOBODY}): {volume} is not" in message
    )
    assert "fsGroup" in message and "chown" in message
    assert list(volume.iterdir()) == [], "a refused run creates nothing"

    volume.chmod(0o777)  # writable: the same check passes, and like the refusal creates nothing
    assert _as_nobody(volume) == (0, "")
    assert list(volume.iterdir()) == []

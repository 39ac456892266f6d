"""Child processes that never outlive the process that started them.

vLLM's API server starts an EngineCore process (and multiprocessing's resource tracker); when the
API server dies by SIGKILL they stay behind as orphans holding gigabytes of memory and the port's
engine. So every server loraplane starts runs in a process group of its own (a new session), and:

- :meth:`ProcessGroup.stop` signals the whole group (SIGTERM, then SIGKILL after a grace period),
  so the engine and every helper go with the API server;
- when the group's leader exits on its own, :meth:`ProcessGroup.reap` kills whatever of its group is
  left;
- a *watchdog* (:func:`start_watchdog`), a tiny separate process that holds the read end of a pipe
  whose write end only the parent has, kills every group it guards when that pipe closes. A pipe
  closes when its owner dies, however it dies, SIGKILL included: a killed ``loraplane serve`` (or
  supervisor) leaves no vLLM and no gateway behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import IO

log = logging.getLogger("loraplane.serving")

# The watchdog: ignores terminal signals (a Ctrl-C reaches its parent, which stops the groups itself),
# waits for its stdin to close, then stops every group named on its command line.
_WATCHDOG = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
groups = [int(g) for g in sys.argv[1:]]
while sys.stdin.buffer.read(65536):
    pass
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
grace_s = float(os.environ.get("LORAPLANE_WATCHDOG_GRACE", "10"))
for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0)):
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(g) for g in groups):
        time.sleep(0.1)
"""


class ProcessGroup:
    """A process started as the leader of a new process group (session)."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
    ) -> None:
        self.process: subprocess.Popen[bytes] = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def poll(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        """True while any process of the group is left (the leader, or children it left behind)."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap(self) -> None:
        """After the leader exited: kill what is left of its group (an orphaned engine, ...)."""
        self.signal(signal.SIGKILL)

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; return the leader's exit code."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("did not stop in time; killing it", extra={"pid": self.pid, "grace_s": grace})
        self.signal(signal.SIGKILL)  # the leader, if still there, and whatever it left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.process.returncode


class Watchdog:
    """Kills the guarded process groups when this process dies (see the module docstring)."""

    def __init__(self, groups: list[int], grace: float = 10.0) -> None:
        env = {**os.environ, "LORAPLANE_WATCHDOG_GRACE": str(grace)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, *map(str, groups)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # not in the terminal's group: a Ctrl-C does not end it early
        )

    def close(self) -> None:
        """Let the watchdog act now (the groups are stopped already, or should be)."""
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=30)


def start_watchdog(groups: list[int], grace: float = 10.0) -> Watchdog:
    return Watchdog(groups, grace)

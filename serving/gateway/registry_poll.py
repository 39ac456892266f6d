"""The registry for a gateway whose registry lives in Kubernetes (LoraAdapter objects).

A file can be stat'ed on every request; an API server cannot be listed on every request. A daemon
thread lists the objects every ``interval`` seconds (0.5 by default, so an alias flip reaches the
gateway within about half a second plus one list call) and the request path reads the latest
snapshot. A failed list keeps the last good snapshot and is logged once until it recovers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from loraplane.common.errors import LoraplaneError
from loraplane.registry.model import Registry, RegistryState

log = logging.getLogger("loraplane.serving.gateway")


class StateSource(Protocol):
    """What the gateway's model resolver reads the registry through."""

    def state(self) -> RegistryState: ...


class PollingRegistryWatcher:
    def __init__(self, registry: Registry, *, interval: float = 0.5) -> None:
        self.registry = registry
        self.interval = interval
        self._state = RegistryState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.refreshes = 0

    def refresh(self) -> None:
        """Read the registry once; keep the last good state when that fails."""
        try:
            state = self.registry.read()
        except (LoraplaneError, OSError, ValueError) as exc:
            if not self._failing:
                log.warning(
                    "cannot read the registry; keeping the last good state",
                    extra={"error": str(exc).splitlines()[0]},
                )
            self._failing = True
            return
        if self._failing:
            log.warning("the registry can be read again")
        self._failing = False
        with self._lock:
            self._state = state
            self.refreshes += 1

    def state(self) -> RegistryState:
        with self._lock:
            return self._state

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="registry-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.refresh()
            next_at = time.monotonic() + self.interval

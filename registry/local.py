"""The embedded registry backend: one JSON file under the state directory, behind a file lock.

Every change happens in a :meth:`LocalRegistry.transaction`: the file is locked, read, changed in memory
and written back atomically (temp file + fsync + rename) only if the whole change succeeded. A failed
command, a crash or Ctrl-C leaves the previous file untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from loraplane.common.errors import LoraplaneError
from loraplane.common.files import atomic_write_text
from loraplane.registry.model import RegistryState


class LocalRegistry:
    """The embedded registry backend: ``<state_dir>/registry.json`` guarded by a file lock."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "registry.json"
        self._lock = FileLock(str(self.state_dir / "registry.lock"), timeout=30)

    def read(self) -> RegistryState:
        if not self.path.exists():
            return RegistryState()
        try:
            return RegistryState.model_validate_json(self.path.read_bytes())
        except ValidationError as exc:
            raise LoraplaneError(
                f"{self.path}: the registry file is corrupt ({exc.error_count()} errors)",
                hint="restore it from a backup; loraplane never writes a partial file",
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[RegistryState]:
        """Lock, read, yield the state for changing; write it back only if the block succeeds."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            state = self.read()
            yield state
            atomic_write_text(self.path, state.model_dump_json(indent=2) + "\n")

"""What a starting vLLM server must serve: every registered version that is still servable.

``python -m loraplane.serving --registry-home DIR`` (or ``--registry kubernetes``) passes these as
``--lora-modules``, so a restarted pod serves the same adapters before it reports ready, without
anyone re-running ``adapters load``. A version that fails its checks now (files gone or changed since
registration, moved out of the adapters root, a rank above the server's limit) is left out and named
in the log: one bad adapter must not keep the server from starting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.common.errors import LoraplaneError
from loraplane.platform.registry import open_registry, verify_weights
from loraplane.platform.settings import Settings
from loraplane.serving.launcher import LoraModule
from loraplane.serving.preflight import preflight_adapter

log = logging.getLogger("loraplane.serving")


@dataclass
class Rehydration:
    modules: list[LoraModule] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # served name -> why


def registered_modules(settings: Settings, *, max_lora_rank: int) -> Rehydration:
    """Every non-retired version in the registry that passes the load checks, oldest first."""
    result = Rehydration()
    state = open_registry(settings).read()
    for adapter in sorted(state.adapters.values(), key=lambda a: a.name):
        for entry in sorted(adapter.versions.values(), key=lambda v: int(v.version[1:])):
            if entry.state == "retired":
                continue
            try:
                verify_weights(entry)
                preflight_adapter(
                    Path(entry.path), adapters_root=settings.adapters_dir, max_lora_rank=max_lora_rank
                )
            except LoraplaneError as exc:
                result.skipped[entry.served_name] = exc.message
                log.warning(
                    "not serving a registered adapter", extra={"adapter": entry.ref, "why": exc.message}
                )
                continue
            result.modules.append(LoraModule(name=entry.served_name, path=Path(entry.path)))
    return result

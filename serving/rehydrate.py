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
from loraplane.serving.base_model import BaseModelFacts
from loraplane.serving.launcher import LoraModule
from loraplane.serving.preflight import preflight_adapter
from loraplane.serving.reconcile import servable_versions

log = logging.getLogger("loraplane.serving")


@dataclass
class Rehydration:
    modules: list[LoraModule] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # served name -> why


def registered_modules(
    settings: Settings, *, max_lora_rank: int, base: BaseModelFacts | None = None
) -> Rehydration:
    """Every servable version in the registry (``reconcile.servable_versions``: not retired, not
    unloaded) that passes the load checks (against ``base``, the model being served), oldest first."""
    result = Rehydration()
    for entry in servable_versions(open_registry(settings).read()):
        try:
            verify_weights(entry)
            preflight_adapter(
                Path(entry.path), adapters_root=settings.adapters_dir, max_lora_rank=max_lora_rank, base=base
            )
        except LoraplaneError as exc:
            result.skipped[entry.served_name] = exc.message
            log.warning("not serving a registered adapter", extra={"adapter": entry.ref, "why": exc.message})
            continue
        result.modules.append(LoraModule(name=entry.served_name, path=Path(entry.path)))
    return result

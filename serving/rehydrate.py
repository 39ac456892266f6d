"""What a starting vLLM server must serve: every registered version that is still servable.

Runtime loading (the default): ``python -m loraplane.serving --registry-home DIR`` (or ``--registry
kubernetes``) starts vLLM with *no* adapter, then loads each servable version through vLLM's own
admin route, one at a time (:func:`rehydrate_at_runtime`). A version that fails, whether our checks
refuse it (files gone or changed since registration, moved out of the adapters root, a rank above
this server's limit, another base) or vLLM does, is skipped, logged by name with the reason and
recorded in the registry as a load failure (``adapters show``); the server and the other adapters
are never affected. Handing every adapter to vLLM's ``--lora-modules`` instead makes vLLM load them
while it starts, where one bad file stops the whole server (and every replica restarting with it).

Without runtime loading (``--no-runtime-lora-updating``) the adapters can only be given at start:
:func:`registered_modules` then reads every weight file completely first (as registration does), so
a damaged file is left out before vLLM sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.common.adapter_dir import WEIGHTS_FILE
from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.registry.backends import open_registry
from loraplane.registry.model import AdapterVersion, mark_load_failed, verify_weights
from loraplane.serving.adapter_weights import verify_adapter_weights
from loraplane.serving.base_model import BaseModelFacts
from loraplane.serving.capacity import require_room
from loraplane.serving.client import VLLMAdminClient
from loraplane.serving.launcher import LoraModule
from loraplane.serving.output_probe import require_effect
from loraplane.serving.preflight import preflight_adapter
from loraplane.serving.reconcile import check_servable, servable_versions

log = logging.getLogger("loraplane.serving")


@dataclass
class Rehydration:
    modules: list[LoraModule] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)  # served names loaded at runtime
    skipped: dict[str, str] = field(default_factory=dict)  # served name -> why


def _skip(result: Rehydration, entry: AdapterVersion, why: str) -> None:
    result.skipped[entry.served_name] = why
    log.warning(f"not serving {entry.ref}: {why}", extra={"adapter": entry.ref, "why": why})


def registered_modules(
    settings: Settings, *, max_lora_rank: int, base: BaseModelFacts | None = None, capacity: int | None = None
) -> Rehydration:
    """Every servable version in the registry (``reconcile.servable_versions``: not retired, not
    unloaded) whose files are sound (read completely) and that passes the load checks (against
    ``base``, the model being served), oldest first, at most ``capacity``: for ``--lora-modules``."""
    result = Rehydration()
    for entry in servable_versions(open_registry(settings).read()):
        try:
            require_room([m.name for m in result.modules], entry.served_name, capacity, server="this server")
            verify_weights(entry)
            info = preflight_adapter(
                Path(entry.path), adapters_root=settings.adapters_dir, max_lora_rank=max_lora_rank, base=base
            )
            verify_adapter_weights(info.path / WEIGHTS_FILE, info.config)
        except LoraplaneError as exc:
            _skip(result, entry, exc.message)
            continue
        result.modules.append(LoraModule(name=entry.served_name, path=Path(entry.path)))
    return result


async def rehydrate_at_runtime(
    settings: Settings,
    url: str,
    *,
    base: BaseModelFacts | None,
    server: str,
    capacity: int | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Rehydration:
    """Load every servable version on the running server at ``url``, one at a time; a version that
    fails is skipped and recorded (``server`` names this server in the record), as is every version
    beyond ``capacity`` (``serving/capacity.py``). ``stop`` is asked between versions: when it says
    so, the rest are not tried."""
    result = Rehydration()
    wanted = servable_versions(open_registry(settings).read())
    async with VLLMAdminClient(url, api_key=settings.api_key) as client:
        for entry in wanted:
            if stop():
                break
            try:
                check_servable(settings, entry, base)
                require_room(result.loaded, entry.served_name, capacity, server=server)
                await client.load_adapter(entry.served_name, entry.path)
                await require_effect(client, entry.served_name)  # else unloaded again, and skipped
            except LoraplaneError as exc:
                _skip(result, entry, exc.message)
                continue
            result.loaded.append(entry.served_name)
    _record(settings, wanted, result, server)
    return result


def _record(settings: Settings, wanted: list[AdapterVersion], result: Rehydration, server: str) -> None:
    """Write what failed (and clear failures that loaded now) into the registry; best effort: a
    registry this server may not write (a read-only service account) is only logged."""
    changes = [
        e
        for e in wanted
        if (
            e.served_name in result.skipped
            and (e.failure is None or e.failure.reason != result.skipped[e.served_name])
        )
        or (e.served_name in result.loaded and e.failure is not None)
    ]
    if not changes:
        return
    try:
        with open_registry(settings).transaction() as state:
            for entry in changes:
                adapter = state.adapters.get(entry.name)
                current = adapter.versions.get(entry.version) if adapter else None
                if current is None:
                    continue
                if entry.served_name in result.skipped:
                    mark_load_failed(state, current, result.skipped[entry.served_name], server)
                else:
                    current.failure = None
    except LoraplaneError as exc:
        log.warning(
            "could not record the adapters' load results in the registry",
            extra={"why": exc.message, "failed": sorted(result.skipped)},
        )

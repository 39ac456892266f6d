"""``sync``: make what vLLM replicas serve match what the registry says should be served.

For each replica: every servable version that is not served is loaded (after the same checks as
``adapters load``: weights unchanged since registration, preflight against the replica's base
model; after the load, the output probe: one that changes nothing is unloaded again and fails);
every served adapter that is not a servable version (retired, unloaded, unknown to the
registry) is unloaded; the base model is never touched. Replicas are synced concurrently and each
gets its own report; one unreachable replica does not stop the others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplane.common.adapter_dir import WEIGHTS_FILE
from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.registry.backends import open_registry
from loraplane.registry.model import AdapterVersion, RegistryState, mark_serving, verify_weights
from loraplane.serving.adapter_weights import verify_adapter_weights
from loraplane.serving.base_model import BaseModelFacts, load_base_model
from loraplane.serving.capacity import require_room
from loraplane.serving.client import ModelCard, VLLMAdminClient
from loraplane.serving.limits import adapter_capacity, max_lora_rank
from loraplane.serving.output_probe import require_effect
from loraplane.serving.preflight import preflight_adapter

log = logging.getLogger("loraplane.serving")


def servable_versions(state: RegistryState) -> list[AdapterVersion]:
    """The versions replicas should serve: not retired, and not stopped with ``adapters unload``
    since they were last loaded. Ordered by adapter name, then version number."""
    last_action: dict[tuple[str, str | None], str] = {}
    for event in state.history:
        if event.action in ("load", "unload", "register"):
            last_action[(event.adapter, event.version)] = event.action
    out = []
    for adapter in sorted(state.adapters.values(), key=lambda a: a.name):
        for entry in sorted(adapter.versions.values(), key=lambda v: int(v.version[1:])):
            if entry.state == "retired":
                continue
            if entry.state == "registered" and last_action.get((entry.name, entry.version)) == "unload":
                continue
            out.append(entry)
    return out


_base_cache: dict[str, BaseModelFacts | None] = {}


def served_base(cards: list[ModelCard]) -> BaseModelFacts | None:
    """The base model a replica serves, read here from its ``--model`` (the base card's ``root``);
    None when that path or hub id cannot be read on this machine (then the base checks are skipped)."""
    bases = [c for c in cards if not c.is_adapter]
    if not bases or not bases[0].root:
        return None
    root = bases[0].root
    if root not in _base_cache:
        _base_cache[root] = load_base_model(root, served_names=tuple(c.id for c in bases))
        if _base_cache[root] is None:
            log.info("cannot read the served base model here; base checks skipped", extra={"base": root})
    return _base_cache[root]


def check_servable(
    settings: Settings,
    entry: AdapterVersion,
    base: BaseModelFacts | None,
    *,
    url: str | None = None,
    rank_limit: int | None = None,
) -> None:
    """Everything a version must pass before a server (``url``, default ``settings.server_url``) is
    asked to load it: its weights unchanged since registration and sound to the last byte (a file
    vLLM cannot read must never reach it), the preflight against that server's rank limit (``rank_limit``
    when the caller knows it, as the server's own reconciler does) and base."""
    rank = rank_limit if rank_limit is not None else max_lora_rank(settings, url)
    check_files(entry, adapters_root=settings.adapters_dir, max_lora_rank=rank, base=base)


def check_files(
    entry: AdapterVersion, *, adapters_root: Path, max_lora_rank: int, base: BaseModelFacts | None
) -> None:
    """:func:`check_servable`'s checks, where the files are: here, or in a vLLM pod that mounts the
    shared volume (``python -m loraplane.serving.check_adapter``, run by the CLI from outside the cluster)."""
    verify_weights(entry)
    info = preflight_adapter(
        Path(entry.path), adapters_root=adapters_root, max_lora_rank=max_lora_rank, base=base
    )
    verify_adapter_weights(info.path / WEIGHTS_FILE, info.config)


@dataclass
class ReplicaReport:
    url: str
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # servable but failing its checks: why
    failed: dict[str, str] = field(default_factory=dict)  # the server refused the load/unload: why
    error: str | None = None  # the replica could not be synced at all

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed and not self.skipped

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.unloaded)


@dataclass
class SyncReport:
    replicas: list[ReplicaReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.replicas)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "replicas": [{**asdict(r), "ok": r.ok} for r in self.replicas]}


async def sync_replica(
    settings: Settings,
    url: str,
    wanted: list[AdapterVersion],
    *,
    registered: set[str] | None = None,
    prune_unknown: bool = True,
    dry_run: bool = False,
    rank_limit: int | None = None,
    capacity: int | None = None,
) -> ReplicaReport:
    """Unload adapters that are not wanted, then load what ``url`` lacks of ``wanted`` (in that
    order, so that the room the unloads free is there for the loads). ``prune_unknown`` False keeps
    adapters that are not in ``registered`` (the served names the registry knows: another registry
    may share the server). ``rank_limit``: the server's ``--max-lora-rank``, ``capacity``: how many
    adapters it holds at most (``serving/capacity.py``), when known; a version beyond it fails."""
    report = ReplicaReport(url=url)
    registered = registered or {e.served_name for e in wanted}
    try:
        async with VLLMAdminClient(url, api_key=settings.api_key) as client:
            cards = await client.list_models()
            served = {c.id: c.root for c in cards if c.is_adapter}
            base = served_base(cards)
            base_name = next((c.id for c in cards if not c.is_adapter), None)
            wanted_names = {e.served_name for e in wanted}
            holding = set(served)
            for name in sorted(served):
                if name in wanted_names:
                    continue
                if not prune_unknown and name not in registered:
                    continue
                try:
                    if not dry_run:
                        await client.unload_adapter(name)
                    report.unloaded.append(name)
                    holding.discard(name)
                except LoraplaneError as exc:
                    report.failed[name] = exc.message
            for entry in wanted:
                name = entry.served_name
                if name in served:
                    report.unchanged.append(name)
                    continue
                try:
                    check_servable(settings, entry, base, url=url, rank_limit=rank_limit)
                except LoraplaneError as exc:
                    report.skipped[name] = exc.message
                    continue
                try:
                    require_room(holding, name, capacity, server=url)
                    if not dry_run:
                        await client.load_adapter(name, entry.path)
                        holding.add(name)
                        # one that changes nothing is unloaded again and fails (serving/output_probe.py)
                        await require_effect(client, name, base=base_name)
                    report.loaded.append(name)
                except LoraplaneError as exc:
                    report.failed[name] = exc.message
                    holding.discard(name)  # never loaded, or unloaded again by the probe
    except LoraplaneError as exc:
        report.error = exc.message
    return report


async def sync_replicas(
    settings: Settings, urls: list[str], *, prune_unknown: bool = True, dry_run: bool = False
) -> SyncReport:
    """Sync every replica in ``urls`` with the registry (read once), concurrently. A version that
    every replica now serves is recorded as ``serving``, as ``adapters load`` records it."""
    registry = open_registry(settings)
    state = registry.read()
    wanted = servable_versions(state)
    registered = {v.served_name for a in state.adapters.values() for v in a.versions.values()}
    reports = await asyncio.gather(
        *(
            sync_replica(
                settings,
                u,
                wanted,
                registered=registered,
                prune_unknown=prune_unknown,
                dry_run=dry_run,
                capacity=adapter_capacity(settings, u),
            )
            for u in urls
        )
    )
    if not dry_run and reports and all(r.error is None for r in reports):
        on_every = set.intersection(*({*r.loaded, *r.unchanged} for r in reports))
        newly = [e for e in wanted if e.state == "registered" and e.served_name in on_every]
        if newly:
            with registry.transaction() as current:
                for entry in newly:
                    adapter = current.adapters.get(entry.name)
                    latest = adapter.versions.get(entry.version) if adapter else None
                    if latest is not None and latest.state == "registered":
                        mark_serving(current, latest)
    return SyncReport(replicas=list(reports))

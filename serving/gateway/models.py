"""Which model a request names: registry aliases and versions, or a base model the server serves.

:class:`RegistryWatcher` keeps the registry in memory and re-reads ``registry.json`` when its stat
signature (inode, size, mtime, ctime) changes. The gateway checks on every request (a ``stat`` costs
microseconds; ``check_interval`` can throttle it), so a request that starts after an alias moved goes
to the new version, without a restart: nothing sends traffic to a version an operator just moved away
from and may be about to unload. The registry is written by atomic rename; should a read fail anyway
(a corrupt or unreadable file), the last good state stays in use and the failure is logged once per
file version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from loraplane.common.errors import LoraplaneError
from loraplane.registry.local import LocalRegistry
from loraplane.registry.model import REF_PATTERN, Adapter, AdapterVersion, RegistryState
from loraplane.serving.gateway.canary import CanaryRule, takes_canary
from loraplane.serving.gateway.errors import ModelNotFoundError, UpstreamFailedError, transport_error
from loraplane.serving.gateway.registry_poll import StateSource

log = logging.getLogger("loraplane.serving.gateway")

Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns
MISSING: Signature = (0, -1, 0, 0)
# A file modified this recently may be replaced again within the filesystem's timestamp granularity by
# one with the same signature (same size, a reused inode): its signature is not trusted yet, so the
# next check reads it again ("racy git" has the same problem and the same answer).
RACY_NS = 100_000_000


class RegistryWatcher:
    def __init__(
        self, home: Path, *, check_interval: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = LocalRegistry(home)
        self.check_interval = check_interval
        self._clock = clock
        self._state = RegistryState()
        self._signature: Signature | None = None  # of the file self._state came from; None: read again
        self._failed: Signature | None = None  # of a file that could not be read
        self._warned: Signature | None = None  # the read failure last logged
        self._logged: Signature | None = None
        self._checked_at: float | None = None

    def _stat(self) -> Signature:
        try:
            st = os.stat(self.registry.path)
        except FileNotFoundError:
            return MISSING
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @staticmethod
    def _trusted(signature: Signature) -> Signature | None:
        racy = signature != MISSING and time.time_ns() - signature[2] < RACY_NS
        return None if racy else signature

    def state(self) -> RegistryState:
        """The registry as of this call (or ``check_interval`` ago); the last good one on read errors."""
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self.check_interval:
            return self._state
        self._checked_at = now
        try:
            signature = self._stat()
        except OSError as exc:
            log.warning("cannot stat the registry; keeping the last good state", extra={"error": str(exc)})
            return self._state
        if signature in (self._signature, self._failed):
            return self._state
        try:
            state = self.registry.read()
        except (LoraplaneError, OSError, ValueError) as exc:
            if signature != self._warned:
                self._warned = signature
                log.warning(
                    "cannot read the registry; keeping the last good state",
                    extra={"path": str(self.registry.path), "error": str(exc).splitlines()[0]},
                )
            self._failed = self._trusted(signature)
            return self._state
        self._state, self._signature, self._failed = state, self._trusted(signature), None
        if signature != self._logged:
            self._logged = signature
            log.info(
                "registry read", extra={"path": str(self.registry.path), "adapters": len(state.adapters)}
            )
        return state


class UpstreamModels:
    """The model cards the upstream's ``GET /v1/models`` lists, cached; base models have no ``parent``."""

    def __init__(
        self,
        client: Callable[[], httpx.AsyncClient],
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.timeout = timeout
        self._clock = clock
        self._cards: list[dict[str, Any]] | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def cards(self, max_age: float) -> list[dict[str, Any]]:
        """Cards no older than ``max_age`` seconds; on a failed fetch, the last ones if any, else raise."""
        async with self._lock:
            if self._cards is not None and self._clock() - self._fetched_at <= max_age:
                return self._cards
            try:
                response = await self._client().get("/v1/models", timeout=self.timeout)
                response.raise_for_status()
                cards = [c for c in response.json().get("data", []) if isinstance(c.get("id"), str)]
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                log.warning(
                    "cannot list the upstream's models", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
                if self._cards is not None:
                    return self._cards
                if isinstance(exc, httpx.TransportError):
                    raise transport_error(exc, "GET /v1/models") from None
                raise UpstreamFailedError("the model server's GET /v1/models failed") from None
            self._cards, self._fetched_at = cards, self._clock()
            return cards

    async def base_models(self, max_age: float) -> list[dict[str, Any]]:
        return [c for c in await self.cards(max_age) if c.get("parent") is None]


@dataclass(frozen=True)
class Target:
    requested: str  # what the client sent in `model`
    served: str  # what vLLM serves it under
    version: AdapterVersion | None  # None for a base model


class ModelResolver:
    """``name`` / ``name:alias`` / ``name@vN`` through the registry, else a base model of the upstream."""

    def __init__(
        self,
        registry: StateSource,
        upstream: UpstreamModels,
        *,
        cache_s: float = 30.0,
        canaries: Mapping[str, CanaryRule] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.cache_s = cache_s
        self.canaries = dict(canaries or {})
        self._weights: dict[str, CanaryRule] = {}  # the registry's weights, as rules
        self._rng = rng or random.Random()

    def _rule(self, adapter: Adapter) -> CanaryRule | None:
        """The adapter's canary: the weight kept in the registry (``adapters canary``, live) wins over
        the gateway's own rule (``--canary``, ``gateway.canary``); a weight of 0 means none."""
        weight = adapter.canary
        if weight is None:
            return self.canaries.get(adapter.name)
        if weight.percent <= 0:
            return None
        cached = self._weights.get(adapter.name)
        if cached is None or (cached.alias, cached.percent) != (weight.alias, weight.percent):
            cached = self._weights[adapter.name] = CanaryRule(alias=weight.alias, percent=weight.percent)
        return cached

    async def resolve(self, model: str, *, user: str | None = None) -> Target:
        state = self.registry.state()
        match = REF_PATTERN.match(model)
        if match and match["name"] in state.adapters:
            try:
                version = state.resolve(model)
            except LoraplaneError as exc:
                raise ModelNotFoundError(f"The model `{model}` does not exist: {exc.message}") from None
            if version.state == "retired":
                raise ModelNotFoundError(f"The model `{model}` does not exist: {version.ref} is retired")
            adapter = state.adapters[match["name"]]
            rule = self._rule(adapter)
            via_prod = not match["version"] and match["alias"] in (None, "prod") and "prod" in adapter.aliases
            if rule and via_prod and rule.alias in adapter.aliases:
                canary = adapter.versions.get(adapter.aliases[rule.alias])
                if canary and canary.state != "retired" and takes_canary(rule, adapter.name, user, self._rng):
                    return Target(model, canary.served_name, canary)
            return Target(model, version.served_name, version)
        # A miss refreshes the cached list (at most once a second): a base model may just have appeared.
        for max_age in (self.cache_s, 1.0):
            if any(c["id"] == model for c in await self.upstream.base_models(max_age)):
                return Target(model, model, None)
        raise ModelNotFoundError(f"The model `{model}` does not exist.")

    async def listing(self) -> dict[str, Any]:
        """``GET /v1/models``: base models, then per adapter its versions, aliases and bare name.

        Only what the model server serves right now is listed: a version (or a name pointing at one)
        whose served name is not among the upstream's models (registered but not loaded, refused by
        the server, retired) is left out, so every listed id answers. The upstream's list is cached
        for 5 s; when the registry has a version the cached list lacks (it may just have been
        loaded), the list is fetched again, at most once a second. Raises :class:`GatewayError` when
        the upstream cannot be asked and nothing is cached: what is servable is then unknown.

        ``parent`` is what a name points at (an alias: the version's served name; a version: the base
        model) and ``root`` the base model, so a client can tell what ``support-bot:prod`` serves.
        """
        state = self.registry.state()
        versions = [v for a in state.adapters.values() for v in a.versions.values()]
        wanted = {v.served_name for v in versions if v.state != "retired"}
        cards = await self.upstream.cards(max_age=5.0)
        if not wanted <= {c["id"] for c in cards}:
            cards = await self.upstream.cards(max_age=1.0)
        served = {c["id"] for c in cards}
        bases = [c for c in cards if c.get("parent") is None]
        parents = {c["id"]: c["parent"] for c in cards if c.get("parent") is not None}
        only_base = bases[0]["id"] if len(bases) == 1 else None
        data: list[dict[str, Any]] = [
            {**_card(c["id"], c.get("created"), c["id"], None), "max_model_len": c.get("max_model_len")}
            for c in bases
        ]
        for name in sorted(state.adapters):
            adapter = state.adapters[name]
            live = sorted(
                (v for v in adapter.versions.values() if v.state != "retired" and v.served_name in served),
                key=lambda v: int(v.version[1:]),
            )
            for v in live:
                base = parents.get(v.served_name, only_base)
                data.append(_card(v.served_name, _epoch(v.registered_at), base, base))
            pointers = [f"{name}:{alias}" for alias in sorted(adapter.aliases)] + [name]
            for ref in pointers:
                try:
                    target = state.resolve(ref)
                except LoraplaneError:
                    continue
                if target.state != "retired" and target.served_name in served:
                    base = parents.get(target.served_name, only_base)
                    data.append(_card(ref, _epoch(target.registered_at), base, target.served_name))
        return {"object": "list", "data": data}

    async def card(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the card :meth:`listing` has for ``model_id``, else 404."""
        for card in (await self.listing())["data"]:
            if card["id"] == model_id:
                return dict(card)
        raise ModelNotFoundError(
            f"The model `{model_id}` does not exist or is not served now (GET /v1/models lists what is)."
        )


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def _card(model_id: str, created: object, root: str | None, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created if isinstance(created, int) else 0,
        "owned_by": "loraplane",
        "root": root,
        "parent": parent,
    }

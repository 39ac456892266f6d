"""The adapter registry: adapters, their immutable versions, aliases, and an append-only history.

This module is the data model and the pure state changes; the backends that store it are
``registry/local.py`` (one JSON file) and ``registry/kubernetes.py`` (LoraAdapter custom resources),
chosen by ``registry/backends.py``.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, Field, model_validator

from loraplane.common.errors import ExitCode, InvalidInputError, LoraplaneError
from loraplane.common.files import sha256_file
from loraplane.registry.version_states import Command, VersionState, transition

if TYPE_CHECKING:
    pass

T = TypeVar("T")
REF_PATTERN = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9-]*)(?:@(?P<version>v[0-9]+)|:(?P<alias>[a-z0-9][a-z0-9-]*))?$"
)


class GateCheck(BaseModel):
    """One rule of a promotion gate and its outcome (computed by ``evals/gates.py``)."""

    rule: str
    dataset: str
    metric: str
    threshold: float
    observed: float | None
    reference: float | None = Field(default=None, description="The prod or base figure compared with.")
    passed: bool | None = Field(description="None: skipped (nothing to compare with).")
    message: str


class RegistryError(LoraplaneError):
    """The registry cannot do what was asked (unknown adapter, duplicate version, ...)."""

    exit_code = ExitCode.BAD_INPUT


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class EvalRecord(BaseModel):
    """A complete suite run of a version against the current prod and the base model, and its verdict.

    The summary lives here; the full report (every example, JSON + Markdown + PNG) is at
    ``report_path``. Partial runs are never recorded.
    """

    suite: str
    suite_path: str | None = None
    suite_sha256: str | None = None
    endpoint: str
    created_at: str = Field(default_factory=now)
    candidate_model: str
    models: dict[str, str] = Field(description="role (candidate, prod, base) -> model name sent.")
    scores: dict[str, dict[str, dict[str, float | None]]] = Field(
        description="dataset -> role -> figure -> value."
    )
    checks: list[GateCheck] = Field(default_factory=list)
    passed: bool
    report_path: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_first_release(cls, data: Any) -> Any:
        """Registries written by loraplane 0.1.0 stored one dataset and one metric per record."""
        if isinstance(data, dict) and "suite" not in data and "dataset" in data:
            name = Path(str(data["dataset"])).stem
            metric = data.get("metric", "exact_match")
            cand, base = data["candidate"].get(metric, 0.0), data["baseline"].get(metric, 0.0)
            data = {
                "suite": name,
                "suite_path": None,
                "endpoint": data["endpoint"],
                "created_at": data.get("created_at", now()),
                "candidate_model": data["candidate_model"],
                "models": {"candidate": data["candidate_model"], "base": data["baseline_model"]},
                "scores": {name: {"candidate": data["candidate"], "base": data["baseline"]}},
                "checks": [],
                "passed": data["passed"],
                "report_path": data.get("report_path"),
            }
            data["checks"] = [
                {
                    "rule": "beat_base",
                    "dataset": name,
                    "metric": metric,
                    "threshold": 0.0,
                    "observed": data["scores"][name]["candidate"].get(metric),
                    "reference": data["scores"][name]["base"].get(metric),
                    "passed": data["passed"],
                    "message": (
                        f"{metric} on {name}: candidate {cand:.3f} vs base {base:.3f} "
                        "(loraplane 0.1.0 gate: candidate above base)"
                    ),
                }
            ]
        return data

    def figure(self, dataset: str, role: str, metric: str) -> float | None:
        return self.scores.get(dataset, {}).get(role, {}).get(metric)

    def first(self, metric: str = "exact_match", role: str = "candidate") -> float | None:
        """``metric`` for ``role`` on the suite's first dataset (what one-dataset tables show)."""
        dataset = next(iter(self.scores), None)
        return self.figure(dataset, role, metric) if dataset else None

    def failed_checks(self) -> list[GateCheck]:
        return [c for c in self.checks if c.passed is False]

    def summary(self) -> str:
        """One line for tables: the verdict, and the first failed check if any."""
        failed = self.failed_checks()
        if not failed:
            return f"pass ({len(self.checks)} checks, suite {self.suite})"
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        return f"FAIL: {failed[0].message}{more}"


class LoadFailure(BaseModel):
    """Why a server could not load a version (set when a server fails it; a later load clears it).

    It does not change what replicas should serve: one server's failure (a file it cannot read, a
    transient error) must not unload the version from servers that serve it fine.
    """

    reason: str
    at: str = Field(default_factory=now)
    server: str | None = Field(default=None, description="The server (URL or pod) that failed it.")


class AdapterVersion(BaseModel):
    name: str
    version: str
    served_name: str = Field(description="Immutable name the server uses: <name>@<version>.")
    path: str
    weights_sha256: str
    base_model: str | None = None
    manifest: dict[str, Any] = Field(default_factory=dict)
    state: VersionState = "registered"
    registered_at: str = Field(default_factory=now)
    evals: list[EvalRecord] = Field(default_factory=list)
    failure: LoadFailure | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def latest_eval(self) -> EvalRecord | None:
        return self.evals[-1] if self.evals else None


class CanaryWeight(BaseModel):
    """A weighted canary kept with the adapter (``loraplane adapters canary``): ``percent`` of the
    requests for ``NAME`` and ``NAME:prod`` go to the version ``NAME:<alias>`` points at. The gateway
    reads it from the registry as it changes (no restart), and it overrides the gateway's own rule
    for this adapter (``--canary`` / the chart's ``gateway.canary``); 0 sends nothing there."""

    alias: str = Field(default="canary", pattern=r"^[a-z0-9][a-z0-9-]*$")
    percent: float = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _not_prod(self) -> CanaryWeight:
        if self.alias == "prod":
            raise ValueError("the canary alias cannot be prod (prod is what the rest of the traffic gets)")
        return self


class Adapter(BaseModel):
    name: str
    versions: dict[str, AdapterVersion] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> version")
    canary: CanaryWeight | None = Field(default=None, description="A weighted canary set in the registry.")


class HistoryEvent(BaseModel):
    at: str = Field(default_factory=now)
    who: str = Field(default_factory=lambda: getpass.getuser())
    action: Literal[
        "register", "load", "load-failed", "unload", "eval", "promote", "rollback", "retire", "canary"
    ]
    adapter: str
    version: str | None = None
    alias: str | None = None
    previous: str | None = None
    reason: str | None = None
    forced: bool = False


class RegistryState(BaseModel):
    schema_version: Literal[1] = 1
    adapters: dict[str, Adapter] = Field(default_factory=dict)
    history: list[HistoryEvent] = Field(default_factory=list)

    def adapter(self, name: str) -> Adapter:
        try:
            return self.adapters[name]
        except KeyError:
            known = ", ".join(sorted(self.adapters)) or "none registered yet"
            raise RegistryError(
                f"unknown adapter {name!r} (known: {known})",
                hint="register it first: loraplane adapters register PATH",
            ) from None

    def resolve(self, ref: str) -> AdapterVersion:
        """``name@v3`` (exact), ``name:prod`` (alias), or ``name`` (its ``prod`` alias, else newest)."""
        match = REF_PATTERN.match(ref)
        if not match:
            raise InvalidInputError(
                f"{ref!r} is not an adapter reference",
                hint="use NAME@VERSION (support-bot@v3) or NAME:ALIAS (support-bot:prod)",
            )
        adapter = self.adapter(match["name"])
        if match["version"]:
            version = match["version"]
        elif match["alias"]:
            if match["alias"] not in adapter.aliases:
                raise RegistryError(
                    f"adapter {adapter.name!r} has no alias {match['alias']!r} "
                    f"(aliases: {', '.join(sorted(adapter.aliases)) or 'none'})"
                )
            version = adapter.aliases[match["alias"]]
        elif "prod" in adapter.aliases:
            version = adapter.aliases["prod"]
        else:
            live = [v for v in adapter.versions.values() if v.state != "retired"]
            if not live:
                raise RegistryError(f"adapter {adapter.name!r} has no version that is not retired")
            version = max(live, key=lambda v: int(v.version[1:])).version
        if version not in adapter.versions:
            raise RegistryError(
                f"adapter {adapter.name!r} has no version {version!r} "
                f"(versions: {', '.join(sorted(adapter.versions)) or 'none'})"
            )
        return adapter.versions[version]


class IntegrityError(LoraplaneError):
    """An adapter's files changed after it was registered."""

    exit_code = ExitCode.REFUSED


def verify_weights(entry: AdapterVersion) -> None:
    """Refuse a version whose weights file is gone or differs from the sha256 recorded at registration."""
    weights = Path(entry.path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise IntegrityError(
            f"{entry.ref}: {weights} is gone",
            hint="the adapter's files must stay in place while it is registered",
        )
    if sha256_file(weights) != entry.weights_sha256:
        raise IntegrityError(
            f"{entry.ref}: {weights} changed since registration (sha256 mismatch)",
            hint="published adapters are immutable: register the new weights as a new version",
        )


def aliases_of(state: RegistryState, entry: AdapterVersion) -> list[str]:
    """The ``NAME:ALIAS`` names that point at ``entry``."""
    adapter = state.adapter(entry.name)
    return sorted(f"{entry.name}:{a}" for a, v in adapter.aliases.items() if v == entry.version)


def mark_serving(state: RegistryState, entry: AdapterVersion, command: Command = "load") -> None:
    """Record that every server now serves ``entry`` (state ``serving``, one ``load`` event).

    ``command`` is what loaded it (``load``, ``sync``, ``promote``, ``rollback``); a retired version
    is refused (:class:`~loraplane.registry.version_states.RetiredError`).
    """
    step = transition(command, entry.state, ref=entry.ref, path=entry.path)
    entry.failure = None
    if step.after != entry.state:
        entry.state = step.after
        state.history.append(HistoryEvent(action="load", adapter=entry.name, version=entry.version))


def record_stop(
    state: RegistryState, ref: str, *, retire: bool, servable: bool
) -> tuple[AdapterVersion, bool]:
    """Record ``unload`` (stopped: not served again until a load) or ``retire`` of ``ref``.

    ``servable``: whether replicas should serve it before this command. Returns the version and
    whether anything was recorded (False: it was already stopped, or already retired). Refused while
    an alias points at it, and for an ``unload`` of a retired version.
    """
    entry = state.resolve(ref)
    command: Command = "retire" if retire else "unload"
    step = transition(
        command,
        entry.state,
        ref=entry.ref,
        aliases=aliases_of(state, entry),
        servable=servable,
        path=entry.path,
    )
    if step.noop:
        return entry, False
    entry.state = step.after
    state.history.append(HistoryEvent(action=command, adapter=entry.name, version=entry.version))
    return entry, True


def record_eval(state: RegistryState, ref: str, record: EvalRecord) -> AdapterVersion:
    """Keep ``record`` with the version (refused for a retired one: nothing is recorded)."""
    entry = state.resolve(ref)
    transition("eval", entry.state, ref=entry.ref, path=entry.path)
    entry.evals.append(record)
    state.history.append(HistoryEvent(action="eval", adapter=entry.name, version=entry.version))
    return entry


def rehearse(state: RegistryState, change: Callable[[RegistryState], T]) -> T:
    """Run ``change`` on a copy of ``state``: every refusal it would raise, before a server is asked.

    Commands rehearse the very change they later make in the registry transaction, so that the
    checks before the servers are asked and the checks at commit time are the same code.
    """
    return change(state.model_copy(deep=True))


def mark_load_failed(state: RegistryState, entry: AdapterVersion, reason: str, server: str | None) -> None:
    """Record that ``server`` could not load ``entry`` and why (one ``load-failed`` event)."""
    entry.failure = LoadFailure(reason=reason, server=server)
    state.history.append(
        HistoryEvent(action="load-failed", adapter=entry.name, version=entry.version, reason=reason)
    )


class ConflictError(RegistryError):
    """Another command changed what this one decided on (an alias moved meanwhile): nothing changed."""

    exit_code = ExitCode.CONFLICT


class AliasUnchangedError(RegistryError):
    """A promotion or rollback that would point an alias at the version it already points at."""


def move_alias(
    state: RegistryState,
    name: str,
    alias: str,
    version: str,
    *,
    expected: str | None,
    action: Literal["promote", "rollback"],
    reason: str | None = None,
    forced: bool = False,
) -> str | None:
    """Point ``name:alias`` at ``version`` if it still points at ``expected``; return the old target.

    ``expected`` is what the caller saw when it decided (before its checks and server loads): when
    another promotion or rollback moved the alias meanwhile, this one raises ConflictError instead of
    silently overwriting it, so of two concurrent promotions exactly one wins.
    """
    adapter = state.adapter(name)
    current = adapter.aliases.get(alias)
    if current != expected:
        raise ConflictError(
            f"{name}:{alias} was moved from {expected or '(unset)'} to {current or '(unset)'} by another "
            f"command while this {action} of {name}@{version} was running; nothing was changed",
            hint=f"check 'loraplane adapters show {name}', then re-run the {action} if it is still wanted",
        )
    if current == version:
        raise AliasUnchangedError(
            f"{name}:{alias} already points at {version}: nothing to {action}",
            hint=f"{action} names the version to point at: loraplane adapters promote {name}@vN"
            if action == "promote"
            else f"name another version: loraplane adapters rollback {name} --to vN",
        )
    target = adapter.versions.get(version)
    transition(action, target.state if target else None, ref=f"{name}@{version}")
    adapter.aliases[alias] = version
    state.history.append(
        HistoryEvent(
            action=action,
            adapter=name,
            version=version,
            alias=alias,
            previous=current,
            reason=reason,
            forced=forced,
        )
    )
    return current


def rollback_target(state: RegistryState, name: str, alias: str) -> str:
    """The version ``name:alias`` pointed at before the change that set its current value.

    Like ``helm rollback`` and ``kubectl rollout undo``: rolling back twice returns to where it started.
    """
    adapter = state.adapter(name)
    current = adapter.aliases.get(alias)
    if current is None:
        raise RegistryError(f"{name}:{alias} is not set: there is nothing to roll back")
    for event in reversed(state.history):
        if (
            event.adapter == name
            and event.alias == alias
            and event.action in ("promote", "rollback")
            and event.version == current
        ):
            if event.previous is None:
                break
            return event.previous
    raise RegistryError(
        f"{name}:{alias} -> {current} has no earlier version in the history to roll back to",
        hint=f"promote another version, or name one: loraplane adapters rollback {name} --to vN",
    )


class Registry(Protocol):
    """What every backend offers: a snapshot, and a transaction that writes back only on success."""

    def read(self) -> RegistryState: ...

    def transaction(self) -> AbstractContextManager[RegistryState]: ...

"""The life cycle of a version (registry/version_states.py) against every command sequence.

A hypothesis state machine runs random sequences of register, load, unload, retire, promote,
rollback, eval and sync on a real LocalRegistry in a temp dir, and compares the registry after each
step with a model written from docs/cli.md ("The life cycle of a version").

No server runs here (a vLLM would make each step seconds long): the settings point at a closed port.
A command the model says is refused is given to the real library function (``load_adapter``,
``promote_adapter``, ...), which must refuse it with exit 2 before it asks a server and leave the
registry file byte-identical. A command the model allows is applied the way the library applies it
once the servers have answered: rehearsed on a copy, then committed in a registry transaction, with
the same registry functions (mark_serving, move_alias, record_stop, record_eval). A no-op
(``retire`` of a retired version, ``unload`` of a stopped one) asks no server, so it goes through the
real library function too. The server half of each command is tested on the real vLLM in
test_promotion_e2e.py and test_e2e.py.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from support import write_fake_adapter

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.platform.adapters import (
    evaluate_adapter,
    load_adapter,
    promote_adapter,
    register_adapter,
    retire_adapter,
    rollback_alias,
    unload_adapter,
)
from loraplane.registry.local import LocalRegistry
from loraplane.registry.model import (
    EvalRecord,
    RegistryState,
    mark_serving,
    move_alias,
    record_eval,
    record_stop,
    rehearse,
    rollback_target,
)
from loraplane.registry.version_states import (
    TRANSITIONS,
    AliasedVersionError,
    RetiredError,
    TransitionRefusedError,
    transition,
)
from loraplane.serving.reconcile import servable_versions

T = TypeVar("T")
NAME = "demo"
VERSIONS = ("v1", "v2", "v3")
ALIASES = ("prod", "canary")
versions = st.sampled_from(VERSIONS)
aliases = st.sampled_from(ALIASES)


# --- the table itself ---------------------------------------------------------------------------------


def test_retired_is_terminal_in_the_table() -> None:
    for (command, before), after in TRANSITIONS.items():
        if before == "retired":
            assert (command, after) == ("retire", "retired"), "only retire again, and it stays retired"
    for command in ("load", "sync", "eval", "promote", "rollback", "unload", "register"):
        with pytest.raises(RetiredError, match="demo@v1 is retired, and retired is terminal") as caught:
            transition(command, "retired", ref="demo@v1", path="/a/demo/v1")
        assert caught.value.exit_code == 2
        assert "loraplane adapters register /a/demo/v1 --name demo --version vN" in str(caught.value)
    again = transition("retire", "retired", ref="demo@v1")
    assert again.noop and again.after == "retired"


def test_unload_and_retire_are_refused_while_an_alias_points_at_the_version() -> None:
    for command in ("unload", "retire"):
        with pytest.raises(AliasedVersionError, match=f"cannot {command} demo@v2: demo:prod points at it"):
            transition(command, "serving", ref="demo@v2", aliases=["demo:prod"])
    assert transition("unload", "registered", ref="demo@v2", servable=False).noop, "already stopped"
    assert not transition("unload", "registered", ref="demo@v2", servable=True).noop
    with pytest.raises(TransitionRefusedError, match="demo@v9 is not registered"):
        transition("load", None, ref="demo@v9")


# --- every command sequence ---------------------------------------------------------------------------


class VersionLifeCycle(RuleBasedStateMachine):
    """One adapter, three versions, two aliases; the model is what docs/cli.md says."""

    def __init__(self, adapters_root: Path) -> None:
        super().__init__()
        # On a memory file system where there is one: the registry's fsyncs are most of a step's time.
        memory = Path("/dev/shm")
        self.home = Path(tempfile.mkdtemp(prefix="lifecycle-", dir=memory if memory.is_dir() else None))
        self.settings = Settings(
            home=self.home, adapters_root=adapters_root, server_url="http://127.0.0.1:9", max_lora_rank=8
        )
        self.registry = LocalRegistry(self.home)
        # the model
        self.state: dict[str, str] = {}  # version -> registered | serving | retired
        self.stopped: set[str] = set()  # registered versions unloaded since they were last loaded
        self.alias: dict[str, str] = {}
        self.moves: dict[str, list[tuple[str, str | None]]] = {a: [] for a in ALIASES}  # (to, from)
        self.ever_retired: set[str] = set()
        self.history: list[str] = []
        self.events: list[str] = []  # the registry's history as last seen, serialized

    def teardown(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    # helpers -----------------------------------------------------------------------------------------

    def _bytes(self) -> bytes | None:
        return self.registry.path.read_bytes() if self.registry.path.exists() else None

    def _refused(self, call: Callable[[], Awaitable[Any]]) -> None:
        """The real library function refuses (exit 2), before any server, and changes no byte."""
        before = self._bytes()
        with pytest.raises(LoraplaneError) as caught:
            asyncio.run(call())
        assert caught.value.exit_code == 2, f"refused with exit {caught.value.exit_code}: {caught.value}"
        assert "cannot reach" not in str(caught.value), "a server was asked before the refusal"
        assert self._bytes() == before, f"the refusal changed the registry: {caught.value}"
        event(f"refused: {type(caught.value).__name__}")

    def _commit(self, change: Callable[[RegistryState], T]) -> T:
        """What a command does once every server answered: rehearse, then one transaction."""
        rehearse(self.registry.read(), change)
        with self.registry.transaction() as state:
            return change(state)

    def _loaded(self, version: str) -> list[str]:
        """The model of a load: the events it records."""
        was = self.state[version]
        self.state[version] = "serving"
        self.stopped.discard(version)
        return [] if was == "serving" else ["load"]

    def _aliased(self, version: str) -> bool:
        return version in self.alias.values()

    # rules -------------------------------------------------------------------------------------------

    @initialize()
    def two_versions_to_start_with(self) -> None:
        """v1 and v2 registered (most sequences are about them); v3 waits for the register rule."""
        for version in ("v1", "v2"):
            self.register(version)

    @rule(version=versions)
    def register(self, version: str) -> None:
        path = self.settings.adapters_dir / NAME / version
        if version in self.state:
            before = self._bytes()
            with pytest.raises(LoraplaneError, match="already registered"):
                register_adapter(self.settings, path, name=NAME, version=version)
            assert self._bytes() == before
            return
        register_adapter(self.settings, path, name=NAME, version=version)
        self.state[version] = "registered"
        self.history.append("register")

    @rule(version=versions)
    def load(self, version: str) -> None:
        ref = f"{NAME}@{version}"
        if self.state.get(version) in (None, "retired"):
            self._refused(lambda: load_adapter(self.settings, ref))
            return
        self._commit(lambda s: mark_serving(s, s.resolve(ref), "load"))
        self.history += self._loaded(version)

    @rule()
    def sync(self) -> None:
        """sync_replicas after every replica loaded every servable version: each is recorded once."""

        def change(state: RegistryState) -> None:
            for entry in servable_versions(state):
                if entry.state == "registered":
                    mark_serving(state, state.resolve(entry.ref), "sync")

        self._commit(change)
        for version in sorted(self.state, key=lambda v: int(v[1:])):
            if self.state[version] == "registered" and version not in self.stopped:
                self.history += self._loaded(version)

    @rule(version=versions, retire=st.booleans())
    def stop(self, version: str, retire: bool) -> None:
        ref = f"{NAME}@{version}"
        current = self.state.get(version)
        call = (
            (lambda: retire_adapter(self.settings, ref))
            if retire
            else (lambda: unload_adapter(self.settings, ref))
        )
        if current is None or self._aliased(version) or (current == "retired" and not retire):
            self._refused(call)
            return
        noop = current == "retired" or (current == "registered" and version in self.stopped and not retire)
        if noop:  # asks no server: the real function
            before = self._bytes()
            result = asyncio.run(call())
            entry = result[0] if isinstance(result, tuple) else result
            assert entry.state == current and self._bytes() == before
            if retire:
                assert result == (entry, False), "retiring a retired version says it changed nothing"
            return
        servable = current == "serving" or version not in self.stopped
        self._commit(lambda s: record_stop(s, ref, retire=retire, servable=servable))
        if retire:
            self.state[version] = "retired"
            self.ever_retired.add(version)
        else:
            self.state[version] = "registered"
            self.stopped.add(version)
        self.history.append("retire" if retire else "unload")

    @rule(version=versions, passed=st.booleans())
    def evaluate(self, version: str, passed: bool) -> None:
        ref = f"{NAME}@{version}"
        if self.state.get(version) in (None, "retired"):
            self._refused(lambda: evaluate_adapter(self.settings, ref, self.home / "eval.jsonl"))
            return
        # evaluate_adapter: a load, the suite through the server, then the record
        self._commit(lambda s: mark_serving(s, s.resolve(ref), "load"))
        record = EvalRecord(
            suite="s",
            endpoint=self.settings.server_url,
            candidate_model=ref,
            models={"candidate": ref},
            scores={"qa": {"candidate": {"exact_match": 1.0 if passed else 0.0}}},
            passed=passed,
        )
        self._commit(lambda s: record_eval(s, ref, record))
        self.history += [*self._loaded(version), "eval"]
        assert self.registry.read().resolve(ref).latest_eval() == record

    @rule(version=versions, alias=aliases)
    def promote(self, version: str, alias: str) -> None:
        ref = f"{NAME}@{version}"
        current = self.alias.get(alias)
        if self.state.get(version) in (None, "retired") or current == version:
            self._refused(lambda: promote_adapter(self.settings, ref, alias=alias, force=True, reason="t"))
            return

        def change(state: RegistryState) -> None:
            mark_serving(state, state.resolve(ref), "promote")
            move_alias(state, NAME, alias, version, expected=current, action="promote", forced=True)

        self._commit(change)
        self.history += [*self._loaded(version), "promote"]
        self.alias[alias] = version
        self.moves[alias].append((version, current))

    @rule(alias=aliases, to=st.none() | versions)
    def rollback(self, alias: str, to: str | None) -> None:
        current = self.alias.get(alias)
        target = to
        if current is not None and target is None:  # the version before the change that set current
            target = next((prev for v, prev in reversed(self.moves[alias]) if v == current), None)
        if (
            current is None
            or target is None
            or self.state.get(target) in (None, "retired")
            or target == current
        ):
            self._refused(lambda: rollback_alias(self.settings, NAME, alias=alias, to=to))
            return
        assert to is not None or rollback_target(self.registry.read(), NAME, alias) == target
        ref = f"{NAME}@{target}"

        def change(state: RegistryState) -> None:
            mark_serving(state, state.resolve(ref), "rollback")
            move_alias(state, NAME, alias, target, expected=current, action="rollback")

        self._commit(change)
        self.history += [*self._loaded(target), "rollback"]
        self.alias[alias] = target
        self.moves[alias].append((target, current))

    # invariants --------------------------------------------------------------------------------------

    @invariant()
    def the_life_cycle_holds(self) -> None:
        state = self.registry.read()
        adapter = state.adapters.get(NAME)
        # the registry is what the model says, and its history has one event per change, in order
        assert {v: e.state for v, e in (adapter.versions.items() if adapter else [])} == self.state
        assert (adapter.aliases if adapter else {}) == self.alias
        assert [e.action for e in state.history] == self.history
        servable = servable_versions(state)
        expected = {
            v
            for v, s in self.state.items()
            if s == "serving" or (s == "registered" and v not in self.stopped)
        }
        assert {e.version for e in servable} == expected
        # retired never leaves retired, and is never servable
        for version in self.ever_retired:
            assert state.resolve(f"{NAME}@{version}").state == "retired"
        assert all(e.state != "retired" for e in servable)
        # an alias points only at a registered version that is not retired
        for a in state.adapters.values():
            for version in a.aliases.values():
                assert version in a.versions and a.versions[version].state != "retired"
        # the history is append-only
        events = [e.model_dump_json() for e in state.history]
        assert events[: len(self.events)] == self.events, "an event was changed or removed"
        self.events = events


def test_every_command_sequence_keeps_the_life_cycle(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    for version in VERSIONS:
        write_fake_adapter(root / NAME / version)
    run_state_machine_as_test(
        lambda: VersionLifeCycle(root),
        settings=settings(
            max_examples=80,
            stateful_step_count=40,
            deadline=None,
            database=None,  # nothing written into the checkout (.hypothesis/)
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

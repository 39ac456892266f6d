"""The local registry: references, immutability, atomic writes, and failed commands change nothing."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from pathlib import Path

import pytest
from support import write_fake_adapter

from loraplane.common.adapter_dir import AdapterPreflightError
from loraplane.common.errors import InvalidInputError
from loraplane.common.settings import Settings
from loraplane.platform.adapters import (
    PromotionRefusedError,
    promote_adapter,
    register_adapter,
)
from loraplane.registry.local import LocalRegistry
from loraplane.registry.model import EvalRecord, GateCheck, IntegrityError, RegistryError


def _snapshot(settings: Settings) -> bytes | None:
    path = settings.home / "registry.json"
    return path.read_bytes() if path.exists() else None


def test_register_and_resolve(settings: Settings, fake_adapter: Path) -> None:
    entry = register_adapter(settings, fake_adapter, name="demo", version="v1")
    assert entry.served_name == "demo@v1"
    state = LocalRegistry(settings.home).read()
    assert state.resolve("demo@v1").weights_sha256 == entry.weights_sha256
    assert state.resolve("demo").version == "v1"  # no prod alias yet: newest version
    with pytest.raises(RegistryError, match="has no alias 'prod'"):
        state.resolve("demo:prod")
    with pytest.raises(RegistryError, match="unknown adapter 'other'"):
        state.resolve("other@v1")
    with pytest.raises(InvalidInputError, match="not an adapter reference"):
        state.resolve("Demo/../x")
    assert [e.action for e in state.history] == ["register"]


def test_duplicate_version_is_refused_and_registry_unchanged(settings: Settings, fake_adapter: Path) -> None:
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    before = _snapshot(settings)
    other = write_fake_adapter(settings.adapters_dir / "demo" / "v1-copy")
    with pytest.raises(RegistryError, match="already registered"):
        register_adapter(settings, other, name="demo", version="v1")
    assert _snapshot(settings) == before


def test_missing_adapter_path_is_refused_and_registry_unchanged(
    settings: Settings, fake_adapter: Path
) -> None:
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    before = _snapshot(settings)
    with pytest.raises(AdapterPreflightError, match="does not exist"):
        register_adapter(settings, settings.adapters_dir / "demo" / "v9", name="demo", version="v9")
    assert _snapshot(settings) == before


def test_failed_transaction_leaves_file_untouched(settings: Settings, fake_adapter: Path) -> None:
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    before = _snapshot(settings)
    registry = LocalRegistry(settings.home)
    with pytest.raises(RuntimeError), registry.transaction() as state:
        state.adapters.clear()
        raise RuntimeError("crash in the middle of a change")
    assert _snapshot(settings) == before
    assert not list(settings.home.glob(".registry.json.*"))  # no temp file left behind


def test_promotion_without_passing_eval_is_refused(settings: Settings, fake_adapter: Path) -> None:
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    before = _snapshot(settings)
    with pytest.raises(PromotionRefusedError, match="never been evaluated"):
        asyncio.run(promote_adapter(settings, "demo@v1"))
    with LocalRegistry(settings.home).transaction() as state:
        state.resolve("demo@v1").evals.append(
            EvalRecord(
                suite="support",
                endpoint="x",
                candidate_model="demo@v1",
                models={"candidate": "demo@v1", "base": "base"},
                scores={"faq": {"candidate": {"exact_match": 0.2}, "base": {"exact_match": 0.5}}},
                checks=[
                    GateCheck(
                        rule="min_score",
                        dataset="faq",
                        metric="exact_match",
                        threshold=0.6,
                        observed=0.2,
                        passed=False,
                        message="exact_match on faq: 0.2 (minimum 0.6)",
                    )
                ],
                passed=False,
            )
        )
    before = _snapshot(settings)
    with pytest.raises(PromotionRefusedError, match=r"min_score: exact_match on faq: 0.2 \(minimum 0.6\)"):
        asyncio.run(promote_adapter(settings, "demo@v1"))
    with pytest.raises(InvalidInputError, match="--force needs --reason"):
        asyncio.run(promote_adapter(settings, "demo@v1", force=True))
    assert _snapshot(settings) == before


def test_eval_records_of_the_first_release_still_read_and_gate(
    settings: Settings, fake_adapter: Path
) -> None:
    """A registry written by loraplane 0.1.0 (one dataset, one metric per record) keeps working."""
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    data = json.loads((settings.home / "registry.json").read_text())
    data["adapters"]["demo"]["versions"]["v1"]["evals"] = [
        {
            "dataset": "/data/sentiment-eval.jsonl",
            "endpoint": "http://x",
            "metric": "exact_match",
            "candidate_model": "demo@v1",
            "candidate": {"exact_match": 0.2, "contains": 0.3},
            "baseline_model": "demo-base",
            "baseline": {"exact_match": 0.5, "contains": 0.5},
            "passed": False,
        }
    ]
    (settings.home / "registry.json").write_text(json.dumps(data))
    record = LocalRegistry(settings.home).read().resolve("demo@v1").evals[0]
    assert record.models == {"candidate": "demo@v1", "base": "demo-base"}
    assert record.figure("sentiment-eval", "base", "contains") == 0.5
    with pytest.raises(
        PromotionRefusedError, match=r"exact_match on sentiment-eval: candidate 0.200 vs base 0.500"
    ):
        asyncio.run(promote_adapter(settings, "demo@v1"))


def test_an_evaluation_without_a_gate_does_not_allow_promotion(
    settings: Settings, fake_adapter: Path
) -> None:
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    with LocalRegistry(settings.home).transaction() as state:
        state.resolve("demo@v1").evals.append(
            EvalRecord(
                suite="exploratory",
                endpoint="x",
                candidate_model="demo@v1",
                models={"candidate": "demo@v1"},
                scores={"qa": {"candidate": {"exact_match": 1.0}}},
                passed=False,
            )
        )
    with pytest.raises(PromotionRefusedError, match="suite 'exploratory'\\) has no promotion gate"):
        asyncio.run(promote_adapter(settings, "demo@v1"))


def test_changed_weights_block_promotion(settings: Settings, fake_adapter: Path) -> None:
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    (fake_adapter / "adapter_model.safetensors").write_bytes(b"tampered")
    before = _snapshot(settings)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        asyncio.run(promote_adapter(settings, "demo@v1", force=True, reason="testing"))
    assert _snapshot(settings) == before


def _register_many(home: str, root: str, start: int) -> None:
    settings = Settings(home=Path(home), adapters_root=Path(root), max_lora_rank=8)
    for i in range(start, start + 10):
        register_adapter(settings, Path(root) / "demo" / f"v{i}", name="demo", version=f"v{i}")


def test_concurrent_writers_lose_nothing(settings: Settings) -> None:
    for i in range(1, 21):
        write_fake_adapter(settings.adapters_dir / "demo" / f"v{i}")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_register_many, args=(str(settings.home), str(settings.adapters_dir), s))
        for s in (1, 11)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    state = json.loads((settings.home / "registry.json").read_text())
    assert len(state["adapters"]["demo"]["versions"]) == 20
    assert len(state["history"]) == 20


def _aliased_state(settings: Settings, versions: int = 3) -> None:
    """``demo@v1..vN`` registered and promoted one after another to ``prod``, as promote records it."""
    from loraplane.registry.model import move_alias

    for i in range(1, versions + 1):
        path = write_fake_adapter(settings.adapters_dir / "demo" / f"v{i}")
        register_adapter(settings, path, name="demo", version=f"v{i}")
        with LocalRegistry(settings.home).transaction() as state:
            expected = state.adapter("demo").aliases.get("prod")
            move_alias(state, "demo", "prod", f"v{i}", expected=expected, action="promote")


def test_an_alias_moved_since_the_caller_looked_is_a_conflict_and_nothing_changes(settings: Settings) -> None:
    from loraplane.registry.model import ConflictError, move_alias

    _aliased_state(settings, versions=2)
    before = _snapshot(settings)
    with (
        pytest.raises(ConflictError, match=r"demo:prod was moved from v1 to v2 by another command") as caught,
        LocalRegistry(settings.home).transaction() as state,
    ):
        move_alias(state, "demo", "prod", "v1", expected="v1", action="promote")
    assert caught.value.exit_code == 4
    assert "re-run the promote" in str(caught.value)
    assert _snapshot(settings) == before


def test_rollback_target_follows_the_history_and_two_rollbacks_return_to_the_start(
    settings: Settings,
) -> None:
    from loraplane.registry.model import move_alias, rollback_target

    _aliased_state(settings, versions=3)
    registry = LocalRegistry(settings.home)
    assert rollback_target(registry.read(), "demo", "prod") == "v2"
    with registry.transaction() as state:
        move_alias(state, "demo", "prod", "v2", expected="v3", action="rollback")
    assert rollback_target(registry.read(), "demo", "prod") == "v3"
    state = registry.read()
    assert [(e.action, e.version, e.previous) for e in state.history if e.alias == "prod"] == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
        ("promote", "v3", "v2"),
        ("rollback", "v2", "v3"),
    ]


def test_rollback_without_an_earlier_version_is_refused(settings: Settings) -> None:
    from loraplane.platform.adapters import rollback_alias

    _aliased_state(settings, versions=1)
    before = _snapshot(settings)
    with pytest.raises(RegistryError, match=r"demo:prod -> v1 has no earlier version"):
        asyncio.run(rollback_alias(settings, "demo"))
    with pytest.raises(RegistryError, match=r"demo:canary is not set"):
        asyncio.run(rollback_alias(settings, "demo", alias="canary"))
    assert _snapshot(settings) == before


def test_retiring_a_version_an_alias_points_at_is_refused(settings: Settings) -> None:
    from loraplane.platform.adapters import unload_adapter
    from loraplane.registry.version_states import AliasedVersionError

    _aliased_state(settings, versions=2)
    before = _snapshot(settings)
    with pytest.raises(AliasedVersionError, match=r"cannot retire demo@v2: demo:prod points at it") as caught:
        asyncio.run(unload_adapter(settings, "demo@v2", retire=True))
    assert caught.value.exit_code == 2
    assert _snapshot(settings) == before
    # v1 is registered but not served: retiring it needs no server (settings point at a closed port).
    retired = asyncio.run(unload_adapter(settings, "demo@v1", retire=True))
    assert retired.state == "retired"
    state = LocalRegistry(settings.home).read()
    assert state.history[-1].action == "retire" and state.history[-1].version == "v1"


def test_retired_is_terminal_and_every_refusal_changes_nothing(settings: Settings) -> None:
    """After retire, unload/load/promote/rollback/eval of the version are refused (exit 2) without a
    server being asked (the settings point at a closed port) and the registry file keeps its bytes."""
    from loraplane.platform.adapters import (
        evaluate_adapter,
        load_adapter,
        retire_adapter,
        rollback_alias,
        unload_adapter,
    )
    from loraplane.registry.version_states import RetiredError

    _aliased_state(settings, versions=2)
    entry, changed = asyncio.run(retire_adapter(settings, "demo@v1"))
    assert (entry.state, changed) == ("retired", True)
    before = _snapshot(settings)
    attempts = {
        "unloaded": lambda: unload_adapter(settings, "demo@v1"),
        "loaded": lambda: load_adapter(settings, "demo@v1"),
        "promoted": lambda: promote_adapter(settings, "demo@v1", force=True, reason="undo the retire"),
        "rolled back to": lambda: rollback_alias(settings, "demo"),  # prod's previous version is v1
        "evaluated": lambda: evaluate_adapter(settings, "demo@v1", settings.home / "never-read.jsonl"),
    }
    for verb, attempt in attempts.items():
        with pytest.raises(RetiredError) as caught:
            asyncio.run(attempt())
        message = str(caught.value)
        assert f"demo@v1 is retired, and retired is terminal: it cannot be {verb}" in message, message
        assert "register them as a new version: loraplane adapters register" in message
        assert "--name demo --version vN" in message
        assert caught.value.exit_code == 2
        assert _snapshot(settings) == before, f"refusing to be {verb} changed the registry"
    again, changed = asyncio.run(retire_adapter(settings, "demo@v1"))
    assert (again.state, changed) == ("retired", False), "retiring a retired version is a no-op"
    assert _snapshot(settings) == before


def test_promoting_the_version_an_alias_already_points_at_is_refused(settings: Settings) -> None:
    """``promote NAME`` resolves to NAME:prod's own version: a promotion that would change nothing."""
    from loraplane.registry.model import AliasUnchangedError

    _aliased_state(settings, versions=2)
    before = _snapshot(settings)
    for ref in ("demo", "demo@v2", "demo:prod"):
        with pytest.raises(AliasUnchangedError, match=r"demo:prod already points at v2") as caught:
            asyncio.run(promote_adapter(settings, ref, force=True, reason="again"))
        assert caught.value.exit_code == 2 and "promote demo@vN" in str(caught.value)
    assert _snapshot(settings) == before

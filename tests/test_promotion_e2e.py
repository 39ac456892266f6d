"""Promotion, rollback and retirement against the real vLLM server, with adapters the trainer made.

Each test gets one adapter with two versions of different behaviour: v1 is the sentiment adapter's
weights, v2 the animals adapter's. Which version an alias serves is read off the answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from filelock import FileLock
from support import API_KEY, Live, ask_one_word

from loraplane.common.settings import Settings
from loraplane.platform.adapters import (
    load_adapter,
    promote_adapter,
    register_adapter,
    rollback_alias,
    sync_adapters,
    unload_adapter,
)
from loraplane.registry.local import LocalRegistry
from loraplane.registry.version_states import RetiredError

pytestmark = pytest.mark.e2e

DEADLINE_S = 120.0


@dataclass(frozen=True)
class Race:
    settings: Settings
    name: str  # unique per test: served names live on the shared server


@pytest.fixture
def race(live: Live, tmp_path: Path) -> Race:
    """A registry of its own (same server and adapters root) with NAME@v1 (sentiment), NAME@v2 (animals)."""
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    name = re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-40:].strip("-")
    for version, task in (("v1", "sentiment"), ("v2", "animals")):
        copy = live.settings.adapters_dir / name / version
        shutil.copytree(live.adapters[task], copy)
        register_adapter(settings, copy, name=name, version=version)
    return Race(settings, name)


def _served(settings: Settings) -> set[str]:
    response = httpx.get(f"{settings.server_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return {m["id"] for m in response.json()["data"]}


def _ask(race: Race, alias: str) -> tuple[str, str]:
    """Resolve ``NAME:<alias>`` in the registry and ask the version it names the sentiment question."""
    served = LocalRegistry(race.settings.home).read().resolve(f"{race.name}:{alias}").served_name
    return served, ask_one_word(race.settings.server_url, served)


def test_promote_rollback_promote_round_trips_and_the_alias_serves_each_version(race: Race) -> None:
    settings, name = race.settings, race.name
    asyncio.run(promote_adapter(settings, f"{name}@v1", force=True, reason="first release"))
    assert _ask(race, "prod") == (f"{name}@v1", "positive"), "v1 is the sentiment adapter"

    asyncio.run(promote_adapter(settings, f"{name}@v2", force=True, reason="new data"))
    served, answer = _ask(race, "prod")
    assert served == f"{name}@v2" and answer not in ("positive", "negative"), answer

    entry, replaced = asyncio.run(rollback_alias(settings, name, reason="v2 answers off topic"))
    assert (entry.version, replaced) == ("v1", "v2")
    assert _ask(race, "prod") == (f"{name}@v1", "positive")

    asyncio.run(promote_adapter(settings, f"{name}@v2", force=True, reason="fixed the prompt"))
    assert _ask(race, "prod")[0] == f"{name}@v2"

    history = [
        (e.action, e.version, e.previous, e.reason)
        for e in LocalRegistry(settings.home).read().history
        if e.alias == "prod"
    ]
    assert history == [
        ("promote", "v1", None, "first release"),
        ("promote", "v2", "v1", "new data"),
        ("rollback", "v1", "v2", "v2 answers off topic"),
        ("promote", "v2", "v1", "fixed the prompt"),
    ]


def _cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "LORAPLANE_HOME": str(settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(settings.adapters_dir),
        "LORAPLANE_SERVER_URL": settings.server_url,
        "LORAPLANE_API_KEY": API_KEY,
        "COLUMNS": "200",  # rich wraps messages at the terminal width
    }
    argv = [sys.executable, "-m", "loraplane.platform.cli", *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_promotions_to_one_alias_exactly_one_wins(race: Race) -> None:
    """Both commands decide on the same registry state; the second to commit gets a conflict (exit 4)."""
    settings, name = race.settings, race.name
    registry = LocalRegistry(settings.home)
    actions_before = [e.action for e in registry.read().history]
    # Hold the registry's lock: both commands read the registry and load their version on the server,
    # then wait for the lock to record anything. Releasing it lets them race to commit.
    with FileLock(str(settings.home / "registry.lock")):
        procs = {
            v: _cli(settings, "adapters", "promote", f"{name}@{v}", "--force", "--reason", "race")
            for v in ("v1", "v2")
        }
        deadline = time.monotonic() + DEADLINE_S
        while not {f"{name}@v1", f"{name}@v2"} <= _served(settings):  # both have read the registry
            assert all(p.poll() is None for p in procs.values()), "a promotion ended before the race"
            assert time.monotonic() < deadline, "the promotions never loaded their versions"
            time.sleep(0.05)
    results = {v: (p.wait(timeout=DEADLINE_S), p.stderr.read() if p.stderr else "") for v, p in procs.items()}
    assert sorted(code for code, _ in results.values()) == [0, 4], results
    winner = next(v for v, (code, _) in results.items() if code == 0)
    loser_err = next(err for code, err in results.values() if code == 4)
    assert f"{name}:prod was moved from (unset) to {winner}" in loser_err
    assert "nothing was changed" in loser_err and "Traceback" not in loser_err

    after = registry.read()
    assert after.adapter(name).aliases == {"prod": winner}
    promotions = [(e.version, e.previous) for e in after.history if e.action == "promote"]
    assert promotions == [(winner, None)]
    # Loading and moving the alias are one registry transaction: the loser's load record went with
    # its conflict (its version stays loaded on the server, as a registered version may be).
    new = [(e.action, e.version) for e in after.history[len(actions_before) :]]
    assert new == [("load", winner), ("promote", winner)], "the winner's load and promotion, nothing else"


def test_retire_is_refused_for_the_prod_version_and_unloads_the_other(race: Race) -> None:
    settings, name = race.settings, race.name
    asyncio.run(promote_adapter(settings, f"{name}@v1", force=True, reason="release"))
    asyncio.run(promote_adapter(settings, f"{name}@v2", force=True, reason="release"))
    before = (settings.home / "registry.json").read_bytes()
    proc = _cli(settings, "adapters", "retire", f"{name}@v2")
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 2 and f"cannot retire {name}@v2: {name}:prod points at it" in err
    assert (settings.home / "registry.json").read_bytes() == before

    assert f"{name}@v1" in _served(settings)
    retired = asyncio.run(unload_adapter(settings, f"{name}@v1", retire=True))
    assert retired.state == "retired"
    served = _served(settings)
    assert f"{name}@v1" not in served and f"{name}@v2" in served
    with pytest.raises(RetiredError, match=f"{name}@v1 is retired, and retired is terminal") as caught:
        asyncio.run(rollback_alias(settings, name))
    assert f"loraplane adapters rollback {name} --to vN" in str(caught.value)

    proc = _cli(settings, "adapters", "show", name, "-o", "json")
    shown, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0
    data = json.loads(shown)
    assert data["adapter"]["versions"]["v1"]["state"] == "retired"
    assert [e["action"] for e in data["history"]][-1] == "retire"


def test_a_retired_version_is_never_loaded_or_served_again(race: Race) -> None:
    """Issue 17's defect: ``retire X@v1`` then ``unload X@v1`` (rc 0) put it back to ``registered``,
    and ``load X@v1`` served it again."""
    settings, name = race.settings, race.name
    retired = f"{name}@v1"
    asyncio.run(load_adapter(settings, retired))
    assert ask_one_word(settings.server_url, retired) == "positive", "served before it is retired"

    proc = _cli(settings, "adapters", "retire", retired)
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0 and out.strip() == f"{retired} is retired", err
    assert retired not in _served(settings)

    registry = settings.home / "registry.json"
    before = registry.read_bytes()
    for command in ("unload", "load"):
        proc = _cli(settings, "adapters", command, retired)
        _, err = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 2, (command, err)
        assert f"{retired} is retired, and retired is terminal" in " ".join(err.split()), err
        assert registry.read_bytes() == before, f"the refused {command} changed the registry"
    with pytest.raises(RetiredError):
        asyncio.run(load_adapter(settings, retired))
    assert registry.read_bytes() == before

    # Neither does a sync (what a restart does) bring it back; it stays retired.
    report = asyncio.run(sync_adapters(settings, [settings.server_url], prune_unknown=False))
    assert report.ok and all(retired not in r.loaded for r in report.replicas), report.to_json()
    assert LocalRegistry(settings.home).read().resolve(retired).state == "retired"
    assert retired not in _served(settings)
    answer = httpx.post(
        f"{settings.server_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": retired, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=DEADLINE_S,
    )
    assert answer.status_code == 404, answer.text

"""The pods' reconciler at a server's adapter limit (serving/capacity.py), on the session's real vLLM server.

``sync_replica`` is what every vLLM pod's reconciler and ``adapters sync`` run. Given a capacity of
one more adapter than the server holds, it loads the first wanted version and fails the second with
the reason, never asking vLLM to load it; an unwanted adapter it unloads first frees room for a load
in the same pass. (``adapters load`` against a full ``loraplane serve`` is in test_serve_local_e2e.py.)
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from support import Live

from loraplane.platform.adapters import register_adapter
from loraplane.registry.model import AdapterVersion
from loraplane.serving.client import VLLMAdminClient
from loraplane.serving.reconcile import sync_replica

pytestmark = pytest.mark.e2e


def _served(live: Live) -> set[str]:
    async def listed() -> set[str]:
        async with VLLMAdminClient(live.server.url, api_key=live.settings.api_key) as client:
            return {m.id for m in await client.list_models() if m.is_adapter}

    return asyncio.run(listed())


def test_the_reconciler_loads_up_to_the_capacity_and_fails_the_rest_with_the_reason(
    live: Live, tmp_path: Path
) -> None:
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    prefix = "cap-" + re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-30:].strip("-")
    versions: list[AdapterVersion] = []
    for n in ("a", "b", "c"):
        copy = settings.adapters_dir / f"{prefix}-{n}" / "v1"
        shutil.copytree(live.adapters["sentiment"], copy)
        versions.append(register_adapter(settings, copy, name=f"{prefix}-{n}", version="v1"))
    a, b, c = versions
    before = _served(live)
    try:
        report = asyncio.run(
            sync_replica(settings, live.server.url, [a, b], prune_unknown=False, capacity=len(before) + 1)
        )
        assert report.error is None and report.loaded == [a.served_name], report
        assert set(report.failed) == {b.served_name}
        why = " ".join(report.failed[b.served_name].split())
        assert f"cannot load {b.served_name}" in why and f"--max-cpu-loras {len(before) + 1}" in why
        assert _served(live) - before == {a.served_name}, "the one beyond the limit never reached vLLM"

        # a is no longer wanted and c is (prune_unknown keeps what this registry does not know):
        # the unload comes first, so c fits in the same pass.
        registered = {a.served_name, c.served_name}
        report = asyncio.run(
            sync_replica(
                settings,
                live.server.url,
                [c],
                registered=registered,
                prune_unknown=False,
                capacity=len(before) + 1,
            )
        )
        assert (report.unloaded, report.loaded, report.failed) == ([a.served_name], [c.served_name], {})
        assert _served(live) - before == {c.served_name}
    finally:
        ours = _served(live) & {v.served_name for v in versions}

        async def unload_ours() -> None:
            async with VLLMAdminClient(live.server.url, api_key=settings.api_key) as client:
                for name in ours:
                    await client.unload_adapter(name)

        asyncio.run(unload_ours())

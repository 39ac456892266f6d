"""End to end, for real: adapters trained by the trainer, served by a real vLLM CPU server,
evaluated through the live endpoint, promoted, and queried with the official openai client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from support import API_KEY, BASE, Live, ask_one_word, write_fake_adapter

from loraplane.platform.adapters import (
    evaluate_adapter,
    load_adapter,
    promote_adapter,
    register_adapter,
)
from loraplane.registry.local import LocalRegistry
from loraplane.registry.model import IntegrityError
from loraplane.serving.client import AdapterNotFoundError, AdapterRejectedError, VLLMAdminClient
from loraplane.trainer.demo_tasks import TASKS

pytestmark = pytest.mark.e2e


def test_published_adapter_has_weights_config_and_manifest(live: Live) -> None:
    for name, path in live.adapters.items():
        assert path == live.settings.adapters_dir / name / "v1"
        assert sorted(p.name for p in path.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "loss.png",
            "manifest.json",
            "metrics.jsonl",
            "tensorboard",  # TensorBoard's event files (tracking.tensorboard, on by default)
        ]
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["name"] == name and manifest["version"] == "v1"
        assert len(manifest["dataset"]["sha256"]) == 64
        assert manifest["metrics"]["final_train_loss"] > 0
        assert manifest["lora"]["r"] == 8


def test_each_adapter_beats_the_base_model_on_its_own_task(live: Live) -> None:
    for task, eval_set in live.eval_sets.items():
        record = asyncio.run(evaluate_adapter(live.settings, f"{task}@v1", eval_set))
        assert record.models == {"candidate": f"{task}@v1", "base": BASE}
        assert record.passed, record.checks
        # A clear margin, measured through the live endpoint: the random base model scores ~0.
        gain = (record.first("exact_match") or 0) - (record.first("exact_match", role="base") or 0)
        assert gain >= 0.5, record
    state = LocalRegistry(live.settings.home).read()
    assert all(state.resolve(f"{t}@v1").latest_eval() is not None for t in live.eval_sets)
    assert all(state.resolve(f"{t}@v1").state == "serving" for t in live.eval_sets)


def test_promote_then_query_the_alias_with_the_openai_client(live: Live) -> None:
    state = LocalRegistry(live.settings.home).read()
    if state.resolve("sentiment@v1").latest_eval() is None:
        asyncio.run(evaluate_adapter(live.settings, "sentiment@v1", live.eval_sets["sentiment"]))
    _, previous = asyncio.run(promote_adapter(live.settings, "sentiment@v1", alias="prod"))
    assert previous is None
    served = LocalRegistry(live.settings.home).read().resolve("sentiment:prod").served_name
    assert served == "sentiment@v1"
    assert ask_one_word(live.server.url, served) == "positive"
    history = LocalRegistry(live.settings.home).read().history
    assert history[-1].action == "promote" and history[-1].alias == "prod"


def _served(live: Live) -> set[str]:
    response = httpx.get(f"{live.server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    return {m["id"] for m in response.json()["data"]}


def test_missing_adapter_files_are_refused_before_vllm_is_called(live: Live) -> None:
    gone = write_fake_adapter(live.settings.adapters_dir / "ghost" / "v1")
    register_adapter(live.settings, gone, name="ghost", version="v1")
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    before = (live.settings.home / "registry.json").read_bytes()
    with pytest.raises(IntegrityError, match="is gone"):
        asyncio.run(load_adapter(live.settings, "ghost@v1"))
    assert "ghost@v1" not in _served(live)
    assert (live.settings.home / "registry.json").read_bytes() == before
    assert httpx.get(f"{live.server.url}/health").status_code == 200


def test_vllm_answers_map_to_typed_errors_and_the_server_survives(live: Live, tmp_path: Path) -> None:
    too_big = write_fake_adapter(live.settings.adapters_dir / "big" / "v1", r=16)

    async def go() -> None:
        async with VLLMAdminClient(live.server.url, api_key=API_KEY) as client:
            with pytest.raises(AdapterNotFoundError):
                await client.load_adapter("nowhere@v1", str(tmp_path / "does-not-exist"))
            with pytest.raises(AdapterRejectedError, match="greater than max_lora_rank"):
                await client.load_adapter("big@v1", str(too_big))
            assert await client.health()
            await client.unload_adapter("never-loaded@v1")  # idempotent: no error

    asyncio.run(go())
    assert not {"nowhere@v1", "big@v1"} & _served(live)


def test_quickstart_command_runs_the_whole_loop(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraplane.platform.cli",
            "quickstart",
            "--workdir",
            str(tmp_path / "qs"),
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    winner = result["winner"]
    assert result["promoted"] == f"{winner}@v1"
    for record in result["evals"].values():
        (scores,) = record["scores"].values()
        assert record["passed"] and scores["candidate"]["exact_match"] > scores["base"]["exact_match"]
        # the quickstart's server serves nothing but its evals: perplexity is measured (evals/suite.py)
        assert scores["candidate"]["perplexity"] >= 1.0 and scores["base"]["perplexity"] >= 1.0
    # The demo query is an eval prompt (an unseen template): the adapter must answer with one of its
    # task's labels; how often it is right is what the evals above measure.
    assert result["answer"] in set(TASKS[winner].answers.values())
    assert "Training adapter" in proc.stderr and "Promoting the winner" in proc.stderr  # progress shown


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


def test_ctrl_c_stops_every_process_quickstart_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplane.platform.cli", "quickstart", "--workdir", str(tmp_path / "qs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell starts background jobs with SIGINT ignored, and Python then never installs its Ctrl-C
        # handler: give the CLI the default disposition a terminal user has, wherever CI runs us.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    # Wait until vLLM is starting and a trainer process runs: the most processes at once.
    for line in proc.stderr:
        if "Training adapter" in line:
            wait_until = time.monotonic() + 60
            while time.monotonic() < wait_until:
                children = psutil.Process(proc.pid).children(recursive=True)
                if any("loraplane.trainer" in _cmdline(c) for c in children):
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)  # wait on the process, with a deadline, between looks
            break
        assert time.monotonic() < deadline, "quickstart never reached training"
    assert any("vllm" in _cmdline(c) for c in children), [_cmdline(c) for c in children]
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]

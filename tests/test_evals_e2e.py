"""Eval suites through a real vLLM CPU server, on adapters the trainer produced."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from support import API_KEY, BASE, Live, http
from test_gateway import metric, serve

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.evals.dataset import load_eval_set
from loraplane.evals.endpoint import OpenAIEndpoint
from loraplane.evals.offline import reference_nll_offline
from loraplane.evals.render import chart
from loraplane.evals.report import SuiteReport
from loraplane.evals.runner import _reference_nll
from loraplane.platform.adapters import (
    PromotionRefusedError,
    evaluate_adapter,
    load_adapter,
    promote_adapter,
    register_adapter,
)
from loraplane.platform.quickstart import demo_server_config, free_port
from loraplane.registry.local import LocalRegistry
from loraplane.serving.gateway.app import GatewayConfig, create_app
from loraplane.serving.launcher import VLLMServer

pytestmark = pytest.mark.e2e


def _suite(tmp: Path, task: str, eval_set: Path, gate: dict[str, object], **runner: object) -> Path:
    path = tmp / f"{task}-suite.yaml"
    suite = {
        "name": f"{task}-suite",
        "datasets": [
            {
                "name": task,
                "path": str(eval_set),
                "max_tokens": 8,
                "metrics": [
                    "exact_match",
                    "token_f1",
                    "rouge_l",
                    {"name": "regex", "pattern": r"^\w+$"},
                    "perplexity",
                    "latency",
                ],
            }
        ],
        "gate": gate,
        "runner": {"concurrency": 4, **runner},
    }
    path.write_text(yaml.safe_dump(suite))
    return path


def test_adapter_beats_base_beyond_noise_and_the_report_shows_both(live: Live, tmp_path: Path) -> None:
    suite = _suite(
        tmp_path,
        "sentiment",
        live.eval_sets["sentiment"],
        {"min_score": {"exact_match": 0.5}, "beat_base": {"exact_match": 0.0, "perplexity": 0.0}},
    )
    record = asyncio.run(
        evaluate_adapter(live.settings, "sentiment@v1", suite, report_dir=tmp_path / "reports")
    )
    assert record.passed, [c.message for c in record.checks]
    assert {c.rule for c in record.checks} == {"min_score", "beat_base"}

    assert record.report_path is not None
    report = SuiteReport.model_validate_json(Path(record.report_path).read_bytes())
    assert report.complete and report.models["candidate"] == "sentiment@v1" and report.models["base"] == BASE
    d = report.dataset("sentiment")
    em = next(c for c in d.comparisons if c.metric == "exact_match" and c.baseline == "base")
    assert em.verdict == "better" and em.delta.ci_low is not None and em.delta.ci_low > 0  # CI excludes 0
    ppl = next(c for c in d.comparisons if c.metric == "perplexity" and c.baseline == "base")
    assert ppl.verdict == "better" and ppl.delta.ci_high is not None and ppl.delta.ci_high < 0
    cand = d.runs["candidate"]
    assert cand.failures == 0 and cand.n == len(load_eval_set(live.eval_sets["sentiment"]))
    assert cand.metrics["ttft_p50_s"].value is not None and cand.metrics["e2e_p95_s"].value is not None
    assert all(x.ttft_s is not None and x.completion_tokens for x in cand.examples)

    stem = Path(record.report_path).with_suffix("")
    markdown = stem.with_suffix(".md").read_text()
    assert "sentiment@v1" in markdown and BASE in markdown and "Promotion gate: PASS" in markdown
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = chart(report)
    legends = {t.get_text() for ax in figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert {"candidate: sentiment@v1", f"base: {BASE}"} <= legends

    # Stored with the version in the registry, as the latest evaluation.
    latest = LocalRegistry(live.settings.home).read().resolve("sentiment@v1").latest_eval()
    assert latest is not None and latest.report_path == record.report_path
    assert latest.figure("sentiment", "candidate", "exact_match") == cand.metrics["exact_match"].value


def test_live_perplexity_agrees_with_transformers_and_peft(live: Live, demo_model: Path) -> None:
    examples = load_eval_set(live.eval_sets["animals"])[:6]
    asyncio.run(load_adapter(live.settings, "animals@v1"))

    async def through_server(model: str) -> list[tuple[float, int]]:
        async with OpenAIEndpoint(live.server.url, api_key=API_KEY) as ep:
            return [await _reference_nll(ep, model, e.as_chat(), e.reference) for e in examples]

    for model, adapter in (("animals@v1", live.adapters["animals"]), (BASE, None)):
        served = asyncio.run(through_server(model))
        offline = [reference_nll_offline(demo_model, adapter, e.as_chat(), e.reference) for e in examples]
        for (nll_live, n_live), (nll_off, n_off) in zip(served, offline, strict=True):
            assert n_live == n_off > 0  # the same answer tokens
            # Tolerance: 1e-3 nats per token (float32 on both sides; observed about 1e-5).
            assert abs(nll_live - nll_off) / n_off < 1e-3, (model, nll_live, nll_off)


def test_failed_gate_refuses_promotion_until_forced_with_a_reason(live: Live, tmp_path: Path) -> None:
    # A perplexity ceiling of 1.0 cannot be met (it would need probability 1 on every answer token).
    suite = _suite(tmp_path, "animals", live.eval_sets["animals"], {"max_score": {"perplexity": 1.0}})
    record = asyncio.run(evaluate_adapter(live.settings, "animals@v1", suite, report_dir=tmp_path))
    assert not record.passed
    (failed,) = record.failed_checks()
    assert failed.rule == "max_score" and failed.metric == "perplexity" and failed.threshold == 1.0
    before = (live.settings.home / "registry.json").read_bytes()
    with pytest.raises(
        PromotionRefusedError, match=r"max_score: perplexity on animals: [0-9.]+ \(maximum 1\)"
    ):
        asyncio.run(promote_adapter(live.settings, "animals@v1", alias="staging"))
    assert (live.settings.home / "registry.json").read_bytes() == before

    asyncio.run(
        promote_adapter(live.settings, "animals@v1", alias="staging", force=True, reason="ceiling too strict")
    )
    state = LocalRegistry(live.settings.home).read()
    assert state.resolve("animals:staging").version == "v1"
    event = state.history[-1]
    assert (event.action, event.forced, event.reason) == ("promote", True, "ceiling too strict")


def test_evals_run_cli_against_any_endpoint_and_check_exit_code(live: Live, tmp_path: Path) -> None:
    suite = _suite(tmp_path, "sentiment", live.eval_sets["sentiment"], {"min_score": {"exact_match": 0.99}})
    env = {**os.environ, "LORAPLANE_API_KEY": API_KEY}
    cmd = [sys.executable, "-m", "loraplane.platform.cli", "evals", "run", str(suite)]
    cmd += ["--endpoint", f"{live.server.url}/v1", "--candidate", BASE, "--report-dir", str(tmp_path / "r")]
    proc = subprocess.run([*cmd, "--check"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]  # the base model fails the gate
    assert "FAIL min_score: exact_match on sentiment" in " ".join(proc.stdout.split())
    proc = subprocess.run([*cmd, "--output", "json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # without --check the gate is reported, not enforced
    report = json.loads(proc.stdout)
    assert report["complete"] and report["gate"]["passed"] is False
    assert len(list((tmp_path / "r").glob("*.png"))) == 2


def test_server_dying_mid_suite_leaves_a_partial_report_and_no_record(
    live: Live, demo_model: Path, tmp_path: Path
) -> None:
    server = VLLMServer(demo_server_config(demo_model, free_port(), API_KEY), tmp_path / "vllm.log")
    server.start()
    try:
        server.wait_ready(timeout=600)
        settings = Settings(
            home=tmp_path / "state",
            adapters_root=live.settings.adapters_dir,
            server_url=server.url,
            api_key=API_KEY,
            max_lora_rank=8,
        )
        register_adapter(settings, live.adapters["sentiment"])
        asyncio.run(load_adapter(settings, "sentiment@v1"))
        suite = _suite(tmp_path, "sentiment", live.eval_sets["sentiment"], {}, retries=1, backoff_s=0.1)

        def kill_after_ten(done: int, total: int) -> None:
            if done == 10 and server.process is not None:
                os.killpg(server.process.pid, signal.SIGKILL)  # the whole server dies at once

        before = (settings.home / "registry.json").read_bytes()
        with pytest.raises(
            LoraplaneError, match=r"did not finish: the endpoint .* became unreachable"
        ) as info:
            asyncio.run(
                evaluate_adapter(
                    settings, "sentiment@v1", suite, report_dir=tmp_path / "r", on_progress=kill_after_ten
                )
            )
        assert "nothing was recorded in the registry" in str(info.value)
    finally:
        server.stop()
    state = LocalRegistry(settings.home).read()
    assert state.resolve("sentiment@v1").evals == []
    assert [e.action for e in state.history] == ["register", "load"]
    assert (settings.home / "registry.json").read_bytes() == before or state.resolve(
        "sentiment@v1"
    ).state == "serving"
    (partial,) = (tmp_path / "r").glob("*-INCOMPLETE.json")
    report = SuiteReport.model_validate_json(partial.read_bytes())
    assert not report.complete and "unreachable" in (report.error or "")
    answered = [
        x for d in report.datasets for r in d.runs.values() for x in r.examples if x.answer is not None
    ]
    assert 10 <= len(answered) < 40  # what was measured before the crash is kept
    assert "INCOMPLETE" in partial.with_suffix(".md").read_text()


GATEWAY_KEY = "evals-gateway-client-key"


@contextmanager
def gateway_with_prod(
    live: Live, tmp_path: Path, *, allow_prompt_logprobs: bool = False
) -> Iterator[tuple[str, str]]:
    """A registry of the test's own (the sentiment adapter as NAME@v1 = NAME:prod, loaded) and a
    gateway over it in front of the session's vLLM server: yields (the gateway's URL, NAME)."""
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    name = "ev-" + re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-37:].strip("-")
    copy = live.settings.adapters_dir / name / "v1"
    shutil.copytree(live.adapters["sentiment"], copy)
    register_adapter(settings, copy, name=name, version="v1")
    asyncio.run(promote_adapter(settings, f"{name}@v1", force=True, reason="evals through the gateway"))
    config = GatewayConfig(
        upstream=live.server.url,
        home=settings.home,
        api_keys=(GATEWAY_KEY,),
        upstream_api_key=API_KEY,
        allow_prompt_logprobs=allow_prompt_logprobs,
    )
    with serve(create_app(config)) as url:
        yield url, name


def _first_lines(source: Path, n: int, target: Path) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return target


def _evals_run(
    suite: Path, endpoint: str, candidate: str, key: str, report_dir: Path
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORAPLANE_API_KEY": key, "COLUMNS": "1000"}  # COLUMNS: no wrapped messages
    cmd = [sys.executable, "-m", "loraplane.platform.cli", "evals", "run", str(suite), "--endpoint", endpoint]
    cmd += ["--candidate", candidate, "--report-dir", str(report_dir), "--output", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_perplexity_evals_run_through_the_gateway(live: Live, tmp_path: Path) -> None:
    """`loraplane evals run` against a gateway that forwards prompt log-probabilities
    (``--allow-prompt-logprobs``, for a server an eval has to itself): /tokenize goes through it,
    behind the client's key, with the alias resolved; the perplexity equals the one computed on the
    server directly. A gateway without the flag refuses them (test_gateway_e2e.py)."""
    examples = _first_lines(live.eval_sets["sentiment"], 6, tmp_path / "six.jsonl")
    suite = _suite(tmp_path, "sentiment", examples, {"max_score": {"perplexity": 1000.0}})
    with gateway_with_prod(live, tmp_path, allow_prompt_logprobs=True) as (url, name):
        proc = _evals_run(suite, f"{url}/v1", f"{name}:prod", GATEWAY_KEY, tmp_path / "r")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        assert report["complete"] and report["gate"]["passed"], report.get("error")
        (dataset,) = report["datasets"]
        run = dataset["runs"]["candidate"]
        assert run["failures"] == 0 and run["n"] == 6
        assert all(x["perplexity_error"] is None and x["answer_tokens"] for x in run["examples"])
        perplexity = run["metrics"]["perplexity"]["value"]
        assert perplexity is not None and perplexity >= 1.0

        tokenized = {"route": "/tokenize", "model": f"{name}:prod", "served": f"{name}@v1", "code": "200"}
        assert metric(url, "loraplane_gateway_requests_total", tokenized) == 2 * 6  # prompt, prompt + answer

        # /detokenize goes through too, and undoes /tokenize.
        headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
        tokens = (
            http()
            .post(f"{url}/tokenize", json={"model": name, "prompt": "Hello there"}, headers=headers)
            .json()["tokens"]
        )
        text = http().post(f"{url}/detokenize", json={"model": name, "tokens": tokens}, headers=headers)
        assert text.status_code == 200 and text.json()["prompt"].strip() == "Hello there", text.text

        # The same numbers as on the server itself, under the version's served name.
        chats = [(e.as_chat(), e.reference) for e in load_eval_set(examples)[:2]]

        async def nll(endpoint: str, key: str, model: str) -> list[tuple[float, int]]:
            async with OpenAIEndpoint(endpoint, api_key=key) as ep:
                return [await _reference_nll(ep, model, chat, reference) for chat, reference in chats]

        through = asyncio.run(nll(url, GATEWAY_KEY, f"{name}:prod"))
        direct = asyncio.run(nll(live.server.url, API_KEY, f"{name}@v1"))
        for (nll_gw, n_gw), (nll_direct, n_direct) in zip(through, direct, strict=True):
            assert n_gw == n_direct > 0 and abs(nll_gw - nll_direct) < 1e-4, (nll_gw, nll_direct)


def test_failed_eval_requests_name_the_endpoints_answer(live: Live, tmp_path: Path) -> None:
    """A wrong key and an unknown model: the error quotes what the endpoint answered, and where."""
    examples = _first_lines(live.eval_sets["sentiment"], 3, tmp_path / "three.jsonl")
    suite = _suite(tmp_path, "sentiment", examples, {})
    with gateway_with_prod(live, tmp_path) as (url, name):
        wrong_key = _evals_run(suite, f"{url}/v1", f"{name}:prod", "not-the-key", tmp_path / "r1")
        unknown = _evals_run(suite, f"{url}/v1", f"{name}:nope", GATEWAY_KEY, tmp_path / "r2")
    for proc, status, code in ((wrong_key, 401, "invalid_api_key"), (unknown, 404, "model_not_found")):
        assert proc.returncode == 1, proc.stderr[-3000:]
        said = " ".join(proc.stderr.split())
        assert f"POST {url}/v1/chat/completions answered HTTP {status}:" in said, said
        assert f'"code": "{code}"' in said or f'"code":"{code}"' in said, said
        assert "check that the server is up" not in said, said
        assert "partial report" in said and list((tmp_path).glob("r*/*-INCOMPLETE.json"))

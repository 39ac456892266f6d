"""Run an eval set against any OpenAI-compatible endpoint and score the answers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from loraplane.common.errors import LoraplaneError
from loraplane.evals.dataset import EvalExample, load_eval_set
from loraplane.evals.metrics import METRICS
from loraplane.evals.report import EvalReport, ExampleResult

log = logging.getLogger("loraplane.evals")


class EvalFailedError(LoraplaneError):
    """Too many requests failed for the result to mean anything."""


async def _ask(client: httpx.AsyncClient, model: str, example: EvalExample, max_tokens: int) -> ExampleResult:
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": example.as_chat(),
                "temperature": 0.0,
                "seed": 0,
                "max_tokens": max_tokens,
            },
        )
    except httpx.HTTPError as exc:
        return ExampleResult(
            line=example.line, expected=example.expected, answer=None, error=f"{type(exc).__name__}: {exc}"
        )
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return ExampleResult(
            line=example.line,
            expected=example.expected,
            answer=None,
            error=f"HTTP {response.status_code}: {response.text[:200]}",
            latency_s=latency,
        )
    answer = response.json()["choices"][0]["message"]["content"] or ""
    scores = {name: fn(answer, example.expected) for name, fn in METRICS.items()}
    return ExampleResult(
        line=example.line, expected=example.expected, answer=answer, latency_s=latency, scores=scores
    )


async def evaluate(
    endpoint: str,
    model: str,
    dataset: Path,
    *,
    api_key: str | None = None,
    concurrency: int = 4,
    max_tokens: int = 16,
    timeout: float = 120.0,
    max_failure_share: float = 0.1,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Ask ``model`` every question in ``dataset`` at temperature 0 and score the answers.

    A failed request is recorded as a failure (it scores 0), never dropped; if more than
    ``max_failure_share`` of the requests fail, the eval itself fails.
    """
    examples = load_eval_set(dataset)
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async with httpx.AsyncClient(base_url=endpoint.rstrip("/"), headers=headers, timeout=timeout) as client:

        async def one(example: EvalExample) -> ExampleResult:
            nonlocal done
            async with semaphore:
                result = await _ask(client, model, example, max_tokens)
            done += 1
            if on_progress:
                on_progress(done, len(examples))
            return result

        results = await asyncio.gather(*(one(e) for e in examples))

    failures = [r for r in results if r.error is not None]
    if len(failures) > max_failure_share * len(results):
        raise EvalFailedError(
            f"{len(failures)} of {len(results)} requests to {endpoint} for model {model!r} failed; "
            f"first: line {failures[0].line}: {failures[0].error}",
            hint="check that the server is up and serves this model (loraplane adapters list)",
        )
    metrics = {name: sum(r.scores.get(name, 0.0) for r in results) / len(results) for name in METRICS}
    latencies = [r.latency_s for r in results if r.latency_s is not None and r.error is None]
    return EvalReport(
        model=model,
        dataset=str(dataset),
        endpoint=endpoint,
        n=len(results),
        failures=len(failures),
        metrics=metrics,
        mean_latency_s=sum(latencies) / len(latencies) if latencies else None,
        examples=list(results),
    )

"""Run an eval suite against any OpenAI-compatible endpoint: every model gets the same prompts.

Models are run one after another (so their latencies are measured under the same load), each with
bounded concurrency, at temperature 0 with a fixed seed. A failed request is recorded on its example
(and scores 0), never dropped. When more than ``runner.max_failure_share`` of the requests fail, or
the endpoint becomes unreachable, the run stops and :class:`SuiteIncompleteError` carries the partial
report, marked ``complete: false``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

import httpx

from loraplane.common.errors import LoraplaneError
from loraplane.evals import stats
from loraplane.evals.dataset import EvalExample
from loraplane.evals.endpoint import EndpointUnreachableError, OpenAIEndpoint, RequestFailedError
from loraplane.evals.gates import evaluate_gate
from loraplane.evals.metrics import FIGURES, SIMPLE_SCORERS, Scorer, json_schema_scorer, regex_scorer
from loraplane.evals.report import (
    Comparison,
    DatasetReport,
    Estimate,
    ExampleResult,
    ModelRun,
    SuiteReport,
)
from loraplane.evals.suite import DatasetSpec, EvalSuite, LoadedSuite

log = logging.getLogger("loraplane.evals")
ProgressFn = Callable[[int, int], None]


class SuiteIncompleteError(LoraplaneError):
    """The suite could not be finished; ``report`` holds what was measured (``complete: false``)."""

    def __init__(self, message: str, report: SuiteReport, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report


def api_key_from_env() -> str | None:
    """``LORAPLANE_API_KEY``, else ``OPENAI_API_KEY``: keys never live in suite files."""
    return os.environ.get("LORAPLANE_API_KEY") or os.environ.get("OPENAI_API_KEY")


class _Breaker:
    """Trips when the endpoint cannot be reached, so the remaining requests are not sent."""

    def __init__(self) -> None:
        self.reason: str | None = None


def _scorers(spec: DatasetSpec, schema: dict[str, object] | None) -> dict[str, Scorer]:
    out: dict[str, Scorer] = {}
    for m in spec.metrics:
        if m.name in SIMPLE_SCORERS:
            out[m.name] = SIMPLE_SCORERS[m.name]
        elif m.name == "regex":
            out["regex"] = regex_scorer(m.pattern)
        elif m.name == "json_schema":
            assert schema is not None
            out["json_schema"] = json_schema_scorer(schema)
    return out


async def _reference_nll(
    ep: OpenAIEndpoint, model: str, chat: list[dict[str, str]], reference: str
) -> tuple[float, int]:
    """Summed NLL of the reference answer's tokens, scored by the served model (prompt logprobs).

    The scored tokens are the answer's content, in context after the generation prompt; the
    template's end-of-turn marker and anything after it are not scored.
    """
    prompt_ids = await ep.tokenize_chat(model, chat)
    full = [*chat, {"role": "assistant", "content": reference}]
    full_ids = await ep.tokenize_chat(model, full, continue_final_message=True)
    if len(full_ids) <= len(prompt_ids) or full_ids[: len(prompt_ids)] != prompt_ids:
        raise RequestFailedError(
            "the chat template does not render the prompt as a prefix of prompt + answer; "
            "the answer's tokens cannot be isolated",
            attempts=1,
        )
    logprobs = await ep.prompt_logprobs(model, full_ids)
    answer = logprobs[len(prompt_ids) :]
    if any(v is None for v in answer):
        raise RequestFailedError("the endpoint returned no logprob for an answer token", attempts=1)
    return -math.fsum(v for v in answer if v is not None), len(answer)


async def _run_model(
    ep: OpenAIEndpoint,
    suite: EvalSuite,
    spec: DatasetSpec,
    examples: list[EvalExample],
    role: str,
    model: str,
    scorers: dict[str, Scorer],
    breaker: _Breaker,
    tick: Callable[[], None],
) -> ModelRun:
    opts = suite.runner
    semaphore = asyncio.Semaphore(opts.concurrency)
    # Prompt-logprob requests go one at a time, with nothing else of ours in flight: vLLM computes
    # prompt logits with the batch's per-request LoRA mapping, which crashes the engine (CPU) or
    # mixes adapters up when the batch holds more than one request (vllm#16668, still open in 0.32).
    one_at_a_time = asyncio.Semaphore(1)
    results = [ExampleResult(line=e.line, question=e.question, reference=e.reference) for e in examples]
    started = time.perf_counter()

    async def generate(example: EvalExample, result: ExampleResult) -> None:
        async with semaphore:
            if breaker.reason is None:
                try:
                    gen = await ep.chat(
                        model,
                        example.as_chat(spec.system_prompt),
                        max_tokens=spec.max_tokens,
                        seed=opts.seed,
                        stream=opts.stream,
                    )
                    result.answer, result.attempts = gen.text, gen.attempts
                    result.ttft_s, result.e2e_s, result.completion_tokens = (
                        gen.ttft_s,
                        gen.e2e_s,
                        gen.completion_tokens,
                    )
                except EndpointUnreachableError as exc:
                    breaker.reason = breaker.reason or str(exc)
                    result.error, result.attempts = str(exc), exc.attempts
                except RequestFailedError as exc:
                    result.error, result.attempts = str(exc), exc.attempts
            else:
                result.error = f"not sent: the endpoint became unreachable ({breaker.reason})"
            if result.answer is not None:
                result.scores = {name: fn(result.answer, result.reference) for name, fn in scorers.items()}
            else:  # a failure scores 0: it is counted, never dropped
                result.scores = dict.fromkeys(scorers, 0.0)
        tick()

    async def score_reference(example: EvalExample, result: ExampleResult) -> None:
        async with one_at_a_time:
            if breaker.reason is None:
                try:
                    result.nll_sum, result.answer_tokens = await _reference_nll(
                        ep, model, example.as_chat(spec.system_prompt), example.reference
                    )
                except EndpointUnreachableError as exc:
                    breaker.reason = breaker.reason or str(exc)
                    result.perplexity_error = str(exc)
                except RequestFailedError as exc:
                    result.perplexity_error = str(exc)
            else:
                result.perplexity_error = f"not sent: the endpoint became unreachable ({breaker.reason})"
        tick()

    # Generation first, then perplexity: latency is measured without the scoring requests in flight.
    await asyncio.gather(*(generate(e, r) for e, r in zip(examples, results, strict=True)))
    if spec.wants("perplexity"):
        await asyncio.gather(*(score_reference(e, r) for e, r in zip(examples, results, strict=True)))
    return ModelRun(
        role=role,
        model=model,
        n=len(results),
        failures=sum(1 for r in results if r.error or r.perplexity_error),
        wall_s=time.perf_counter() - started,
        examples=results,
    )


def _estimates(run: ModelRun, spec: DatasetSpec, suite: EvalSuite) -> dict[str, Estimate]:
    b = suite.bootstrap
    kw: stats.Resampling = {"resamples": b.resamples, "confidence": b.confidence, "seed": b.seed}
    out: dict[str, Estimate] = {}
    for figure in spec.figures():
        info = FIGURES[figure]
        if info.kind == "score":
            values = [r.scores[figure] for r in run.examples]
            ci = stats.mean_ci(values, **kw)
            out[figure] = Estimate(value=ci.value, ci_low=ci.low, ci_high=ci.high, n=len(values))
        elif info.kind == "perplexity":
            scored = [r for r in run.examples if r.nll_sum is not None and r.answer_tokens]
            if not scored:
                out[figure] = Estimate(value=None, n=0)
                continue
            ci = stats.perplexity_ci(
                [r.nll_sum for r in scored if r.nll_sum is not None],
                [r.answer_tokens or 0 for r in scored],
                **kw,
            )
            if figure == "perplexity":
                out[figure] = Estimate(value=ci.value, ci_low=ci.low, ci_high=ci.high, n=len(scored))
            else:
                out[figure] = Estimate(
                    value=math.log(ci.value),
                    ci_low=math.log(ci.low),
                    ci_high=math.log(ci.high),
                    n=len(scored),
                )
        else:
            ok = [r for r in run.examples if r.error is None and r.e2e_s is not None]
            if figure.startswith("ttft"):
                values = [r.ttft_s for r in ok if r.ttft_s is not None]
            elif figure.startswith("e2e"):
                values = [r.e2e_s for r in ok if r.e2e_s is not None]
            else:
                values = [r.completion_tokens / r.e2e_s for r in ok if r.completion_tokens and r.e2e_s]
            q = 95 if figure.endswith("p95_s") else 50
            out[figure] = Estimate(value=stats.percentile(values, q) if values else None, n=len(values))
    return out


def _compare(d: DatasetReport, suite: EvalSuite) -> list[Comparison]:
    b = suite.bootstrap
    kw: stats.Resampling = {"resamples": b.resamples, "confidence": b.confidence, "seed": b.seed}
    cand = d.runs.get("candidate")
    if cand is None:
        return []
    out: list[Comparison] = []
    for role, other in d.runs.items():
        if role == "candidate":
            continue
        for figure in d.figures:
            info = FIGURES[figure]
            if info.kind == "score":
                ci = stats.paired_diff_ci(
                    [r.scores[figure] for r in cand.examples],
                    [r.scores[figure] for r in other.examples],
                    **kw,
                )
                delta = Estimate(value=ci.value, ci_low=ci.low, ci_high=ci.high, n=cand.n)
            elif info.kind == "perplexity":
                pairs = [
                    (c, o)
                    for c, o in zip(cand.examples, other.examples, strict=True)
                    if c.nll_sum is not None and o.nll_sum is not None and c.answer_tokens and o.answer_tokens
                ]
                if not pairs:
                    out.append(
                        Comparison(
                            metric=figure, baseline=role, delta=Estimate(value=None, n=0), verdict="n/a"
                        )
                    )
                    continue
                cs = ([c.nll_sum or 0.0 for c, _ in pairs], [c.answer_tokens or 0 for c, _ in pairs])
                os_ = ([o.nll_sum or 0.0 for _, o in pairs], [o.answer_tokens or 0 for _, o in pairs])
                if figure == "perplexity":
                    ci = stats.paired_perplexity_diff_ci(cs, os_, **kw)
                else:  # mean NLL difference = log-ratio of the perplexities
                    ci = stats.paired_diff_ci(
                        [s / t for s, t in zip(*cs, strict=True)],
                        [s / t for s, t in zip(*os_, strict=True)],
                        **kw,
                    )
                delta = Estimate(value=ci.value, ci_low=ci.low, ci_high=ci.high, n=len(pairs))
            else:
                a, c = cand.metrics.get(figure), other.metrics.get(figure)
                value = a.value - c.value if a and c and a.value is not None and c.value is not None else None
                out.append(
                    Comparison(
                        metric=figure, baseline=role, delta=Estimate(value=value, n=cand.n), verdict="n/a"
                    )
                )
                continue
            assert delta.ci_low is not None and delta.ci_high is not None
            # The interval of the improvement: candidate - baseline, or its negation when lower is better.
            low, high = (
                (delta.ci_low, delta.ci_high) if info.higher_is_better else (-delta.ci_high, -delta.ci_low)
            )
            verdict: Literal["better", "worse", "within noise"] = (
                "better" if low > 0 else "worse" if high < 0 else "within noise"
            )
            out.append(Comparison(metric=figure, baseline=role, delta=delta, verdict=verdict))
    return out


async def run_suite(
    loaded: LoadedSuite,
    endpoint: str,
    models: dict[str, str],
    *,
    api_key: str | None = None,
    on_progress: ProgressFn | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SuiteReport:
    """Evaluate ``models`` (role -> model name; the role ``candidate`` is compared with the others).

    The returned report is complete and, if the suite has a gate, judged. Raises
    :class:`SuiteIncompleteError` (with the partial report) when the run could not finish.
    """
    suite = loaded.suite
    if not models:
        raise LoraplaneError("no model to evaluate")
    key = api_key if api_key is not None else api_key_from_env()
    report = SuiteReport(
        suite=suite.name,
        suite_path=str(loaded.path) if loaded.path else None,
        suite_sha256=loaded.sha256,
        endpoint=endpoint,
        models=dict(models),
        confidence=suite.bootstrap.confidence,
    )
    total = sum(
        len(examples) * (2 if spec.wants("perplexity") else 1) * len(models)
        for spec in suite.datasets
        for examples in [loaded.datasets[spec.name][1]]
    )
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)

    breaker = _Breaker()
    opts = suite.runner
    async with OpenAIEndpoint(
        endpoint,
        api_key=key,
        timeout_s=opts.timeout_s,
        retries=opts.retries,
        backoff_s=opts.backoff_s,
        max_connections=opts.concurrency,
        transport=transport,
    ) as ep:
        for spec in suite.datasets:
            path, examples = loaded.datasets[spec.name]
            d = DatasetReport(name=spec.name, path=str(path), n=len(examples), figures=spec.figures())
            report.datasets.append(d)
            scorers = _scorers(spec, loaded.schemas.get(spec.name))
            for role, model in report.models.items():
                log.info("evaluating %s (%s) on %s", model, role, spec.name)
                run = await _run_model(ep, suite, spec, examples, role, model, scorers, breaker, tick)
                run.metrics = _estimates(run, spec, suite)
                d.runs[role] = run
                if breaker.reason:
                    break
            if breaker.reason:
                break
            d.comparisons = _compare(d, suite)

    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    requests = sum(
        len(r.examples) * (2 if "perplexity" in d.figures else 1)
        for d in report.datasets
        for r in d.runs.values()
    )
    failed = sum(
        bool(x.error) + bool(x.perplexity_error)
        for d in report.datasets
        for r in d.runs.values()
        for x in r.examples
    )
    first = next(
        (
            (d.name, r.model, x)
            for d in report.datasets
            for r in d.runs.values()
            for x in r.examples
            if x.error or x.perplexity_error
        ),
        None,
    )
    if breaker.reason:
        report.error = f"the endpoint {endpoint} became unreachable during the suite: {breaker.reason}"
    elif failed > opts.max_failure_share * max(requests, 1):
        assert first is not None
        name, model, x = first
        report.error = (
            f"{failed} of {requests} requests failed (more than {opts.max_failure_share:.0%}); "
            f"first: {name} line {x.line} with {model!r}: {x.error or x.perplexity_error}"
        )
    if report.error:
        if breaker.reason:
            hint = f"check that the server is up at {endpoint}; "
        else:  # the endpoint answered: its answer (in the message) says what is wrong
            hint = (
                "the endpoint's answer above says why: HTTP 401 is a wrong or missing API key "
                "(LORAPLANE_API_KEY), 404 a model it does not serve (GET /v1/models lists them; "
                "loraplane adapters list); "
            )
        raise SuiteIncompleteError(
            report.error, report, hint=hint + "the partial report is marked incomplete"
        )
    report.complete = True
    if suite.gate is not None:
        report.gate = evaluate_gate(suite.gate, report)
    return report

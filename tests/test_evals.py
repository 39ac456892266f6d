"""Eval suites, metrics, statistics, gates and the runner's fault handling (no server needed).

The runner's retry and failure paths are driven by an httpx MockTransport: 429s, 503s and
single failed requests are faults a healthy vLLM cannot be made to produce on demand. Everything
that a real server can show is tested against the real vLLM in test_evals_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from loraplane.common.errors import ConfigError, InvalidInputError
from loraplane.common.jsonl import DatasetError
from loraplane.evals import stats
from loraplane.evals.dataset import load_eval_set
from loraplane.evals.gates import evaluate_gate
from loraplane.evals.metrics import json_schema_scorer, json_valid, regex_scorer, rouge_l, token_f1
from loraplane.evals.render import to_markdown
from loraplane.evals.report import Comparison, DatasetReport, Estimate, ModelRun, SuiteReport
from loraplane.evals.runner import SuiteIncompleteError, run_suite
from loraplane.evals.suite import (
    GatePolicy,
    load_suite,
    refuse_perplexity_on_shared_servers,
    suite_for_dataset,
)

# --- suites -----------------------------------------------------------------------------------------


def _write_suite(tmp_path: Path, suite: dict[str, object], rows: int = 3) -> Path:
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "reference": f"a{i}"}) + "\n" for i in range(rows))
    )
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _suite(
    metrics: list[object], gate: dict[str, object] | None = None, **extra: object
) -> dict[str, object]:
    return {
        "name": "t",
        "datasets": [{"name": "qa", "path": "eval.jsonl", "metrics": metrics}],
        **({"gate": gate} if gate else {}),
        **extra,
    }


def test_a_good_suite_loads_its_datasets_relative_to_the_suite_file(tmp_path: Path) -> None:
    path = _write_suite(
        tmp_path, _suite(["exact_match", "perplexity", "latency"], {"beat_base": {"qa/nll": 0}})
    )
    loaded = load_suite(path)
    (file, examples) = loaded.datasets["qa"]
    assert file == tmp_path / "eval.jsonl" and [e.reference for e in examples] == ["a0", "a1", "a2"]
    assert loaded.suite.datasets[0].figures()[:3] == ["exact_match", "perplexity", "nll"]


@pytest.mark.parametrize(
    ("suite", "message"),
    [
        (_suite(["bleu"]), "datasets.0.metrics.0.name: got 'bleu'"),
        (
            _suite(["exact_match"], {"min_score": {"perplexity": 5}}),
            "lower is better for perplexity; use max_score",
        ),
        (_suite(["exact_match"], {"max_score": {"exact_match": 5}}), "use min_score for a floor"),
        (
            _suite(["exact_match"], {"min_score": {"token_f1": 0.5}}),
            "token_f1 is not computed on any dataset",
        ),
        (_suite(["exact_match"], {"min_score": {"faq/exact_match": 0.5}}), "no dataset named 'faq'"),
        (_suite(["latency"], {"beat_base": {"e2e_p95_s": 0}}), "use max_latency_increase"),
        (_suite(["exact_match"], {"max_regression": {"exact_match": -1}}), "cannot be negative"),
        (_suite([{"name": "regex", "pattern": "("}]), "not a valid regular expression"),
        (_suite(["json_schema"]), "json_schema needs 'schema'"),
        (_suite([{"name": "json_schema", "schema": {"type": 5}}]), "not a valid JSON schema"),
        (_suite(["exact_match"], runner={"concurrency": 0}), "runner.concurrency: got 0"),
        (_suite(["exact_match"], runner={"concurency": 4}), "runner.concurency: unknown field"),
        ({"name": "t", "datasets": []}, "datasets: got []"),
    ],
)
def test_bad_suites_name_the_field_the_value_and_the_fix(
    tmp_path: Path, suite: dict[str, object], message: str
) -> None:
    path = _write_suite(tmp_path, suite)
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_suite_naming_a_missing_or_bad_dataset_fails_before_any_request(tmp_path: Path) -> None:
    path = _write_suite(tmp_path, _suite(["exact_match"]))
    (tmp_path / "eval.jsonl").write_text('{"prompt": "q"}\n')
    with pytest.raises(DatasetError, match=r"eval.jsonl:1: missing 'expected'"):
        load_suite(path)
    (tmp_path / "eval.jsonl").unlink()
    with pytest.raises(DatasetError, match="no such file"):
        load_suite(path)


def test_eval_lines_accept_chat_training_lines_and_reference(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    path.write_text(
        json.dumps({"messages": [*chat, {"role": "assistant", "content": "gold"}]})
        + "\n"
        + json.dumps({"messages": chat, "reference": "ref"})
        + "\n"
    )
    a, b = load_eval_set(path)
    assert (a.reference, a.messages[-1]) == ("gold", ("user", "u"))
    assert b.reference == "ref" and b.as_chat("ignored")[0] == {"role": "system", "content": "s"}
    path.write_text(
        json.dumps({"messages": [{"role": "assistant", "content": "x"}], "reference": "r"}) + "\n"
    )
    with pytest.raises(DatasetError, match=r"e.jsonl:1: the prompt must end with a user message"):
        load_eval_set(path)


# --- metrics and statistics -----------------------------------------------------------------------


def test_answer_metrics() -> None:
    assert token_f1("The cat sat", "cat sat down") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0 < rouge_l("the cat", "the cat sat on the mat") < 1
    assert regex_scorer(r"\d{3}")("code 123", "ignored") == 1.0
    assert regex_scorer(None)("woof", "wo+f") == 1.0 and regex_scorer(None)("woof!", "wo+f") == 0.0
    assert json_valid(' {"a": 1} ', "") == 1.0 and json_valid("{a: 1}", "") == 0.0
    schema = json_schema_scorer(
        {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    )
    assert schema('{"a": 1}', "") == 1.0 and schema('{"a": "x"}', "") == 0.0 and schema("nope", "") == 0.0


def test_bootstrap_intervals() -> None:
    flat = stats.mean_ci([0.5] * 20)
    assert (flat.low, flat.value, flat.high) == (0.5, 0.5, 0.5)
    better = stats.paired_diff_ci([1.0] * 18 + [0.0] * 2, [0.0] * 18 + [1.0] * 2)
    assert better.value == pytest.approx(0.8) and better.excludes(0.0)
    noise = stats.paired_diff_ci([1, 0] * 10, [0, 1] * 10)
    assert noise.value == 0 and not noise.excludes(0.0)
    assert stats.mean_ci([0, 1, 1, 0, 1], seed=3) == stats.mean_ci([0, 1, 1, 0, 1], seed=3)  # reproducible
    ppl = stats.perplexity_ci([2.0, 4.0], [2, 2])
    assert ppl.value == pytest.approx(2.718281828**1.5) and ppl.low <= ppl.value <= ppl.high


# --- gates ---------------------------------------------------------------------------------------------


def _report(cand: dict[str, float], prod: dict[str, float] | None, base: dict[str, float]) -> SuiteReport:
    runs = {"candidate": cand, **({"prod": prod} if prod else {}), "base": base}
    d = DatasetReport(
        name="qa",
        path="x",
        n=40,
        figures=list(cand),
        runs={
            role: ModelRun(
                role=role,
                model=role,
                n=40,
                failures=0,
                wall_s=1,
                metrics={k: Estimate(value=v, n=40) for k, v in m.items()},
            )
            for role, m in runs.items()
        },
        comparisons=[
            Comparison(
                metric="exact_match",
                baseline="base",
                delta=Estimate(value=0.3, ci_low=0.1, ci_high=0.5, n=40),
                verdict="better",
            ),
            Comparison(
                metric="perplexity",
                baseline="base",
                delta=Estimate(value=-2, ci_low=-3, ci_high=-1, n=40),
                verdict="better",
            ),
        ],
    )
    return SuiteReport(
        suite="s",
        suite_path=None,
        suite_sha256="0",
        endpoint="e",
        models={r: r for r in runs},
        datasets=[d],
        complete=True,
    )


def test_gate_rules_pass_fail_and_skip_with_numbers_in_the_message() -> None:
    policy = GatePolicy(
        min_score={"exact_match": 0.6},
        max_score={"perplexity": 3.0},
        beat_base={"exact_match": 0.05, "perplexity": 0.5},
        max_regression={"exact_match": 0.02},
        max_latency_increase={"e2e_p95_s": 0.25},
    )
    cand = {"exact_match": 0.7, "perplexity": 2.0, "e2e_p95_s": 1.0}
    result = evaluate_gate(
        policy, _report(cand, None, {"exact_match": 0.4, "perplexity": 4.0, "e2e_p95_s": 1.0})
    )
    assert result.passed
    assert [c.passed for c in result.checks] == [True, True, True, True, None, None]  # no prod: skipped

    prod = {"exact_match": 0.8, "perplexity": 2.0, "e2e_p95_s": 0.5}
    result = evaluate_gate(
        policy, _report(cand, prod, {"exact_match": 0.4, "perplexity": 4.0, "e2e_p95_s": 1.0})
    )
    assert not result.passed
    failed = {c.rule: c.message for c in result.failures()}
    assert failed == {
        "max_regression": "exact_match on qa: candidate 0.7 vs prod 0.8 (regression +0.1, allowed 0.02)",
        "max_latency_increase": "e2e_p95_s on qa: candidate 1 vs prod 0.5 (+100.0% slower, allowed 25%)",
    }
    strict = GatePolicy(beat_base={"exact_match": 0.2})  # CI lower end 0.1 is not above 0.2
    (check,) = evaluate_gate(strict, _report(cand, None, {"exact_match": 0.4})).checks
    assert check.passed is False and "CI lower end +0.1" in check.message


# --- the runner's fault handling ---------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def _openai(
    answer: Callable[[str], str], faults: Callable[[httpx.Request, str], httpx.Response | None]
) -> Handler:
    """A minimal OpenAI chat endpoint: streams ``answer(prompt)`` unless ``faults`` answers first."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompt = body["messages"][-1]["content"]
        fault = faults(request, prompt)
        if fault is not None:
            return fault
        text = answer(prompt)
        chunks = [
            {"choices": [{"delta": {"content": text}}]},
            {"choices": [], "usage": {"completion_tokens": 1}},
        ]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    return handle


def _run(path: Path, handler: Handler) -> SuiteReport:
    return asyncio.run(
        run_suite(
            load_suite(path), "http://fake/v1", {"candidate": "m"}, transport=httpx.MockTransport(handler)
        )
    )


def test_429_and_503_are_retried_and_the_answers_still_count(tmp_path: Path) -> None:
    path = _write_suite(tmp_path, _suite(["exact_match"], runner={"backoff_s": 0.01}), rows=4)
    seen: dict[str, int] = {}

    def faults(request: httpx.Request, prompt: str) -> httpx.Response | None:
        seen[prompt] = seen.get(prompt, 0) + 1
        if seen[prompt] == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, text="slow down")
        if seen[prompt] == 2 and prompt == "q0":
            return httpx.Response(503, text="busy")
        return None

    report = _run(path, _openai(lambda p: "a" + p[1:], faults))
    run = report.dataset("qa").runs["candidate"]
    assert report.complete and run.failures == 0 and run.metrics["exact_match"].value == 1.0
    assert {x.line: x.attempts for x in run.examples} == {1: 3, 2: 2, 3: 2, 4: 2}


def test_a_failed_request_is_counted_and_too_many_make_the_suite_an_error(tmp_path: Path) -> None:
    path = _write_suite(tmp_path, _suite(["exact_match"], runner={"max_failure_share": 0.25}), rows=4)

    def bad_q1(request: httpx.Request, prompt: str) -> httpx.Response | None:
        return httpx.Response(400, text="context too long") if prompt == "q1" else None

    report = _run(path, _openai(lambda p: "a" + p[1:], bad_q1))
    run = report.dataset("qa").runs["candidate"]
    assert run.failures == 1 and run.metrics["exact_match"].value == 0.75  # scored 0, not dropped
    (failed,) = [x for x in run.examples if x.error]
    assert failed.line == 2 and "HTTP 400: context too long" in failed.error

    def bad_two(request: httpx.Request, prompt: str) -> httpx.Response | None:
        return httpx.Response(400, text="nope") if prompt in ("q1", "q2") else None

    with pytest.raises(SuiteIncompleteError, match=r"2 of 4 requests failed .*first: qa line 2") as info:
        _run(path, _openai(lambda p: "a" + p[1:], bad_two))
    assert not info.value.report.complete
    assert "**INCOMPLETE**" in to_markdown(info.value.report)


def test_perplexity_is_left_out_of_the_default_suite_and_refused_where_the_server_is_shared(
    tmp_path: Path,
) -> None:
    data = tmp_path / "faq.jsonl"
    data.write_text('{"prompt": "q", "reference": "a"}\n')
    assert "perplexity" not in suite_for_dataset(data).suite.datasets[0].figures()
    assert "perplexity" in suite_for_dataset(data, perplexity=True).suite.datasets[0].figures()
    refuse_perplexity_on_shared_servers(suite_for_dataset(data), "faq.jsonl", "an evaluation Job")
    path = _write_suite(tmp_path, _suite(["exact_match", "perplexity"]))
    with pytest.raises(InvalidInputError) as refused:
        refuse_perplexity_on_shared_servers(load_suite(path), str(path), "an evaluation Job")
    said = refused.value.message
    assert said.startswith(f"{path}: datasets qa ask for perplexity, which an evaluation Job cannot")
    assert "vllm-project/vllm#16668" in said and refused.value.hint and "evals run" in refused.value.hint

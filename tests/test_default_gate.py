"""The default gate (the suite ``--dataset FILE`` builds) refuses a regression against the current prod.

The per-example scores are constructed (a real server cannot be made to answer 50 % vs 70 %); the
estimates, the paired bootstrap intervals and the verdict are the runner's and the gate's own code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.common.errors import ConfigError
from loraplane.evals.gates import evaluate_gate
from loraplane.evals.report import DatasetReport, ExampleResult, ModelRun, SuiteReport
from loraplane.evals.runner import _compare, _estimates
from loraplane.evals.suite import GatePolicy, LoadedSuite, suite_for_dataset

N = 40


def _default_suite(tmp_path: Path) -> LoadedSuite:
    data = tmp_path / "faq.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "reference": "a{i}"}}\n' for i in range(N)))
    return suite_for_dataset(data, perplexity=True)


def _report(loaded: LoadedSuite, correct: dict[str, int]) -> SuiteReport:
    """Each role answers the first ``correct[role]`` of the N examples right (so a better model is right
    wherever a worse one is: the differences are paired, as on one eval set)."""
    spec = loaded.suite.datasets[0]
    d = DatasetReport(name=spec.name, path=str(spec.path), n=N, figures=spec.figures())
    for role, right in correct.items():
        examples = [
            ExampleResult(
                line=i + 1,
                question=f"q{i}",
                reference=f"a{i}",
                answer=f"a{i}" if i < right else "wrong",
                scores={
                    "exact_match": float(i < right),
                    "contains": float(i < right),
                    "token_f1": float(i < right),
                },
                nll_sum=0.5 if i < right else 3.0,  # the reference is likelier where it is answered
                answer_tokens=1,
            )
            for i in range(N)
        ]
        run = ModelRun(role=role, model=role, n=N, failures=0, wall_s=1.0, examples=examples)
        run.metrics = _estimates(run, spec, loaded.suite)
        d.runs[role] = run
    d.comparisons = _compare(d, loaded.suite)
    return SuiteReport(
        suite=loaded.suite.name,
        suite_path=None,
        suite_sha256=loaded.sha256,
        endpoint="http://eval",
        models={role: role for role in correct},
        datasets=[d],
        complete=True,
        confidence=loaded.suite.bootstrap.confidence,
    )


def test_the_default_gate_refuses_a_candidate_worse_than_prod_beyond_noise(tmp_path: Path) -> None:
    """The issue's case: v2 at EM 0.50 beats the base model but prod answers 0.70."""
    loaded = _default_suite(tmp_path)
    assert loaded.suite.gate is not None
    result = evaluate_gate(loaded.suite.gate, _report(loaded, {"candidate": 20, "prod": 28, "base": 4}))
    verdicts = {c.rule: c.passed for c in result.checks}
    assert verdicts == {"beat_base": True, "not_worse_than_prod": False}
    assert not result.passed
    (failed,) = result.failures()
    assert failed.observed is not None and failed.observed < 0, "the CI's upper end is below zero"
    assert failed.message.startswith("exact_match on faq: improvement over prod -0.2 (95% CI upper end -")
    assert failed.message.endswith("must not be below -0); candidate 0.5 vs prod 0.7")


def test_the_default_gate_passes_a_candidate_within_noise_of_prod_and_skips_without_prod(
    tmp_path: Path,
) -> None:
    loaded = _default_suite(tmp_path)
    assert loaded.suite.gate is not None
    close = evaluate_gate(loaded.suite.gate, _report(loaded, {"candidate": 27, "prod": 28, "base": 4}))
    assert close.passed, [c.message for c in close.checks]
    (vs_prod,) = [c for c in close.checks if c.rule == "not_worse_than_prod"]
    assert vs_prod.passed is True and vs_prod.observed == 0.0, "one miss in 40: within noise"

    first = evaluate_gate(loaded.suite.gate, _report(loaded, {"candidate": 20, "base": 4}))
    assert first.passed, "no prod yet: only the base comparison decides"
    assert {c.rule: c.passed for c in first.checks} == {"beat_base": True, "not_worse_than_prod": None}


def test_a_margin_allows_a_small_regression_and_lower_is_better_figures_turn_around(tmp_path: Path) -> None:
    loaded = _default_suite(tmp_path)
    report = _report(loaded, {"candidate": 20, "prod": 28, "base": 4})
    lenient = evaluate_gate(GatePolicy(not_worse_than_prod={"exact_match": 0.3}), report)
    assert lenient.passed, lenient.checks[0].message
    # perplexity: lower is better; the candidate's is higher than prod's beyond noise
    ppl = GatePolicy(not_worse_than_prod={"perplexity": 0.0})
    (worse,) = evaluate_gate(ppl, report).checks
    assert worse.passed is False and "improvement over prod -" in worse.message
    (better,) = evaluate_gate(ppl, _report(loaded, {"candidate": 28, "prod": 20, "base": 4})).checks
    assert better.passed is True and "improvement over prod +" in better.message


@pytest.mark.parametrize(
    ("gate", "error"),
    [
        ({"not_worse_than_prod": {"exact_match": -0.1}}, "an allowed regression cannot be negative"),
        ({"not_worse_than_prod": {"e2e_p95_s": 0.0}}, "latency has no confidence interval"),
    ],
)
def test_the_rule_is_checked_like_the_others(gate: dict[str, object], error: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=error):
        GatePolicy.model_validate(gate)

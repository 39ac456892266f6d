"""Promotion gates: check a suite report against the suite's policy, one named check per rule."""

from __future__ import annotations

from loraplane.evals.metrics import FIGURES
from loraplane.evals.report import DatasetReport, GateResult, SuiteReport
from loraplane.evals.suite import GatePolicy, GateRule
from loraplane.registry.model import GateCheck


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _judge(
    rule: GateRule, metric: str, threshold: float, d: DatasetReport, report: SuiteReport
) -> tuple[bool | None, str, float | None, float | None]:
    """(passed, message, observed, reference) for one rule on one dataset."""
    info = FIGURES[metric]
    observed = report.figure(d.name, "candidate", metric)
    where = f"{metric} on {d.name}"
    if rule == "min_score":
        ok = observed is not None and observed >= threshold
        return ok, f"{where}: {_fmt(observed)} (minimum {_fmt(threshold)})", observed, None
    if rule == "max_score":
        ok = observed is not None and observed <= threshold
        return ok, f"{where}: {_fmt(observed)} (maximum {_fmt(threshold)})", observed, None
    if rule == "beat_base":
        base = report.figure(d.name, "base", metric)
        comp = next((c for c in d.comparisons if c.metric == metric and c.baseline == "base"), None)
        if comp is None or comp.delta.ci_low is None or comp.delta.ci_high is None:
            return False, f"{where}: no comparison with the base model", None, base
        # improvement = candidate - base (higher is better) or base - candidate (lower is better)
        higher = info.higher_is_better
        low = comp.delta.ci_low if higher else -comp.delta.ci_high
        gain = (comp.delta.value or 0.0) * (1 if higher else -1)
        message = (
            f"{where}: improvement over base {gain:+.4g} ({report.confidence:.0%} CI lower end {low:+.4g}, "
            f"must exceed {threshold:+.4g}); candidate {_fmt(observed)} vs base {_fmt(base)}"
        )
        return low > threshold, message, low, base
    # not_worse_than_prod / max_regression / max_latency_increase: versus the current prod
    prod = report.figure(d.name, "prod", metric)
    if "prod" not in report.models:
        return None, f"{where}: skipped (no prod version to compare with)", observed, None
    if rule == "not_worse_than_prod":
        comp = next((c for c in d.comparisons if c.metric == metric and c.baseline == "prod"), None)
        if comp is None or comp.delta.ci_low is None or comp.delta.ci_high is None:
            return False, f"{where}: no comparison with prod (the candidate or prod run failed)", None, prod
        # the upper end of the improvement's interval: below zero, the candidate is worse beyond noise
        higher = info.higher_is_better
        high = comp.delta.ci_high if higher else -comp.delta.ci_low
        gain = (comp.delta.value or 0.0) * (1 if higher else -1)
        message = (
            f"{where}: improvement over prod {gain:+.4g} ({report.confidence:.0%} CI upper end {high:+.4g}, "
            f"must not be below {-threshold:+.4g}); candidate {_fmt(observed)} vs prod {_fmt(prod)}"
        )
        return high >= -threshold, message, high, prod
    if observed is None or prod is None:
        return False, f"{where}: no value to compare (the candidate or prod run failed)", observed, prod
    worse = (prod - observed) if info.higher_is_better else (observed - prod)
    if rule == "max_regression":
        message = (
            f"{where}: candidate {_fmt(observed)} vs prod {_fmt(prod)} "
            f"(regression {worse:+.4g}, allowed {threshold:.4g})"
        )
        return worse <= threshold, message, observed, prod
    increase = worse / prod if prod > 0 else 0.0
    message = (
        f"{where}: candidate {_fmt(observed)} vs prod {_fmt(prod)} "
        f"({increase:+.1%} slower, allowed {threshold:.0%})"
    )
    return increase <= threshold, message, observed, prod


def evaluate_gate(policy: GatePolicy, report: SuiteReport) -> GateResult:
    """Every rule on every dataset it names; skipped checks (no prod yet) do not fail the gate."""
    checks: list[GateCheck] = []
    for rule, key, threshold in policy.rules():
        dataset_name, _, metric = key.rpartition("/")
        for d in report.datasets:
            if (dataset_name and d.name != dataset_name) or metric not in d.figures:
                continue
            passed, message, observed, reference = _judge(rule, metric, threshold, d, report)
            checks.append(
                GateCheck(
                    rule=rule,
                    dataset=d.name,
                    metric=metric,
                    threshold=threshold,
                    observed=observed,
                    reference=reference,
                    passed=passed,
                    message=message,
                )
            )
    return GateResult(passed=all(c.passed is not False for c in checks), checks=checks)

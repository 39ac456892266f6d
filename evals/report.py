"""What an eval suite run produces: per dataset, per model, per metric, with intervals and a verdict.

The JSON form of :class:`SuiteReport` is the machine-readable report; :mod:`.render` turns it into
Markdown and a PNG chart. A report with ``complete: false`` is partial (the run stopped early) and is
never stored as an evaluation result.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from loraplane.registry.model import GateCheck

ROLE_ORDER = ("candidate", "prod", "base")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ExampleResult(BaseModel):
    line: int
    question: str
    reference: str
    answer: str | None = None
    error: str | None = None
    attempts: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    completion_tokens: int | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    nll_sum: float | None = Field(default=None, description="Summed NLL of the reference answer's tokens.")
    answer_tokens: int | None = None
    perplexity_error: str | None = None


class Estimate(BaseModel):
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = Field(description="Examples the figure is computed over.")


class ModelRun(BaseModel):
    role: str
    model: str
    n: int
    failures: int = Field(description="Examples whose request failed (scored 0, never dropped).")
    wall_s: float
    metrics: dict[str, Estimate] = Field(default_factory=dict)
    examples: list[ExampleResult] = Field(default_factory=list)


class Comparison(BaseModel):
    metric: str
    candidate: str = "candidate"
    baseline: str
    delta: Estimate = Field(description="candidate minus baseline, with a paired bootstrap interval.")
    verdict: Literal["better", "worse", "within noise", "n/a"]


class DatasetReport(BaseModel):
    name: str
    path: str
    n: int
    figures: list[str]
    runs: dict[str, ModelRun] = Field(default_factory=dict)
    comparisons: list[Comparison] = Field(default_factory=list)


class GateResult(BaseModel):
    passed: bool
    checks: list[GateCheck]

    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if c.passed is False]


class SuiteReport(BaseModel):
    report_version: Literal[1] = 1
    suite: str
    suite_path: str | None
    suite_sha256: str
    endpoint: str
    models: dict[str, str] = Field(description="role (candidate, prod, base, ...) -> model name sent.")
    created_at: str = Field(default_factory=_now)
    finished_at: str | None = None
    complete: bool = False
    error: str | None = None
    confidence: float = 0.95
    datasets: list[DatasetReport] = Field(default_factory=list)
    gate: GateResult | None = None

    def dataset(self, name: str) -> DatasetReport:
        return next(d for d in self.datasets if d.name == name)

    def figure(self, dataset: str, role: str, metric: str) -> float | None:
        run = self.dataset(dataset).runs.get(role)
        estimate = run.metrics.get(metric) if run else None
        return estimate.value if estimate else None

    def scores(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """dataset -> role -> figure -> value: the summary kept in the registry."""
        return {
            d.name: {role: {m: e.value for m, e in run.metrics.items()} for role, run in d.runs.items()}
            for d in self.datasets
        }

    def roles(self) -> list[str]:
        return sorted(self.models, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 99, r))


__all__ = [
    "Comparison",
    "DatasetReport",
    "Estimate",
    "ExampleResult",
    "GateResult",
    "ModelRun",
    "SuiteReport",
]

"""The result of evaluating one model on one eval set."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field


class ExampleResult(BaseModel):
    line: int
    expected: str
    answer: str | None
    error: str | None = None
    latency_s: float | None = None
    scores: dict[str, float] = Field(default_factory=dict)


class EvalReport(BaseModel):
    model: str = Field(description="The model name sent to the endpoint (adapter served name or base).")
    dataset: str
    endpoint: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    n: int
    failures: int
    metrics: dict[str, float]
    mean_latency_s: float | None
    examples: list[ExampleResult] = Field(default_factory=list)

    def score(self, metric: str = "exact_match") -> float:
        return self.metrics[metric]

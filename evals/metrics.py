"""The metrics an eval suite can ask for, and how one answer is scored against its reference.

Answer-scoring metrics give each example a score in [0, 1]; a suite reports their mean with a
bootstrap confidence interval. ``perplexity`` scores the reference answer's tokens through the live
server; ``latency`` summarises the timings of the generation requests.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

Scorer = Callable[[str, str], float]  # (answer, reference) -> score in [0, 1]
Kind = Literal["score", "perplexity", "latency"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (SQuAD-style normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    return float(normalize(reference) in normalize(answer))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token-level F1 on normalised words."""
    got, want = normalize(answer).split(), normalize(reference).split()
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure from Google's reference implementation (``rouge-score``)."""
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def json_valid(answer: str, reference: str) -> float:
    try:
        json.loads(answer.strip())
    except ValueError:
        return 0.0
    return 1.0


def regex_scorer(pattern: str | None) -> Scorer:
    """``pattern`` searched in the answer; without one, the reference must match the whole answer."""
    if pattern is not None:
        compiled = re.compile(pattern)
        return lambda answer, reference: float(compiled.search(answer) is not None)
    return lambda answer, reference: float(re.fullmatch(reference, answer.strip()) is not None)


def json_schema_scorer(schema: dict[str, Any]) -> Scorer:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)

    def score(answer: str, reference: str) -> float:
        try:
            value = json.loads(answer.strip())
        except ValueError:
            return 0.0
        return float(validator.is_valid(value))

    return score


@dataclass(frozen=True)
class MetricInfo:
    name: str
    kind: Kind
    higher_is_better: bool
    description: str


# Everything a suite can name, and the figures each one reports.
SCORE_METRICS: dict[str, str] = {
    "exact_match": "answer equals the reference after normalisation",
    "contains": "the normalised reference occurs in the answer",
    "regex": "the answer matches a pattern (or the reference, as a pattern)",
    "json_valid": "the answer parses as JSON",
    "json_schema": "the answer is JSON that conforms to a JSON schema",
    "token_f1": "SQuAD token-level F1 against the reference",
    "rouge_l": "ROUGE-L F-measure against the reference",
}
PERPLEXITY_FIGURES: dict[str, MetricInfo] = {
    "perplexity": MetricInfo(
        "perplexity", "perplexity", False, "exp(mean NLL) of the reference answer's tokens"
    ),
    "nll": MetricInfo("nll", "perplexity", False, "mean negative log-likelihood per reference token"),
}
LATENCY_FIGURES: dict[str, MetricInfo] = {
    name: MetricInfo(name, "latency", higher, desc)
    for name, higher, desc in (
        ("ttft_p50_s", False, "median time to first token (streaming)"),
        ("ttft_p95_s", False, "95th percentile time to first token"),
        ("e2e_p50_s", False, "median end-to-end request time"),
        ("e2e_p95_s", False, "95th percentile end-to-end request time"),
        ("output_tokens_per_s", True, "median per-request output tokens per second"),
    )
}
FIGURES: dict[str, MetricInfo] = {
    **{n: MetricInfo(n, "score", True, d) for n, d in SCORE_METRICS.items()},
    **PERPLEXITY_FIGURES,
    **LATENCY_FIGURES,
}

SIMPLE_SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "contains": contains,
    "json_valid": json_valid,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def figures_for(metric: str) -> list[str]:
    """The reported figures a requested metric produces."""
    if metric == "perplexity":
        return list(PERPLEXITY_FIGURES)
    if metric == "latency":
        return list(LATENCY_FIGURES)
    return [metric]

"""Eval suites: a YAML file naming datasets, the metrics to compute on each, and a promotion gate.

Example (paths are relative to the suite file)::

    name: support-bot
    datasets:
      - name: faq
        path: faq-eval.jsonl
        max_tokens: 64
        metrics: [exact_match, token_f1, rouge_l, perplexity, latency]
      - name: tickets-json
        path: tickets.jsonl
        metrics:
          - json_valid
          - {name: json_schema, schema_file: ticket.schema.json}
          - {name: regex, pattern: '"priority": "(low|high)"'}
    runner: {concurrency: 8, timeout_s: 60, retries: 3, max_failure_share: 0.05}
    gate:
      min_score: {exact_match: 0.6}              # every dataset that computes it
      beat_base: {faq/exact_match: 0.0}         # lower end of the CI of (candidate - base) above this
      not_worse_than_prod: {exact_match: 0.0}   # upper end of the CI of (candidate - prod) above -this
      max_regression: {token_f1: 0.02}          # at most this far below the current prod
      max_score: {perplexity: 20}               # for lower-is-better figures
      max_latency_increase: {e2e_p95_s: 0.25}   # relative to prod: 0.25 = 25 % slower

Every mistake is reported before any request is sent, naming the field, the value and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplane.common.errors import ConfigError, InvalidInputError, format_validation_error
from loraplane.evals.dataset import EvalExample, load_eval_set
from loraplane.evals.metrics import FIGURES, LATENCY_FIGURES, figures_for

MetricName = Literal[
    "exact_match",
    "contains",
    "regex",
    "json_valid",
    "json_schema",
    "token_f1",
    "rouge_l",
    "perplexity",
    "latency",
]
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(_Strict):
    name: MetricName
    pattern: str | None = Field(default=None, description="regex: searched in the answer.")
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="schema", description="json_schema: inline."
    )
    schema_file: Path | None = Field(
        default=None, description="json_schema: a JSON file, relative to the suite."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _params_fit(self) -> MetricSpec:
        if self.pattern is not None:
            if self.name != "regex":
                raise ValueError(f"'pattern' only applies to the regex metric, not {self.name}")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {self.pattern!r} is not a valid regular expression: {exc}"
                ) from None
        has_schema = self.json_schema is not None or self.schema_file is not None
        if self.name == "json_schema" and not has_schema:
            raise ValueError("json_schema needs 'schema' (inline) or 'schema_file'")
        if has_schema and self.name != "json_schema":
            raise ValueError(f"'schema'/'schema_file' only apply to json_schema, not {self.name}")
        if self.json_schema is not None:
            _check_schema(self.json_schema, "schema")
        return self


def _check_schema(schema: dict[str, Any], where: str) -> None:
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"{where} is not a valid JSON schema: {exc.message}") from None


class DatasetSpec(_Strict):
    name: str = Field(description="Short name used in reports and gate keys (lowercase, digits, - and _).")
    path: Path = Field(description="JSONL eval set, relative to the suite file.")
    metrics: list[MetricSpec] = Field(min_length=1)
    max_tokens: int = Field(default=32, ge=1, le=32768, description="Answer length limit per request.")
    system_prompt: str | None = Field(default=None, description="Prepended to examples that have none.")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("use lowercase letters, digits, '-' and '_', starting with a letter or digit")
        return value

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[MetricSpec]) -> list[MetricSpec]:
        names = [m.name for m in value]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"metric(s) listed twice: {', '.join(sorted(dup))}")
        return value

    def figures(self) -> list[str]:
        return [f for m in self.metrics for f in figures_for(m.name)]

    def wants(self, metric: str) -> bool:
        return any(m.name == metric for m in self.metrics)


class RunnerOptions(_Strict):
    concurrency: int = Field(default=4, ge=1, le=512, description="Requests in flight per model.")
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout.")
    retries: int = Field(default=3, ge=0, le=20, description="Retries on 429, 5xx and connection errors.")
    backoff_s: float = Field(default=0.5, ge=0, le=60, description="First retry delay; doubles each time.")
    max_failure_share: float = Field(
        default=0.1, ge=0, le=1, description="More failed requests than this share make the suite an error."
    )
    seed: int = Field(default=0, description="Sampling seed sent with every request (temperature is 0).")
    stream: bool = Field(default=True, description="Stream answers (needed for time to first token).")


class BootstrapOptions(_Strict):
    resamples: int = Field(default=2000, ge=100, le=100_000)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    seed: int = 0


GateRule = Literal[
    "min_score", "max_score", "beat_base", "not_worse_than_prod", "max_regression", "max_latency_increase"
]


class GatePolicy(_Strict):
    """Promotion policy. Keys are ``metric`` (every dataset computing it) or ``dataset/metric``."""

    min_score: dict[str, float] = Field(default_factory=dict, description="Floors, higher-is-better figures.")
    max_score: dict[str, float] = Field(
        default_factory=dict, description="Ceilings, lower-is-better figures."
    )
    beat_base: dict[str, float] = Field(
        default_factory=dict, description="Lower CI bound of (candidate - base) must exceed this."
    )
    not_worse_than_prod: dict[str, float] = Field(
        default_factory=dict,
        description="Upper CI bound of (candidate - prod) must not be below minus this: refuses a "
        "candidate worse than the current prod beyond noise (and this margin).",
    )
    max_regression: dict[str, float] = Field(
        default_factory=dict, description="Largest allowed move in the bad direction versus prod (absolute)."
    )
    max_latency_increase: dict[str, float] = Field(
        default_factory=dict, description="Largest allowed relative latency increase versus prod."
    )

    def rules(self) -> list[tuple[GateRule, str, float]]:
        out: list[tuple[GateRule, str, float]] = []
        for rule in get_args(GateRule):
            out.extend((rule, key, threshold) for key, threshold in getattr(self, rule).items())
        return out

    @model_validator(mode="after")
    def _keys_make_sense(self) -> GatePolicy:
        for rule, key, threshold in self.rules():
            metric = key.rsplit("/", 1)[-1]
            info = FIGURES.get(metric)
            if info is None:
                known = ", ".join(FIGURES)
                raise ValueError(f"{rule}.{key}: unknown metric {metric!r} (known: {known})")
            if rule == "min_score" and not info.higher_is_better:
                raise ValueError(f"{rule}.{key}: lower is better for {metric}; use max_score for a ceiling")
            if rule == "max_score" and info.higher_is_better:
                raise ValueError(f"{rule}.{key}: higher is better for {metric}; use min_score for a floor")
            if rule in ("beat_base", "not_worse_than_prod") and info.kind == "latency":
                raise ValueError(
                    f"{rule}.{key}: latency has no confidence interval; use max_latency_increase"
                )
            if rule == "max_latency_increase" and metric not in LATENCY_FIGURES:
                raise ValueError(f"{rule}.{key}: only latency figures ({', '.join(LATENCY_FIGURES)}) apply")
            if rule in ("not_worse_than_prod", "max_regression", "max_latency_increase") and threshold < 0:
                raise ValueError(f"{rule}.{key}: got {threshold}; an allowed regression cannot be negative")
        return self


class EvalSuite(_Strict):
    name: str
    description: str | None = None
    datasets: list[DatasetSpec] = Field(min_length=1)
    runner: RunnerOptions = Field(default_factory=RunnerOptions)
    bootstrap: BootstrapOptions = Field(default_factory=BootstrapOptions)
    gate: GatePolicy | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> EvalSuite:
        names = [d.name for d in self.datasets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"datasets: name(s) used twice: {', '.join(sorted(dup))}")
        if self.gate is not None:
            for rule, key, _ in self.gate.rules():
                dataset, _, metric = key.rpartition("/")
                targets = [d for d in self.datasets if not dataset or d.name == dataset]
                if dataset and not targets:
                    raise ValueError(
                        f"gate.{rule}.{key}: no dataset named {dataset!r} (have: {', '.join(names)})"
                    )
                if not any(metric in d.figures() for d in targets):
                    raise ValueError(
                        f"gate.{rule}.{key}: {metric} is not computed on "
                        f"{'dataset ' + repr(dataset) if dataset else 'any dataset'}; add its metric to "
                        "the dataset's metrics list"
                    )
        return self


class LoadedSuite:
    """A validated suite with its datasets read and checked."""

    def __init__(
        self, suite: EvalSuite, path: Path | None, datasets: dict[str, tuple[Path, list[EvalExample]]]
    ):
        self.suite = suite
        self.path = path
        self.datasets = datasets
        self.schemas: dict[str, dict[str, Any]] = {}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.suite.model_dump_json(by_alias=True).encode()).hexdigest()


def load_suite(path: Path) -> LoadedSuite:
    """Read a suite file, validate it, and load every dataset it names (errors name file and line)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such eval suite file", hint="check the path given to --suite")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an eval suite is a YAML mapping with 'name' and 'datasets'")
    try:
        suite = EvalSuite.model_validate(raw)
    except ValidationError as exc:
        raise format_validation_error(exc, source=str(path)) from None
    return _load_datasets(suite, path)


PROMPT_LOGPROBS_HAZARD = (
    "perplexity needs the prompt's log-probabilities (echo + logprobs), which vLLM 0.32 computes with the "
    "wrong LoRA mapping: its engine dies when another request shares the batch (vllm-project/vllm#16668), "
    "and a server in a cluster always has other requests (every pod's readiness completion, users)"
)


def refuse_perplexity_on_shared_servers(loaded: LoadedSuite, source: str, where: str) -> None:
    """Raise :class:`InvalidInputError` when ``loaded`` asks for perplexity and runs ``where`` (a server
    with other traffic: a cluster's vLLM pods)."""
    with_perplexity = [d.name for d in loaded.suite.datasets if d.wants("perplexity")]
    if with_perplexity:
        raise InvalidInputError(
            f"{source}: datasets {', '.join(with_perplexity)} ask for perplexity, which {where} cannot "
            f"measure safely: {PROMPT_LOGPROBS_HAZARD}",
            hint="drop perplexity from the suite's metrics there; measure it with loraplane evals run "
            "-e URL against a vLLM server that serves nothing else",
        )


def suite_for_dataset(dataset: Path, *, max_tokens: int = 16, perplexity: bool = False) -> LoadedSuite:
    """The suite ``--dataset FILE`` means: the common metrics, gated on beating the base model and on
    not being worse than the current prod (both beyond noise: bootstrap CIs of paired differences).

    ``perplexity`` only for a server the eval has to itself (the quickstart's): it needs prompt
    log-probabilities, which kill vLLM 0.32's engine when another request shares the batch on a
    LoRA server (:data:`PROMPT_LOGPROBS_HAZARD`)."""
    suite = EvalSuite(
        name=dataset.stem,
        datasets=[
            DatasetSpec(
                name=_slugify(dataset.stem),
                path=dataset.resolve(),
                max_tokens=max_tokens,
                metrics=[
                    MetricSpec(name=m)
                    for m in ("exact_match", "contains", "token_f1", "perplexity", "latency")
                    if perplexity or m != "perplexity"
                ],
            )
        ],
        gate=GatePolicy(beat_base={"exact_match": 0.0}, not_worse_than_prod={"exact_match": 0.0}),
    )
    return _load_datasets(suite, None)


def _slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    return slug or "dataset"


def _load_datasets(suite: EvalSuite, path: Path | None) -> LoadedSuite:
    base = path.parent if path is not None else Path.cwd()
    datasets: dict[str, tuple[Path, list[EvalExample]]] = {}
    for spec in suite.datasets:
        file = spec.path if spec.path.is_absolute() else base / spec.path
        datasets[spec.name] = (file, load_eval_set(file))
    loaded = LoadedSuite(suite, path, datasets)
    for spec in suite.datasets:
        for metric in spec.metrics:
            if metric.name != "json_schema":
                continue
            schema = metric.json_schema
            if metric.schema_file is not None:
                file = metric.schema_file if metric.schema_file.is_absolute() else base / metric.schema_file
                try:
                    schema = json.loads(file.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise ConfigError(
                        f"{path}: datasets.{spec.name}.metrics.json_schema.schema_file: "
                        f"cannot read {file} ({exc})"
                    ) from None
                try:
                    _check_schema(schema, str(file))
                except ValueError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
            assert schema is not None
            loaded.schemas[spec.name] = schema
    return loaded

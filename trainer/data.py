"""Training data: read, check, render and tokenize every row before anything is trained.

The public API is :func:`load_tokenizer`, :func:`prepare_datasets` (for training: raises
:class:`~loraplane.common.jsonl.DatasetError`, exit code 2, when the data is not usable) and
:func:`validate_dataset` (for ``loraplane data validate``: the same checks, returns the reports). Both
read the whole dataset and report *every* problem, grouped by error class with the first line
numbers of each, instead of stopping at the first bad line.

The pipeline, one module per step:

1. :mod:`~loraplane.trainer.data_sources` reads JSONL, Parquet or a `datasets` split into numbered raw
   rows (file-level problems: unreadable, empty file, byte order mark, invalid UTF-8, JSON array file;
   row-level: not JSON, not an object);
2. :mod:`~loraplane.trainer.chat_format` turns a row (chat ``messages``, ``prompt``/``completion`` or
   Alpaca ``instruction``/``input``/``output``) into a checked conversation;
3. :mod:`~loraplane.trainer.chat_render` renders it with the tokenizer's chat template and builds the
   labels (assistant replies only by default; ``weight: 0`` replies never);
4. here: rows with no trained token are errors, rows longer than ``max_seq_length`` are dropped and
   counted (never truncated), and the verdict is taken (:meth:`DataReport.failures`).

A dataset fails when it has any structural error (every class but ``over_length``, see
:mod:`~loraplane.trainer.data_errors`), when the share of over-length rows (of the non-blank rows read)
exceeds ``dataset.max_overlength_share``, or when fewer than ``dataset.min_examples`` usable training
rows remain (after any ``eval_fraction`` hold-out). A held-out set fails when it has no usable row.

Transformers is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraplane.common.errors import InvalidInputError
from loraplane.common.jsonl import DatasetError
from loraplane.trainer.chat_format import Turn, normalize_row
from loraplane.trainer.chat_render import IGNORE_INDEX, ChatRenderer, Rendered, TemplateError, check_template
from loraplane.trainer.data_errors import ERROR_CLASSES, OVER_LENGTH, RowProblem
from loraplane.trainer.data_sources import RawSource, read_hub, read_path

if TYPE_CHECKING:
    from loraplane.trainer.config import BaseModelSpec, DatasetSpec

FIRST_LINES = 5  # line numbers kept per error class
TOKENIZE_BATCH = 512


@dataclass(frozen=True)
class TokenizedExample:
    row: int  # 1-based line number (JSONL) or row number (Parquet, datasets)
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; -100 where nothing is trained

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def total_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class ErrorSummary:
    """One error class in one file: how many rows, the first line numbers, the first message."""

    kind: str
    count: int = 0
    first_lines: list[int] = field(default_factory=list)
    example: str = ""  # the first occurrence, located: "FILE:LINE: message"

    @property
    def label(self) -> str:
        return ERROR_CLASSES[self.kind]


@dataclass(frozen=True)
class LengthStats:
    """Tokens per usable row after templating (nearest-rank percentiles)."""

    min: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, lengths: list[int]) -> LengthStats | None:
        if not lengths:
            return None
        v = sorted(lengths)

        def pct(p: float) -> int:
            return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]

        return cls(v[0], sum(v) / len(v), pct(50), pct(90), pct(99), v[-1])


@dataclass
class DataReport:
    """Everything known about one file or split: what is usable, what is wrong and where."""

    source: str  # a path, or "hub:NAME[split]"
    rows: int = 0  # non-blank rows read, usable or not
    usable: list[TokenizedExample] = field(default_factory=list)
    errors: dict[str, ErrorSummary] = field(default_factory=dict)
    sha256: str = ""
    unit: str = "line"  # what row numbers count: "line" (JSONL) or "row" (Parquet, datasets)
    role: str = "train"  # "train" or "eval"
    max_seq_length: int = 0
    held_out: int = 0  # usable rows moved to the eval set by dataset.eval_fraction
    # The thresholds to_text() and to_dict() take their verdict with.
    min_examples: int = 1
    max_overlength_share: float = 0.0

    def add_error(self, kind: str, row: int, message: str) -> None:
        summary = self.errors.get(kind)
        if summary is None:
            summary = self.errors[kind] = ErrorSummary(kind, example=self.locate(row, message))
        summary.count += 1
        if len(summary.first_lines) < FIRST_LINES:
            summary.first_lines.append(row)

    def locate(self, row: int, message: str) -> str:
        return (
            f"{self.source}:{row}: {message}"
            if self.unit == "line"
            else f"{self.source} row {row}: {message}"
        )

    @property
    def lengths(self) -> LengthStats | None:
        return LengthStats.of([len(e.input_ids) for e in self.usable])

    @property
    def total_tokens(self) -> int:
        """Tokens per epoch: every usable row once (before padding or packing)."""
        return sum(e.total_tokens for e in self.usable)

    @property
    def trained_tokens(self) -> int:
        """Tokens per epoch that carry a loss."""
        return sum(e.trained_tokens for e in self.usable)

    @property
    def dropped_over_length(self) -> int:
        """Rows dropped for being longer than max_seq_length."""
        summary = self.errors.get(OVER_LENGTH)
        return summary.count if summary else 0

    def _count(self, n: int) -> str:
        return f"{n} {self.unit}{'' if n == 1 else 's'}"

    def failures(self, *, min_examples: int, max_overlength_share: float) -> list[str]:
        """Why this data cannot be trained on, one reason per line; ``[]`` means usable."""
        reasons = []
        for kind, s in self._ordered_errors():
            if kind == OVER_LENGTH:
                share = s.count / self.rows if self.rows else 1.0
                if share > max_overlength_share:
                    reasons.append(
                        f"{kind}: {s.count} of {self._count(self.rows)} ({share:.1%}) are longer than "
                        f"max_seq_length {self.max_seq_length} after templating; "
                        f"dataset.max_overlength_share allows {max_overlength_share:.1%} to be dropped"
                    )
                continue
            where = ", ".join(map(str, s.first_lines)) + (", ..." if s.count > len(s.first_lines) else "")
            plural = "s" if len(s.first_lines) > 1 else ""
            reasons.append(f"{kind} ({s.label}): {self._count(s.count)} ({self.unit}{plural} {where})")
        n = len(self.usable)
        if n < min_examples:
            after = f" after holding out {self.held_out} for evaluation" if self.held_out else ""
            if self.role == "eval":
                reasons.append(f"no usable evaluation example (at least {min_examples} needed)")
            else:
                reasons.append(
                    f"only {n} usable example{'' if n == 1 else 's'}{after}; at least {min_examples} "
                    "needed (dataset.min_examples)"
                )
        return reasons

    def _ordered_errors(self) -> list[tuple[str, ErrorSummary]]:
        return [(k, self.errors[k]) for k in ERROR_CLASSES if k in self.errors]

    def _verdict(self) -> list[str]:
        return self.failures(min_examples=self.min_examples, max_overlength_share=self.max_overlength_share)

    def to_text(self) -> str:
        """The report people read: rows, errors by class with first lines, lengths, verdict."""
        unit = self.unit
        out = [f"{self.role}: {self.source}"]

        def kv(key: str, value: str) -> None:
            out.append(f"  {key:<18} {value}")

        kv("rows read", str(self.rows))
        usable = str(len(self.usable))
        if self.held_out:
            usable += f" (plus {self.held_out} held out for evaluation)"
        kv("usable", usable)
        if self.sha256:
            kv("sha256", self.sha256)
        errors = self._ordered_errors()
        if not errors:
            kv("errors", "none")
        else:
            total = sum(s.count for _, s in errors)
            kv("errors", f"{self._count(total)} in {len(errors)} class{'' if len(errors) == 1 else 'es'}")
            width = max(len(k) for k, _ in errors)
            cells = []
            for kind, s in errors:
                lines = ", ".join(map(str, s.first_lines)) + (", ..." if s.count > len(s.first_lines) else "")
                cells.append((kind, str(s.count), f"{unit}{'s' if len(s.first_lines) > 1 else ''} {lines}"))
            count_w = max(len(c) for _, c, _ in cells)
            where_w = max(len(w) for _, _, w in cells)
            for (kind, count, where), (_, s) in zip(cells, errors, strict=True):
                label = s.label + (f" ({self.max_seq_length})" if kind == OVER_LENGTH else "")
                out.append(f"    {kind:<{width}}  {count:>{count_w}}  {where:<{where_w}}  {label}")
            out.append("  first of each")
            for kind, s in errors:
                out.append(f"    {kind:<{width}}  {s.example}")
        stats = self.lengths
        if stats is None:
            kv("tokens per row", "n/a (no usable rows)")
        else:
            kv(
                "tokens per row",
                f"min {stats.min}  mean {stats.mean:.1f}  p50 {stats.p50}  p90 {stats.p90}  "
                f"p99 {stats.p99}  max {stats.max}  (max_seq_length {self.max_seq_length})",
            )
        kv("tokens per epoch", f"{self.total_tokens:,} (trained: {self.trained_tokens:,})")
        reasons = self._verdict()
        kv("verdict", "FAIL" if reasons else "OK")
        out.extend(f"    - {r}" for r in reasons)
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        stats = self.lengths
        reasons = self._verdict()
        return {
            "role": self.role,
            "source": self.source,
            "unit": self.unit,
            "sha256": self.sha256,
            "rows": self.rows,
            "usable": len(self.usable),
            "held_out": self.held_out,
            "max_seq_length": self.max_seq_length,
            "errors": {
                k: {"label": s.label, "count": s.count, "first_lines": s.first_lines, "example": s.example}
                for k, s in self._ordered_errors()
            },
            "token_lengths": None if stats is None else stats.__dict__.copy(),
            "tokens_per_epoch": self.total_tokens,
            "trained_tokens_per_epoch": self.trained_tokens,
            "ok": not reasons,
            "failures": reasons,
        }


@dataclass
class PreparedData:
    train: DataReport
    eval: DataReport | None
    # Fingerprint of the data: the training source's sha256 (file bytes; for `datasets`, the rows as
    # canonical JSON), or, with a separate eval file or split, sha256 of "TRAIN_SHA\nEVAL_SHA\n".
    # The eval_fraction hold-out comes from the training data (and training.seed), so adds nothing.
    sha256: str

    @property
    def reports(self) -> list[DataReport]:
        return [self.train] + ([self.eval] if self.eval is not None else [])

    def failures(self) -> list[str]:
        """Every reason, prefixed with ``train:`` or ``eval:``; ``[]`` means ready to train."""
        return [
            f"{r.role}: {reason}"
            for r in self.reports
            for reason in r.failures(min_examples=r.min_examples, max_overlength_share=r.max_overlength_share)
        ]

    def to_text(self) -> str:
        return "\n\n".join(r.to_text() for r in self.reports)

    def to_dict(self) -> dict[str, Any]:
        reasons = self.failures()
        return {
            "sha256": self.sha256,
            "ok": not reasons,
            "failures": reasons,
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict() if self.eval is not None else None,
        }


def load_tokenizer(spec: BaseModelSpec) -> Any:
    """The base model's fast tokenizer, with a usable chat template and a pad token.

    ``base_model.chat_template`` (a Jinja file) replaces the tokenizer's own template. The template
    is tried on a small two-turn conversation here, so a broken or non-prefix-stable one fails before
    any data is read. Raises :class:`InvalidInputError` (exit code 2) naming the field to change.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(
            f"base_model.path: cannot load a tokenizer from {spec.path!r}: {exc}",
            hint="give a local model directory or a hub id (set HF_TOKEN for gated models)",
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError(
            f"base_model.path: {spec.path!r} has only a slow (Python) tokenizer; loraplane needs a fast one "
            "(tokenizer.json) to map tokens to characters for the loss mask",
            hint="save a fast tokenizer into the model directory (AutoTokenizer.from_pretrained(..., "
            "use_fast=True).save_pretrained(DIR) with the tokenizers library installed)",
        )
    where = f"base_model.path ({spec.path})"
    if spec.chat_template is not None:
        where = f"base_model.chat_template ({spec.chat_template})"
        try:
            template = spec.chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(
                f"base_model.chat_template: cannot read {spec.chat_template}: {exc}"
            ) from None
        if not template.strip():
            raise InvalidInputError(f"base_model.chat_template: {spec.chat_template} is empty")
        tokenizer.chat_template = template
    elif not tokenizer.chat_template:
        raise InvalidInputError(
            f"base_model.path: {spec.path!r} has no chat template, so conversations cannot be rendered "
            "the way the model will be prompted",
            hint="give base_model.chat_template (a Jinja chat template file), or use an instruct/chat "
            "variant of the model",
        )
    try:
        check_template(tokenizer)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc.message}", hint=exc.hint) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_rows(raw: RawSource, fmt: str, renderer: ChatRenderer, max_seq_length: int) -> DataReport:
    report = DataReport(
        source=raw.name, rows=raw.rows, sha256=raw.sha256, unit=raw.unit, max_seq_length=max_seq_length
    )
    for err in raw.errors:
        report.add_error(err.kind, err.row, err.message)
    pending: list[tuple[int, list[Turn], Rendered]] = []

    def flush() -> None:
        tokenized = renderer.tokenize([r for _, _, r in pending])
        for (row, turns, _), (ids, labels) in zip(pending, tokenized, strict=True):
            if all(label == IGNORE_INDEX for label in labels):
                if all(t.weight == 0 for t in turns if t.role == "assistant"):
                    why = "every assistant reply has weight 0, so nothing in this row is trained"
                else:
                    why = "no token of this row is trained (the template renders no assistant text)"
                report.add_error("zero_trainable_tokens", row, why)
            elif len(ids) > max_seq_length:
                report.add_error(
                    OVER_LENGTH,
                    row,
                    f"{len(ids)} tokens after templating, more than max_seq_length {max_seq_length}; "
                    "the row is dropped, never truncated",
                )
            else:
                report.usable.append(TokenizedExample(row, ids, labels))
        pending.clear()

    for row, obj in raw.records:
        try:
            turns = normalize_row(obj, fmt)
            rendered = renderer.render(turns)
        except RowProblem as problem:
            report.add_error(problem.kind, row, problem.message)
            continue
        pending.append((row, turns, rendered))
        if len(pending) >= TOKENIZE_BATCH:
            flush()
    flush()
    return report


def _check_preference_rows(
    raw: RawSource, fmt: str, renderer: ChatRenderer, max_seq_length: int
) -> DataReport:
    from loraplane.trainer.preference_data import check_preference_rows

    report = DataReport(
        source=raw.name, rows=raw.rows, sha256=raw.sha256, unit=raw.unit, max_seq_length=max_seq_length
    )
    for err in raw.errors:
        report.add_error(err.kind, err.row, err.message)
    report.usable.extend(check_preference_rows(raw.records, fmt, renderer, max_seq_length, report.add_error))
    return report


def _hold_out(train: DataReport, fraction: float, seed: int) -> DataReport:
    """Move ``fraction`` of the usable rows (at least one; a seeded shuffle) into an eval report."""
    n = len(train.usable)
    k = min(n, max(1, round(n * fraction)))
    chosen = set(random.Random(seed).sample(range(n), k))
    held = [e for i, e in enumerate(train.usable) if i in chosen]
    train.usable = [e for i, e in enumerate(train.usable) if i not in chosen]
    train.held_out = k
    return DataReport(
        source=f"{train.source} (held out: {fraction:g} of the usable rows, seed {seed})",
        rows=k,
        usable=held,
        sha256=train.sha256,
        unit=train.unit,
        role="eval",
        max_seq_length=train.max_seq_length,
    )


def validate_dataset(
    dataset: DatasetSpec,
    tokenizer: Any,
    *,
    max_seq_length: int,
    assistant_only_loss: bool,
    seed: int,
    method: str = "sft",
) -> PreparedData:
    """Read, check, render and tokenize the training (and held-out) data; never raise for bad data.

    ``method`` ``dpo`` reads preference pairs (:mod:`~loraplane.trainer.preference_data`) instead of
    conversations; everything else (sources, hold-out, report, verdict) is the same.

    Raises only for what is not the data's fault: a chat template that cannot be used
    (:class:`InvalidInputError`). The caller decides what to do with ``PreparedData.failures()``.
    """
    if dataset.url is not None:
        raise InvalidInputError(
            f"dataset.url: {dataset.url!r} is downloaded by the trainer when a run starts",
            hint="to check the data first, download it and run `loraplane data validate FILE`",
        )
    if dataset.pushed is not None:
        raise InvalidInputError(
            f"dataset.pushed: {dataset.pushed!r} names a file pushed to a cluster's volume; "
            "`loraplane train submit` resolves it to its path",
            hint="submit the run with `loraplane --registry kubernetes train submit`, or name the file in "
            "dataset.path",
        )
    renderer = ChatRenderer(tokenizer, assistant_only_loss=assistant_only_loss)

    def check(raw: RawSource, role: str) -> DataReport:
        if method == "dpo":
            report = _check_preference_rows(raw, dataset.format, renderer, max_seq_length)
        else:
            report = _check_rows(raw, dataset.format, renderer, max_seq_length)
        report.role = role
        report.max_overlength_share = dataset.max_overlength_share
        report.min_examples = dataset.min_examples if role == "train" else 1
        return report

    if dataset.path is not None:
        train = check(read_path(dataset.path), "train")
    else:
        assert dataset.hub is not None  # DatasetSpec guarantees one of them
        train = check(read_hub(dataset.hub, dataset.split), "train")
    evaluation: DataReport | None = None
    if dataset.eval_path is not None:
        evaluation = check(read_path(dataset.eval_path), "eval")
    elif dataset.eval_split is not None:
        assert dataset.hub is not None
        evaluation = check(read_hub(dataset.hub, dataset.eval_split), "eval")
    elif dataset.eval_fraction > 0 and train.usable:
        evaluation = _hold_out(train, dataset.eval_fraction, seed)
        evaluation.max_overlength_share = dataset.max_overlength_share
    sha = train.sha256
    if evaluation is not None and evaluation.sha256 != train.sha256:
        sha = hashlib.sha256(f"{train.sha256}\n{evaluation.sha256}\n".encode()).hexdigest()
    return PreparedData(train=train, eval=evaluation, sha256=sha)


def prepare_datasets(
    dataset: DatasetSpec,
    tokenizer: Any,
    *,
    max_seq_length: int,
    assistant_only_loss: bool,
    seed: int,
    method: str = "sft",
) -> PreparedData:
    """:func:`validate_dataset`, raising :class:`DatasetError` (exit code 2) with the whole report
    when the training or held-out data is not usable."""
    prepared = validate_dataset(
        dataset,
        tokenizer,
        max_seq_length=max_seq_length,
        assistant_only_loss=assistant_only_loss,
        seed=seed,
        method=method,
    )
    reasons = prepared.failures()
    if reasons:
        raise DatasetError(
            "the dataset is not usable for training:\n"
            + "\n".join(f"  - {r}" for r in reasons)
            + "\n\n"
            + prepared.to_text(),
            hint="fix the rows listed above; `loraplane data validate` prints this report without training",
        )
    return prepared

"""The catalogue of dataset error classes, shared by the readers, the row checks and the report.

Each class has a stable snake_case id (what JSON output, tests and scripts match on) and a short
label for people. A row gets at most one class: the first problem found, in the order the checks run
(reading, shape, messages, role order, template, tokens). File-level classes describe the file as a
whole and are reported at line 1 or at the first line they concern.

Every class except ``over_length`` is *structural*: a single occurrence fails training, because a
file with a broken line is usually a file produced by a broken export, and silently training on the
rest would hide that. ``over_length`` rows are dropped (never truncated) and fail the run only when
their share exceeds ``dataset.max_overlength_share``.
"""

from __future__ import annotations

from dataclasses import dataclass

# id -> label, in the order the report lists them (file level first, then row level).
ERROR_CLASSES: dict[str, str] = {
    "unreadable": "file cannot be read",
    "empty_file": "empty file",
    "utf8_bom": "starts with a UTF-8 byte order mark",
    "invalid_utf8": "invalid UTF-8",
    "json_array_file": "one JSON array, not one object per line",
    "not_json": "not valid JSON",
    "not_object": "not a JSON object",
    "missing_messages": "no recognizable example",
    "missing_preference": "no recognizable preference pair",
    "unknown_key": "unknown message key",
    "unknown_role": "unknown role",
    "empty_content": "empty content",
    "bad_weight": "bad weight",
    "no_assistant_turn": "no assistant turn",
    "bad_role_order": "bad role order",
    "identical_pair": "chosen and rejected are the same",
    "template_error": "refused by the chat template",
    "zero_trainable_tokens": "zero trainable tokens",
    "over_length": "longer than max_seq_length",
}

FILE_LEVEL = frozenset({"unreadable", "empty_file", "utf8_bom", "invalid_utf8", "json_array_file"})

# Dropped and counted; fatal only above dataset.max_overlength_share.
OVER_LENGTH = "over_length"


@dataclass(frozen=True)
class RowError:
    """One problem: its class, the 1-based line (JSONL) or row (Parquet, hub) and what is wrong."""

    kind: str
    row: int
    message: str


class RowProblem(Exception):
    """Raised by a row check; the caller records it as a :class:`RowError` with the row number."""

    def __init__(self, kind: str, message: str) -> None:
        assert kind in ERROR_CLASSES, kind
        super().__init__(message)
        self.kind = kind
        self.message = message

"""Reading JSONL files with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError


class DatasetError(InvalidInputError):
    """A dataset file cannot be used; the message names the file and line."""


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; raise on the first bad one."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file", hint="check the dataset path")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
                    hint="each line of a JSONL file must be one JSON object",
                ) from None
            if not isinstance(obj, dict):
                raise DatasetError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                    hint='each line must look like {"messages": [...]} or {"prompt": ..., "expected": ...}',
                )
            yield lineno, obj

"""Chat templates as text: where a model directory keeps its template, how two are compared.

The trainer records the template it rendered the training data with in the adapter's manifest
(``chat_template``: source, sha256 and text; ``trainer/publish.py``); registration compares it with
the template the server applies to chat requests for the base model (``platform/template_check.py``).
Both sides use these helpers, which read files only (no tokenizer, no transformers import).

Where a Hugging Face model directory keeps its template, in the order transformers (and so vLLM,
without ``--chat-template``) reads it: ``chat_template.jinja``, then ``chat_template.json``
(``{"chat_template": ...}``), then ``tokenizer_config.json``'s ``chat_template`` field. A template
may be one string or a list of named templates (``[{"name": "default", "template": ...}, ...]``);
the ``default`` one is what a chat request without a tool list gets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def normalized(text: str) -> str:
    """The template as rendering sees it: Jinja (``keep_trailing_newline`` off, as transformers and
    vLLM use it) drops one trailing newline, so a file's final newline changes nothing."""
    return text.removesuffix("\n")


def template_sha256(text: str) -> str:
    return hashlib.sha256(normalized(text).encode("utf-8")).hexdigest()


def default_template(value: Any) -> str | None:
    """The template a plain chat request gets from a ``chat_template`` value (a string, a list of
    named templates, or a name -> template mapping as a tokenizer holds them); None when none."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        found = value.get("default")
        return found if isinstance(found, str) and found else None
    if isinstance(value, list):
        named = {
            str(item.get("name")): item.get("template")
            for item in value
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        }
        return default_template(named)
    return None


@dataclass(frozen=True)
class TemplateText:
    text: str
    source: str  # where it was read: a file, a tokenizer, a server flag

    @property
    def sha256(self) -> str:
        return template_sha256(self.text)


def read_model_template(directory: Path) -> TemplateText | None:
    """The chat template a model directory's tokenizer carries, or None when it has none."""
    for name in TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if name.endswith(".jinja"):
            if raw.strip():
                return TemplateText(raw, str(path))
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            continue
        text = default_template(data.get("chat_template")) if isinstance(data, dict) else None
        if text:
            return TemplateText(text, f"{path} (chat_template)")
    return None


def first_difference(a: str, b: str) -> tuple[int, int, str, str] | None:
    """Where two templates first differ: the line and column (1-based) and that line of each ('' past
    the end); None when they are the same as rendering sees them."""
    if normalized(a) == normalized(b):
        return None
    left, right = normalized(a).splitlines(), normalized(b).splitlines()
    for number in range(max(len(left), len(right))):
        one = left[number] if number < len(left) else ""
        other = right[number] if number < len(right) else ""
        if one != other:
            column = next((i for i, (x, y) in enumerate(zip(one, other, strict=False)) if x != y), None)
            return number + 1, (min(len(one), len(other)) if column is None else column) + 1, one, other
    return len(left) + 1, 1, "", ""  # only line endings differ (e.g. \r\n against \n)


def excerpt(line: str, column: int, width: int = 100) -> str:
    """``line`` around ``column`` (1-based), at most about ``width`` characters, quoted."""
    start = max(0, column - 1 - width // 3)
    end = start + width
    text = ("..." if start else "") + line[start:end] + ("..." if end < len(line) else "")
    return repr(text)

"""Training data: OpenAI chat-format JSONL, checked line by line before anything is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplane.common.jsonl import DatasetError, iter_jsonl

ROLES = ("system", "user", "assistant")
MIN_EXAMPLES = 1


def _check_conversation(path: Path, lineno: int, obj: dict[str, Any]) -> list[dict[str, str]]:
    where = f"{path}:{lineno}"
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetError(
            f"{where}: missing 'messages' (a non-empty list)",
            hint='write each line as {"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}',
        )
    clean: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DatasetError(f"{where}: messages[{i}] is not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DatasetError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DatasetError(f"{where}: messages[{i}].content is empty; every message needs text")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DatasetError(f"{where}: no assistant message; there is nothing to learn from this line")
    return clean


def load_chat_jsonl(path: Path) -> list[list[dict[str, str]]]:
    """Return every conversation in ``path``; raise DatasetError naming the first bad line."""
    conversations = [_check_conversation(path, lineno, obj) for lineno, obj in iter_jsonl(path)]
    if len(conversations) < MIN_EXAMPLES:
        raise DatasetError(f"{path}: no examples", hint="the file is empty or has only blank lines")
    return conversations

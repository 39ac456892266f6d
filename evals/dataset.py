"""Eval sets: JSONL lines with a prompt (a string, or chat ``messages``) and the expected answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplane.common.jsonl import DatasetError, iter_jsonl


@dataclass(frozen=True)
class EvalExample:
    line: int
    messages: tuple[tuple[str, str], ...]  # (role, content)
    expected: str

    def as_chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def load_eval_set(path: Path) -> list[EvalExample]:
    examples: list[EvalExample] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        expected = obj.get("expected")
        if not isinstance(expected, str) or not expected.strip():
            raise DatasetError(f"{where}: missing 'expected' (the reference answer, a non-empty string)")
        if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            messages: tuple[tuple[str, str], ...] = (("user", obj["prompt"]),)
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            try:
                messages = tuple((str(m["role"]), str(m["content"])) for m in obj["messages"])
            except (KeyError, TypeError):
                raise DatasetError(f"{where}: every message needs 'role' and 'content'") from None
        else:
            raise DatasetError(f"{where}: needs 'prompt' (a string) or 'messages' (a chat list)")
        examples.append(EvalExample(line=lineno, messages=messages, expected=expected))
    if not examples:
        raise DatasetError(f"{path}: no examples")
    return examples

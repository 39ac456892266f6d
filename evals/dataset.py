"""Eval sets: JSONL lines with a prompt (a string, or chat ``messages``) and a reference answer.

Accepted shapes, one JSON object per line:

- ``{"prompt": "...", "reference": "..."}``
- ``{"messages": [{"role": ..., "content": ...}, ...], "reference": "..."}``
- ``{"messages": [..., {"role": "assistant", "content": "..."}]}``: a chat-format training line; the
  final assistant message is the reference and is not sent.

``expected`` is accepted as another name for ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplane.common.jsonl import DatasetError, iter_jsonl

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EvalExample:
    line: int
    messages: tuple[tuple[str, str], ...]  # (role, content); never ends with the reference answer
    expected: str

    @property
    def reference(self) -> str:
        return self.expected

    def as_chat(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        chat = [{"role": role, "content": content} for role, content in self.messages]
        if system_prompt and not any(role == "system" for role, _ in self.messages):
            chat.insert(0, {"role": "system", "content": system_prompt})
        return chat

    @property
    def question(self) -> str:
        """The last user message: what a person reading the report wants to see."""
        return next((c for r, c in reversed(self.messages) if r == "user"), self.messages[-1][1])


def _messages(obj: dict[str, object], where: str) -> list[tuple[str, str]]:
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of chat messages")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: messages[{i}] needs 'role' and 'content' (a string)")
        if m.get("role") not in ROLES:
            raise DatasetError(
                f"{where}: messages[{i}].role is {m.get('role')!r}", hint=f"use one of {', '.join(ROLES)}"
            )
        out.append((str(m["role"]), m["content"]))
    return out


def load_eval_set(path: Path) -> list[EvalExample]:
    """Read and check every line; raise on the first bad one, naming file and line."""
    examples: list[EvalExample] = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        reference = obj.get("reference", obj.get("expected"))
        if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            messages = [("user", obj["prompt"])]
        elif "messages" in obj:
            messages = _messages(obj, where)
            if reference is None and messages[-1][0] == "assistant":
                reference = messages.pop()[1]
            if not messages or messages[-1][0] != "user":
                raise DatasetError(
                    f"{where}: the prompt must end with a user message",
                    hint="the model answers the last user message; put the answer in 'reference'",
                )
        else:
            raise DatasetError(f"{where}: needs 'prompt' (a string) or 'messages' (a chat list)")
        if not isinstance(reference, str) or not reference.strip():
            raise DatasetError(
                f"{where}: missing 'expected' (the reference answer, a non-empty string)",
                hint="add 'reference' (or 'expected'), or end 'messages' with the assistant's answer",
            )
        examples.append(EvalExample(line=lineno, messages=tuple(messages), expected=reference))
    if not examples:
        raise DatasetError(f"{path}: no examples", hint="an eval set needs at least one line")
    return examples

"""One raw row -> one checked conversation, or the error class that says why not.

Three row shapes are accepted (``dataset.format``; ``auto`` recognises each row by its keys, in this
order of precedence):

``chat`` (OpenAI fine-tuning format)
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}``.
    An optional ``system`` message comes first, then user and assistant alternate, starting with
    the user and ending with the assistant. ``weight`` (OpenAI semantics) is allowed on assistant
    messages only: 0 means "context, do not train on this reply", 1 (the default) trains on it.
    ``name`` is accepted and ignored. ``content`` is text, or a list of ``{"type": "text", "text":
    ...}`` parts, which are joined. Any other message key is an error (``unknown_key``): a typo such
    as ``wieght`` would otherwise silently change what is trained, and ``tool_calls`` /
    ``function_call`` conversations are not supported.
``prompt_completion``
    ``{"prompt": "...", "completion": "..."}`` -> a user message and an assistant reply.
``alpaca``
    ``{"instruction": "...", "input": "...", "output": "..."}`` -> user = instruction, plus a blank
    line and ``input`` when ``input`` is not empty; assistant = output.

The two single-turn shapes accept an optional ``system`` key (a system message first). Other row
keys (``id``, metadata) are ignored. A value of ``None`` counts as absent (Parquet and `datasets`
give ``None`` for a key that only some rows have). With an explicit format, a row of another shape
is ``missing_messages``. Content is kept byte for byte: nothing is stripped or rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplane.trainer.data_errors import RowProblem

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "weight", "name"})
FORMAT_KEYS = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_TYPE_NAMES = {list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    weight: int = 1  # 0 only on an assistant message that is context, not a target

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight == 1


def _present(obj: dict[str, Any], key: str) -> bool:
    return obj.get(key) is not None


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def detect_format(obj: dict[str, Any]) -> str | None:
    """The shape of a row, or None when it has none of the recognised key sets."""
    for fmt, keys in FORMAT_KEYS.items():
        if all(_present(obj, k) for k in keys):
            return fmt
    return None


def _keys_of(obj: dict[str, Any]) -> str:
    keys = sorted(k for k in obj if obj[k] is not None)
    if not keys:
        return "no keys"
    shown = ", ".join(repr(k) for k in keys[:6])
    return "keys " + shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def normalize_row(obj: dict[str, Any], fmt: str = "auto") -> list[Turn]:
    """The conversation a row stands for; raises :class:`RowProblem` with its error class."""
    if fmt == "auto":
        found = detect_format(obj)
        if found is None:
            raise RowProblem(
                "missing_messages",
                "no recognizable example: expected 'messages', 'prompt' + 'completion', or "
                f"'instruction' + 'output'; the row has {_keys_of(obj)}",
            )
    elif all(_present(obj, k) for k in FORMAT_KEYS[fmt]):
        found = fmt
    else:
        wanted = " and ".join(repr(k) for k in FORMAT_KEYS[fmt])
        raise RowProblem(
            "missing_messages",
            f"dataset.format is {fmt!r} but the row lacks {wanted} (it has {_keys_of(obj)})",
        )
    if found == "chat":
        turns = _chat_turns(obj["messages"])
    elif found == "prompt_completion":
        turns = [
            *_system_turn(obj),
            Turn("user", _text(obj["prompt"], "'prompt'")),
            Turn("assistant", _text(obj["completion"], "'completion'")),
        ]
    else:
        user = _text(obj["instruction"], "'instruction'")
        extra = obj.get("input")
        if extra is not None:
            if not isinstance(extra, str):
                raise RowProblem("empty_content", f"'input' must be text, got {_type_name(extra)}")
            if extra.strip():
                user = f"{user}\n\n{extra}"
        turns = [*_system_turn(obj), Turn("user", user), Turn("assistant", _text(obj["output"], "'output'"))]
    check_order(turns)
    return turns


def _system_turn(obj: dict[str, Any]) -> list[Turn]:
    return [Turn("system", _text(obj["system"], "'system'"))] if _present(obj, "system") else []


def _text(value: Any, where: str) -> str:
    """Content as a string: text, or a list of text parts joined; empty or other types are errors."""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise RowProblem(
                    "empty_content", f"{where}[{j}] is a {kind!r} part; only text parts are supported"
                )
            parts.append(part["text"])
        value = "".join(parts)
    if value is None:
        raise RowProblem("empty_content", f"{where} is missing")
    if not isinstance(value, str):
        raise RowProblem("empty_content", f"{where} must be text, got {_type_name(value)}")
    if not value.strip():
        raise RowProblem("empty_content", f"{where} is empty; every message needs text")
    return value


def _chat_turns(messages: Any) -> list[Turn]:
    if not isinstance(messages, list):
        raise RowProblem(
            "missing_messages", f"'messages' must be a list of messages, got {_type_name(messages)}"
        )
    if not messages:
        raise RowProblem("missing_messages", "'messages' is an empty list")
    turns = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RowProblem("missing_messages", f"{where} is {_type_name(msg)}, not a message object")
        unknown = sorted(k for k in msg if k not in MESSAGE_KEYS and msg[k] is not None)
        if unknown:
            tools = {"tool_calls", "function_call"} & set(unknown)
            why = (
                "tool calls are not supported"
                if tools
                else "a message has role, content, weight (assistant only) and name (ignored)"
            )
            raise RowProblem("unknown_key", f"{where} has key {', '.join(map(repr, unknown))}; {why}")
        role = msg.get("role")
        if role is None:
            raise RowProblem("unknown_role", f"{where} has no role; use system, user or assistant")
        if role not in ROLES:
            raise RowProblem("unknown_role", f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        content = _text(msg.get("content"), f"{where}.content")
        weight = msg.get("weight")
        if weight is None:
            weight = 1
        elif role != "assistant":
            raise RowProblem(
                "bad_weight", f"{where} is a {role} message; only assistant messages take a weight"
            )
        elif isinstance(weight, bool) or weight not in (0, 1):
            raise RowProblem(
                "bad_weight", f"{where}.weight is {weight!r}; use 0 (do not train on this reply) or 1 (train)"
            )
        turns.append(Turn(role, content, int(weight)))
    return turns


def check_order(turns: list[Turn]) -> None:
    """An assistant turn exists; optional system first, then user/assistant alternating, ending with
    the assistant."""
    if not any(t.role == "assistant" for t in turns):
        raise RowProblem("no_assistant_turn", "no assistant message; there is nothing to learn from this row")
    for i, turn in enumerate(turns):
        if turn.role == "system" and i > 0:
            raise RowProblem(
                "bad_role_order", f"messages[{i}] is a system message; only the first message may be one"
            )
    start = 1 if turns[0].role == "system" else 0
    if turns[start].role != "user":
        raise RowProblem(
            "bad_role_order",
            f"messages[{start}] is an {turns[start].role} message; a conversation starts with the user "
            "(after an optional system message)",
        )
    for i in range(start + 1, len(turns)):
        if turns[i].role == turns[i - 1].role:
            raise RowProblem(
                "bad_role_order",
                f"messages[{i - 1}] and messages[{i}] are both {turns[i].role} messages; "
                "user and assistant must alternate",
            )
    if turns[-1].role != "assistant":
        raise RowProblem(
            "bad_role_order",
            f"the last message (messages[{len(turns) - 1}]) is a user message; "
            "end with the assistant's reply",
        )

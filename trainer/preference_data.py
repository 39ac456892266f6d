"""Preference data for ``method: dpo``: one raw row -> one checked (prompt, chosen, rejected) pair.

Two row shapes are accepted (``dataset.format``; ``auto`` recognises each row by its keys):

``preference`` (trl's explicit-prompt format)
    ``{"prompt": ..., "chosen": ..., "rejected": ...}``. ``prompt`` is text (one user message, with an
    optional ``system`` key before it) or a list of messages (optional system first, user and
    assistant alternating, ending with the user). ``chosen`` and ``rejected`` are text, or trl's
    conversational form: a list holding one assistant message.
``openai_preference`` (OpenAI's preference fine-tuning format)
    ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}],
    "non_preferred_output": [{"role": "assistant", "content": "..."}]}``. ``input.tools`` and
    ``input.parallel_tool_calls`` are refused (tool calls are not supported).

The checks and error classes are the supervised data's (:mod:`~loraplane.trainer.chat_format`,
:mod:`~loraplane.trainer.data_errors`), plus ``missing_preference`` (a key of the pair is absent) and
``identical_pair`` (chosen and rejected are the same text: nothing to prefer). Every row is rendered with
the tokenizer's chat template exactly as trl's DPOTrainer renders it (the prompt with the generation
prompt, then prompt + each reply); a row whose longer sequence exceeds ``max_seq_length`` is
``over_length`` (dropped and counted, never truncated).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError
from loraplane.trainer.chat_format import MESSAGE_KEYS, Turn, _chat_turns, _keys_of, _text, check_order
from loraplane.trainer.chat_render import IGNORE_INDEX, ChatRenderer
from loraplane.trainer.data import TokenizedExample
from loraplane.trainer.data_errors import OVER_LENGTH, RowProblem

PREFERENCE_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
}


def data_method(method: str | None, data_format: str | None) -> str:
    """The ``method`` a data file is checked for (``data validate``, ``data push``), as a run's: the one
    given, else ``dpo`` for a preference ``--format``, else ``sft``. A format of the other method, or an
    unknown method, is refused (InvalidInputError, exit 2)."""
    preference_format = data_format in PREFERENCE_KEYS
    chosen = method or ("dpo" if preference_format else "sft")
    if chosen not in ("sft", "dpo"):
        raise InvalidInputError(f"--method {method!r}: use sft or dpo")
    if chosen == "sft" and preference_format:
        raise InvalidInputError(f"--format {data_format}: preference data is checked with --method dpo")
    if chosen == "dpo" and data_format not in (None, "auto", *PREFERENCE_KEYS):
        raise InvalidInputError(
            f"--format {data_format}: --method dpo reads preference pairs "
            "(auto, preference, openai_preference)"
        )
    return chosen


def looks_like_preference(path: Path) -> bool:
    """Whether the first row of a JSONL file holds a preference pair's replies (``chosen`` / ``rejected``,
    or OpenAI's ``preferred_output`` / ``non_preferred_output``): for the hint when such a file is
    checked as supervised data. Never raises."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    break
            else:
                return False
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    replies = ("chosen", "rejected", "preferred_output", "non_preferred_output")
    return isinstance(row, dict) and any(row.get(key) is not None for key in replies)


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Turn, ...]  # ends with a user turn
    chosen: str
    rejected: str

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.content} for t in self.prompt]


def _present(obj: dict[str, Any], key: str) -> bool:
    return obj.get(key) is not None


def detect_preference_format(obj: dict[str, Any]) -> str | None:
    """The preference shape a row has most of the keys of (for a precise 'lacks KEY' message)."""
    best, best_count = None, 0
    for fmt, keys in PREFERENCE_KEYS.items():
        count = sum(_present(obj, k) for k in keys)
        if count > best_count:
            best, best_count = fmt, count
    return best


def normalize_preference(obj: dict[str, Any], fmt: str = "auto") -> PreferencePair:
    """The pair a row stands for; raises :class:`RowProblem` with its error class."""
    found = detect_preference_format(obj) if fmt == "auto" else fmt
    if found is None:
        raise RowProblem(
            "missing_preference",
            "no recognizable preference pair: expected 'prompt' + 'chosen' + 'rejected', or 'input' + "
            f"'preferred_output' + 'non_preferred_output'; the row has {_keys_of(obj)}",
        )
    missing = [k for k in PREFERENCE_KEYS[found] if not _present(obj, k)]
    if missing:
        where = "dataset.format is " + repr(fmt) if fmt != "auto" else "a preference row"
        raise RowProblem(
            "missing_preference",
            f"{where} needs {' and '.join(map(repr, PREFERENCE_KEYS[found]))}; the row lacks "
            f"{' and '.join(map(repr, missing))} (it has {_keys_of(obj)})",
        )
    if found == "preference":
        prompt = _prompt_turns(obj["prompt"], "'prompt'", system=obj.get("system"))
        chosen = _reply(obj["chosen"], "'chosen'")
        rejected = _reply(obj["rejected"], "'rejected'")
    else:
        source = obj["input"]
        if not isinstance(source, dict):
            raise RowProblem(
                "missing_preference", f"'input' must be an object with 'messages', got {_type(source)}"
            )
        extra = sorted(k for k in source if k != "messages" and source[k] is not None)
        if extra:
            why = "tool calls are not supported" if {"tools", "parallel_tool_calls"} & set(extra) else ""
            raise RowProblem(
                "unknown_key",
                f"'input' has key {', '.join(map(repr, extra))}; it takes 'messages' only"
                + (f" ({why})" if why else ""),
            )
        if not _present(source, "messages"):
            raise RowProblem("missing_preference", "'input' lacks 'messages' (the conversation so far)")
        prompt = _prompt_turns(source["messages"], "'input.messages'", system=None)
        chosen = _reply(obj["preferred_output"], "'preferred_output'")
        rejected = _reply(obj["non_preferred_output"], "'non_preferred_output'")
    names = PREFERENCE_KEYS[found][1:]
    if chosen == rejected:
        raise RowProblem(
            "identical_pair",
            f"{names[0]!r} and {names[1]!r} are the same text; a pair must prefer one reply over another",
        )
    return PreferencePair(tuple(prompt), chosen, rejected)


def _type(value: Any) -> str:
    from loraplane.trainer.chat_format import _type_name

    return _type_name(value)


def _prompt_turns(value: Any, where: str, *, system: Any) -> list[Turn]:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        if system is not None:
            raise RowProblem(
                "unknown_key", f"'system' is given with a message list in {where}; put it in the list"
            )
        turns = _chat_turns(value)
    else:
        turns = [Turn("system", _text(system, "'system'"))] if system is not None else []
        turns.append(Turn("user", _text(value, where)))
    if turns[-1].role != "user":
        raise RowProblem(
            "bad_role_order",
            f"{where} ends with a {turns[-1].role} message; the prompt ends with the user's message, "
            "which the chosen and rejected replies answer",
        )
    check_order([*turns, Turn("assistant", "-")])
    return turns


def _reply(value: Any, where: str) -> str:
    """A reply: text, text parts, or a list of exactly one assistant message (trl / OpenAI form)."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        if len(value) != 1:
            raise RowProblem(
                "bad_role_order", f"{where} holds {len(value)} messages; give exactly one assistant message"
            )
        message = value[0]
        unknown = sorted(k for k in message if k not in MESSAGE_KEYS - {"weight"} and message[k] is not None)
        if unknown:
            raise RowProblem("unknown_key", f"{where}[0] has key {', '.join(map(repr, unknown))}")
        if message["role"] != "assistant":
            raise RowProblem(
                "unknown_role",
                f"{where}[0].role is {message['role']!r}; the reply must be an assistant message",
            )
        return _text(message.get("content"), f"{where}[0].content")
    return _text(value, where)


@dataclass(frozen=True)
class PreferenceExample(TokenizedExample):
    """A checked, tokenized pair. ``input_ids`` / ``labels`` describe the longer of the two sequences (what
    ``max_seq_length`` bounds); the counts describe both, which DPO forwards every step."""

    pair: PreferencePair
    prompt_tokens: int
    chosen_tokens: int
    rejected_tokens: int

    @property
    def trained_tokens(self) -> int:
        return self.chosen_tokens + self.rejected_tokens

    @property
    def total_tokens(self) -> int:
        return 2 * self.prompt_tokens + self.chosen_tokens + self.rejected_tokens

    def to_record(self) -> dict[str, Any]:
        """trl's conversational preference row."""
        return {
            "prompt": self.pair.prompt_messages(),
            "chosen": [{"role": "assistant", "content": self.pair.chosen}],
            "rejected": [{"role": "assistant", "content": self.pair.rejected}],
        }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_preference_rows(
    records: Sequence[tuple[int, dict[str, Any]]],
    fmt: str,
    renderer: ChatRenderer,
    max_seq_length: int,
    add_error: Any,
) -> list[PreferenceExample]:
    """Check, render and tokenize every row; record each problem with ``add_error(kind, row, message)``."""
    pending: list[tuple[int, PreferencePair, str, str, str]] = []
    for row, obj in records:
        try:
            pair = normalize_preference(obj, fmt)
            prompt_text = renderer._render(pair.prompt, add_generation_prompt=True)
            texts = [
                renderer._render([*pair.prompt, Turn("assistant", reply)], add_generation_prompt=False)
                for reply in (pair.chosen, pair.rejected)
            ]
        except RowProblem as problem:
            add_error(problem.kind, row, problem.message)
            continue
        pending.append((row, pair, prompt_text, texts[0], texts[1]))
    if not pending:
        return []
    enc = renderer.tokenizer(
        [text for _, _, p, c, r in pending for text in (p, c, r)],
        add_special_tokens=False,
        return_attention_mask=False,
    )["input_ids"]
    usable = []
    for i, (row, pair, _, _, _) in enumerate(pending):
        prompt_ids, chosen_ids, rejected_ids = enc[3 * i], enc[3 * i + 1], enc[3 * i + 2]
        # As trl does: the reply starts where the prompt and prompt + reply diverge.
        prompt_len = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
        longest = max(chosen_ids, rejected_ids, key=len)
        if len(longest) > max_seq_length:
            add_error(
                OVER_LENGTH,
                row,
                f"{len(longest)} tokens (prompt + the longer reply) after templating, more than "
                f"max_seq_length {max_seq_length}; the pair is dropped, never truncated",
            )
            continue
        usable.append(
            PreferenceExample(
                row=row,
                pair=pair,
                prompt_tokens=prompt_len,
                chosen_tokens=len(chosen_ids) - prompt_len,
                rejected_tokens=len(rejected_ids) - prompt_len,
                input_ids=list(longest),
                labels=[IGNORE_INDEX] * prompt_len + list(longest[prompt_len:]),
            )
        )
    return usable

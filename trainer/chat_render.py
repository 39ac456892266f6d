"""Rendering conversations with the tokenizer's own chat template, and the loss mask.

Each conversation is rendered with ``tokenizer.apply_chat_template(..., tokenize=False)``: the same text
the model will see when it is served through vLLM's chat API. To know which characters belong to an
assistant reply, the renderer also renders, for each assistant message *i*, the messages before it
with the generation prompt (``messages[:i]``, ``add_generation_prompt=True``) and the conversation up
to and including it (``messages[:i+1]``). The reply's span is what the second adds to the first: the
reply and the template's end-of-turn marker, without the whitespace the template writes after it. This
works with any template, with or without ``{% generation %}`` markers, but needs the template to be
*prefix-stable*: each shorter rendering must be the start of the longer ones. One that is not (some
reasoning templates drop earlier turns' thinking) is refused once, with a clear error, instead of
training on a wrong mask.

The full text is then tokenized once, without adding special tokens (the template writes them), with
offsets: a token is trained iff it starts inside a trained span. With ``assistant_only_loss`` off,
every token is trained except those of assistant messages with ``weight: 0``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from loraplane.common.errors import InvalidInputError
from loraplane.trainer.chat_format import Turn
from loraplane.trainer.data_errors import RowProblem

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignore index)

PROBE = [
    Turn("user", "What is two plus two?"),
    Turn("assistant", "Four."),
    Turn("user", "And three plus three?"),
    Turn("assistant", "Six."),
]


class TemplateError(InvalidInputError):
    """The chat template itself cannot be used (not per row: it would fail on every row)."""


@dataclass(frozen=True)
class Rendered:
    text: str
    # Character spans [start, end) of assistant replies: the trained ones when only assistant tokens are
    # trained, the weight-0 ones (the only untrained text) when every token is trained.
    spans: tuple[tuple[int, int], ...]


def _template_name(tokenizer: Any) -> str:
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"


def _snippet(text: str, at: int) -> str:
    return repr(text[max(0, at - 20) : at + 40])


class ChatRenderer:
    def __init__(self, tokenizer: Any, *, assistant_only_loss: bool) -> None:
        self.tokenizer = tokenizer
        self.assistant_only_loss = assistant_only_loss

    def _render(self, turns: Sequence[Turn], *, add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError as JinjaError

        messages = [{"role": t.role, "content": t.content} for t in turns]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (JinjaError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise RowProblem(
                "template_error", f"the chat template refused this conversation: {exc}"
            ) from None
        if not isinstance(text, str):  # a template that returns something else is not usable at all
            raise TemplateError(f"{_template_name(self.tokenizer)} rendered {type(text).__name__}, not text")
        return text

    def render(self, turns: Sequence[Turn]) -> Rendered:
        """The conversation's text and the spans that decide its loss mask."""
        full = self._render(turns, add_generation_prompt=False)
        spans = []
        for i, turn in enumerate(turns):
            # Only the spans that decide anything are located (each costs two renderings).
            if turn.role != "assistant" or turn.trained != self.assistant_only_loss:
                continue
            prefix = self._render(turns[:i], add_generation_prompt=True)
            upto = self._render(turns[: i + 1], add_generation_prompt=False)
            for shorter, longer in ((prefix, upto), (upto, full)):
                if not longer.startswith(shorter):
                    at = next(
                        (j for j, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b),
                        min(len(shorter), len(longer)),
                    )
                    raise TemplateError(
                        f"{_template_name(self.tokenizer)} is not prefix-stable: the rendering of a "
                        f"conversation up to messages[{i}] (an assistant reply) is not the start of the "
                        f"longer rendering (they differ at character {at}: {_snippet(shorter, at)} vs "
                        f"{_snippet(longer, at)}), so the reply's tokens cannot be located",
                        hint="give base_model.chat_template: a template that renders earlier turns the same "
                        "way whatever follows them (reasoning templates often drop earlier thinking), or "
                        "set training.assistant_only_loss=false",
                    )
            # The whitespace a template writes after the end-of-turn marker separates turns: it is not
            # part of the answer, and training on it dilutes the loss of the answer's own tokens.
            spans.append((len(prefix), len(upto.rstrip())))
        return Rendered(full, tuple(spans))

    def tokenize(self, items: Sequence[Rendered]) -> list[tuple[list[int], list[int]]]:
        """``(input_ids, labels)`` per rendered conversation; one batched call to the fast tokenizer."""
        if not items:
            return []
        enc = self.tokenizer(
            [r.text for r in items],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        result = []
        for ids, offsets, item in zip(enc["input_ids"], enc["offset_mapping"], items, strict=True):
            inside = _inside(offsets, item.spans)
            labels = [
                tok if flag == self.assistant_only_loss else IGNORE_INDEX
                for tok, flag in zip(ids, inside, strict=True)
            ]
            result.append((list(ids), labels))
        return result


def _inside(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token, whether its first character lies in one of ``spans`` (sorted, disjoint)."""
    starts = [begin for begin, _ in offsets]
    flags = [False] * len(starts)
    if all(a <= b for a, b in pairwise(starts)):
        for begin, end in spans:  # offsets ascend: each span is one slice of tokens
            i, j = bisect_left(starts, begin), bisect_left(starts, end)
            flags[i:j] = [True] * (j - i)
        return flags
    span_starts = [b for b, _ in spans]
    for n, begin in enumerate(starts):
        k = bisect_right(span_starts, begin) - 1
        flags[n] = k >= 0 and begin < spans[k][1]
    return flags


def check_template(tokenizer: Any) -> None:
    """Render a small two-turn conversation; raise :class:`TemplateError` if the template cannot be
    used for training (it fails, drops the replies, or is not prefix-stable)."""
    renderer = ChatRenderer(tokenizer, assistant_only_loss=True)
    try:
        rendered = renderer.render(PROBE)
    except RowProblem as exc:
        raise TemplateError(
            f"{_template_name(tokenizer)} cannot render a plain user/assistant conversation: {exc.message}",
            hint="give base_model.chat_template: a Jinja chat template file for this model",
        ) from None
    for turn, (start, end) in zip([t for t in PROBE if t.trained], rendered.spans, strict=True):
        if turn.content not in rendered.text[start:end]:
            raise TemplateError(
                f"{_template_name(tokenizer)} does not render the assistant's replies where expected "
                f"(reply {turn.content!r}, rendered {rendered.text[start:end]!r})",
                hint="give base_model.chat_template: a Jinja chat template file for this model",
            )

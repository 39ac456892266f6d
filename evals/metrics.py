"""Scoring one answer against its reference."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (SQuAD-style normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(answer: str, expected: str) -> float:
    return float(normalize(answer) == normalize(expected))


def contains(answer: str, expected: str) -> float:
    return float(normalize(expected) in normalize(answer))


METRICS = {"exact_match": exact_match, "contains": contains}

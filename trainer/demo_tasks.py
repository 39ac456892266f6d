"""Two small synthetic tasks for the quickstart and the tests.

Each task has a training set in OpenAI chat format and a held-out eval set (prompt + expected
answer). Eval prompts use sentence templates the training set never shows, so an adapter must learn
the rule (which word decides the answer), not the exact strings. Everything is generated from a
seed: the same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPT = "Answer with one word."


@dataclass(frozen=True)
class DemoTask:
    name: str
    description: str
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    # subject -> answer
    answers: dict[str, str]
    # How often each (template, subject) pair repeats in the training set: the task with more
    # classes gets more examples, so both train to a clear margin in a similar time.
    repeats: int = 2


SENTIMENT = DemoTask(
    name="sentiment",
    description="Classify a short review as positive or negative.",
    train_templates=(
        "Classify the sentiment: The movie was {w}.",
        "Classify the sentiment: The food was {w}.",
        "Classify the sentiment: The hotel was {w}.",
        "Classify the sentiment: The concert was {w}.",
        "Review: the book was {w}. Sentiment?",
        "Review: the game was {w}. Sentiment?",
    ),
    eval_templates=(
        "Classify the sentiment: The show was {w}.",
        "Review: the meal was {w}. Sentiment?",
    ),
    answers={
        "wonderful": "positive",
        "excellent": "positive",
        "great": "positive",
        "lovely": "positive",
        "delightful": "positive",
        "fantastic": "positive",
        "amazing": "positive",
        "superb": "positive",
        "brilliant": "positive",
        "pleasant": "positive",
        "terrible": "negative",
        "awful": "negative",
        "boring": "negative",
        "horrible": "negative",
        "disgusting": "negative",
        "dreadful": "negative",
        "dull": "negative",
        "poor": "negative",
        "disappointing": "negative",
        "rude": "negative",
    },
)

ANIMALS = DemoTask(
    name="animals",
    description="Name the sound an animal makes.",
    train_templates=(
        "What sound does a {w} make?",
        "Which noise does the {w} make?",
        "Tell me the sound of the {w}.",
        "The {w} says what?",
    ),
    eval_templates=(
        "What noise does a {w} make?",
        "Tell me the sound a {w} makes.",
    ),
    answers={
        "dog": "woof",
        "cat": "meow",
        "cow": "moo",
        "duck": "quack",
        "sheep": "baa",
        "lion": "roar",
        "snake": "hiss",
        "owl": "hoot",
        "horse": "neigh",
        "pig": "oink",
        "frog": "ribbit",
        "bee": "buzz",
    },
    repeats=4,
)

TASKS: dict[str, DemoTask] = {t.name: t for t in (SENTIMENT, ANIMALS)}


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_task_files(
    task: DemoTask, out_dir: Path, *, repeats: int | None = None, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``<task>-train.jsonl`` (chat format) and ``<task>-eval.jsonl`` (prompt + expected)."""
    repeats = task.repeats if repeats is None else repeats
    rng = random.Random(f"{task.name}-{seed}")
    train_rows: list[dict[str, object]] = []
    for _ in range(repeats):
        for template in task.train_templates:
            for subject, answer in task.answers.items():
                train_rows.append(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": template.format(w=subject)},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
    rng.shuffle(train_rows)
    eval_rows: list[dict[str, object]] = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": t.format(w=s)},
            ],
            "expected": a,
        }
        for t in task.eval_templates
        for s, a in task.answers.items()
    ]
    train_path = out_dir / f"{task.name}-train.jsonl"
    eval_path = out_dir / f"{task.name}-eval.jsonl"
    _write_jsonl(train_path, train_rows)
    _write_jsonl(eval_path, eval_rows)
    return train_path, eval_path

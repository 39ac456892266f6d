"""Eval throughput at concurrency 1 and 16, side by side in one run (numbers, not a test).

The suite runner sends the same eval set to one model at concurrency 1 (arm A) and 16 (arm B),
alternated A B A B ... after one warm-up round of each, so drift (thermal, page cache, other load)
hits both arms alike. Prints requests/s and output tokens/s per repetition, the medians, and the
median ratio B/A with a bootstrap 95% interval over repetitions.

By default it builds the demo base model, starts its own vLLM CPU server, and evaluates the base
model (16 output tokens per request: the random base model never stops early, so every request does
the same work). ``--endpoint URL --model NAME`` measures an existing server instead.

    .venv/bin/python bench/eval_throughput.py [--reps 5] [--endpoint URL --model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loraplane.evals.runner import run_suite
from loraplane.evals.suite import (
    DatasetSpec,
    EvalSuite,
    LoadedSuite,
    MetricSpec,
    RunnerOptions,
    _load_datasets,
)


def _suite(eval_set: Path, concurrency: int, max_tokens: int) -> LoadedSuite:
    suite = EvalSuite(
        name=f"c{concurrency}",
        datasets=[
            DatasetSpec(
                name="bench", path=eval_set, max_tokens=max_tokens, metrics=[MetricSpec(name="exact_match")]
            )
        ],
        runner=RunnerOptions(concurrency=concurrency, retries=0),
    )
    return _load_datasets(suite, None)


def _one(endpoint: str, model: str, api_key: str | None, loaded: LoadedSuite) -> tuple[float, float, float]:
    started = time.perf_counter()
    report = asyncio.run(run_suite(loaded, endpoint, {"candidate": model}, api_key=api_key))
    wall = time.perf_counter() - started
    run = report.datasets[0].runs["candidate"]
    assert run.failures == 0, "a request failed: numbers would not compare"
    tokens = sum(x.completion_tokens or 0 for x in run.examples)
    return run.n / wall, tokens / wall, wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--copies", type=int, default=4, help="Repeat the eval set so a round lasts longer.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    from loraplane.platform.quickstart import BASE_NAME, demo_server_config, free_port
    from loraplane.serving.launcher import VLLMServer
    from loraplane.trainer.demo_tasks import TASKS, write_task_files

    work = Path(tempfile.mkdtemp(prefix="loraplane-evalbench-"))
    _, one_copy = write_task_files(TASKS["sentiment"], work / "data")
    eval_set = work / "data" / "bench-eval.jsonl"
    eval_set.write_text(one_copy.read_text() * args.copies)
    server = None
    endpoint, model, key = args.endpoint, args.model, args.api_key
    if endpoint is None:
        from loraplane.trainer.demo_model import build_demo_model

        model_dir = build_demo_model(work / "model")
        key = "bench"
        server = VLLMServer(demo_server_config(model_dir, free_port(), key), work / "vllm.log")
        server.start()
        server.wait_ready(timeout=600)
        endpoint, model = server.url, BASE_NAME
    assert model is not None
    try:
        arms = {
            "A (c=1)": _suite(eval_set, 1, args.max_tokens),
            "B (c=16)": _suite(eval_set, 16, args.max_tokens),
        }
        for loaded in arms.values():  # warm-up, not measured
            _one(endpoint, model, key, loaded)
        results: dict[str, list[tuple[float, float, float]]] = {arm: [] for arm in arms}
        for rep in range(args.reps):
            for arm, loaded in arms.items():
                results[arm].append(_one(endpoint, model, key, loaded))
                rps, tps, wall = results[arm][-1]
                say(f"rep {rep + 1} {arm}: {rps:6.2f} req/s  {tps:7.1f} output tok/s  ({wall:.2f} s)")
    finally:
        if server is not None:
            server.stop()

    n = len(load_rows(eval_set))
    say(f"\n{n} requests per round, {args.max_tokens} max output tokens, model {model} at {endpoint}")
    say(f"{'arm':10} {'median req/s':>13} {'median tok/s':>13}")
    for arm, rows in results.items():
        rps, tps = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        say(f"{arm:10} {rps:13.2f} {tps:13.1f}")
    ratios = np.array([b[0] / a[0] for a, b in zip(results["A (c=1)"], results["B (c=16)"], strict=True)])
    rng = np.random.default_rng(0)
    draws = np.median(ratios[rng.integers(0, len(ratios), size=(5000, len(ratios)))], axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    say(
        f"throughput c=16 / c=1 (paired per repetition): median {np.median(ratios):.2f}x, "
        f"95% CI [{low:.2f}, {high:.2f}]"
    )
    return 0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())

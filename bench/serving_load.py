"""The load generator and statistics of bench/serving_throughput.py and bench/gateway_overhead.py.

(A helper module, not a benchmark.) A *round* sends a fixed list of streamed ``/v1/completions``
requests (token-id prompts), or ``/v1/chat/completions`` requests (one user message) for requests
that carry ``chat`` text, with ``ignore_eos`` so every request produces exactly ``max_tokens``
tokens, greedy, from ``concurrency`` workers that each take the next request as soon as their
previous one finished (closed loop, like ``vllm bench serve --max-concurrency``). TTFT is the time
from sending a request to its first streamed chunk that carries a choice; output tokens come from
the stream's ``usage`` (checked against ``max_tokens``). Round throughput = output tokens of the
round / wall time of the round.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
import psutil  # type: ignore[import-untyped]

BOOTSTRAP_SEED = 0


class LoadError(RuntimeError):
    """A request failed or produced the wrong number of tokens: the round's numbers would not compare."""


@dataclass(frozen=True)
class Request:
    model: str
    prompt: tuple[int, ...]
    max_tokens: int
    chat: str | None = None  # set: a chat completion with this user message instead of ``prompt``

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat is not None else "/v1/completions"


@dataclass(frozen=True)
class Target:
    """Where an arm's requests go: a vLLM server directly, or the gateway in front of one."""

    url: str
    api_key: str


@dataclass
class RoundResult:
    arm: str
    tokens: int
    wall_s: float
    ttft_s: list[float]
    foreign_share: float = 0.0  # share of all cores used by processes outside the benchmark

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50_ms(self) -> float:
        return 1000 * statistics.median(self.ttft_s)


@dataclass
class StreamResult:
    ttft_s: float
    total_s: float
    tokens: int


async def stream_one(client: httpx.AsyncClient, target: Target, request: Request) -> StreamResult:
    body: dict[str, object] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.chat is not None:
        body["messages"] = [{"role": "user", "content": request.chat}]
    else:
        body["prompt"] = list(request.prompt)
    headers = {"Authorization": f"Bearer {target.api_key}"}
    started = time.perf_counter()
    ttft: float | None = None
    tokens: int | None = None
    async with client.stream("POST", f"{target.url}{request.path}", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            text = (await reply.aread()).decode(errors="replace")[:300]
            raise LoadError(f"{request.model} at {target.url}: HTTP {reply.status_code}: {text}")
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - started
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    total = time.perf_counter() - started
    if ttft is None or tokens != request.max_tokens:
        raise LoadError(
            f"{request.model} at {target.url}: {tokens} output tokens, expected {request.max_tokens} "
            "(ignore_eos should make every request produce max_tokens)"
        )
    return StreamResult(ttft_s=ttft, total_s=total, tokens=tokens)


async def _run_round(
    target: Target, requests: Sequence[Request], concurrency: int
) -> tuple[int, float, list[float]]:
    pending = iter(requests)
    results: list[StreamResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:

        async def worker() -> None:
            for request in pending:  # the shared iterator hands each request to exactly one worker
                results.append(await stream_one(client, target, request))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return sum(r.tokens for r in results), wall, [r.ttft_s for r in results]


class CpuWatch:
    """Busy CPU time of the machine against that of this process and everything it started.

    The servers and the gateway are children of the benchmark, so "ours" is one process tree;
    the rest of the busy time is other processes' (tests, builds) on the shared machine.
    """

    def _own_cpu(self) -> float:
        total = 0.0
        root = psutil.Process()
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(
            t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        )

    def start(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._busy(), self._own_cpu()

    def foreign_share(self, mark: tuple[float, float, float]) -> float:
        wall = time.perf_counter() - mark[0]
        busy = self._busy() - mark[1]
        own = self._own_cpu() - mark[2]
        cores = psutil.cpu_count() or 1
        return max(0.0, (busy - own) / (wall * cores)) if wall > 0 else 0.0


def measure_round(
    arm: str, target: Target, requests: Sequence[Request], concurrency: int, watch: CpuWatch
) -> RoundResult:
    mark = watch.start()
    tokens, wall, ttft = asyncio.run(_run_round(target, requests, concurrency))
    return RoundResult(
        arm=arm, tokens=tokens, wall_s=wall, ttft_s=ttft, foreign_share=watch.foreign_share(mark)
    )


def make_prompts(n: int, length: int, low: int, high: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` prompts of ``length`` token ids drawn uniformly from [low, high) (no special tokens)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(x) for x in rng.integers(low, high, size=length)) for _ in range(n)]


def zipf_weights(n: int, exponent: float) -> list[float]:
    raw = [1.0 / (rank**exponent) for rank in range(1, n + 1)]
    return [w / sum(raw) for w in raw]


def pick_models(
    models: Sequence[str], n: int, seed: int, weights: Sequence[float] | None = None
) -> list[str]:
    """A fixed, seeded sequence of ``n`` model names, uniform or with the given popularity."""
    rng = np.random.default_rng(seed)
    return [str(m) for m in rng.choice(list(models), size=n, p=None if weights is None else list(weights))]


def bootstrap_median(values: Sequence[float], draws: int = 10_000) -> tuple[float, float, float]:
    """Median of ``values`` and a seeded bootstrap 95% interval of that median."""
    array = np.array(values, dtype=float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    medians = np.median(array[rng.integers(0, len(array), size=(draws, len(array)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(array)), float(low), float(high)

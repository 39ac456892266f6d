"""After a load: does the adapter change what the server answers? One fixed prompt, adapter and base.

vLLM loads an adapter whose update is zero (an untrained or zeroed adapter, ``lora_alpha`` 0, weights so
small they vanish in the model's precision) without a complaint, and then answers every request for it
exactly as the base model would: the quietest failure there is. So after each load the same fixed
prompt goes, through the OpenAI-compatible completions API (greedy, a few tokens, the top
log-probabilities of each), to the adapter and to the base model. The adapter is applied when the
answers differ: another token, another top-``TOP_LOGPROBS`` set, or a log-probability more than
``TOLERANCE`` apart. When they do not, the probe raises :class:`AdapterHasNoEffectError` and the caller
rolls the load back (``platform/adapters.py``; ``reconcile.sync_replica``, which the pods' reconciler
and ``adapters sync`` run; ``rehydrate.rehydrate_at_runtime``, what a starting server loads).

The registration checks (``serving/adapter_weights.py``) already refuse an adapter whose every
``lora_A`` or every ``lora_B`` is all zeros; this probe catches what only the running model shows.

A base model that cannot answer a completion (a pooling or classification model) is not probed; the
probe is then logged as skipped, and the load stands.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.serving.client import AdapterError, ServerError, ServerUnavailableError, VLLMAdminClient

log = logging.getLogger("loraplane.serving")

PROMPT = "The capital of France is"
MAX_TOKENS = 4
TOP_LOGPROBS = 5
TOLERANCE = 1e-4  # log-probabilities closer than this count as the same
ATTEMPTS = 3  # probes in a row that must all show no effect before a load is undone


class AdapterHasNoEffectError(AdapterError):
    """The server answers the probe prompt with the adapter exactly as without it (exit 2)."""


@dataclass(frozen=True)
class Position:
    token: str
    logprob: float
    top: dict[str, float]


@dataclass(frozen=True)
class ProbeResult:
    adapter: str
    base: str
    changed: bool | None  # None: not probed (the base model cannot answer a completion)
    max_difference: float  # the largest log-probability difference seen where both answers agree
    detail: str  # where they first differ, or why they were not compared


def positions(answer: dict[str, Any]) -> list[Position]:
    """The generated tokens of a completions answer with ``logprobs``, each with its top set."""
    choices = answer.get("choices") or [{}]
    logprobs = choices[0].get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        value = chosen[i] if i < len(chosen) and chosen[i] is not None else math.nan
        out.append(Position(str(token), float(value), {str(k): float(v) for k, v in top.items()}))
    return out


def _close(a: float, b: float, tolerance: float) -> bool:
    return a == b or abs(a - b) <= tolerance  # NaN or inf against anything else: not close


def compare(
    adapter: list[Position], base: list[Position], tolerance: float = TOLERANCE
) -> tuple[bool, float, str]:
    """Whether the two answers differ, the largest log-probability difference seen, and where."""
    largest = 0.0
    if not adapter or not base:
        return True, math.inf, "an answer has no log-probabilities"
    for i, (one, other) in enumerate(zip(adapter, base, strict=False)):
        if one.token != other.token:
            return True, math.inf, f"token {i}: {one.token!r} with the adapter, {other.token!r} without"
        if set(one.top) != set(other.top):
            return True, math.inf, f"token {i}: another top-{len(one.top)} set"
        for key in one.top:
            diff = abs(one.top[key] - other.top[key])
            if math.isfinite(diff):
                largest = max(largest, diff)
            if not _close(one.top[key], other.top[key], tolerance):
                return True, largest, f"token {i}: log-probability of {key!r} moved by {diff:.3g}"
        if not _close(one.logprob, other.logprob, tolerance):
            return True, largest, f"token {i}: its log-probability moved"
    if len(adapter) != len(base):
        return True, largest, f"{len(adapter)} tokens with the adapter, {len(base)} without"
    return (
        False,
        largest,
        f"{len(adapter)} greedy tokens, each with the same top-{TOP_LOGPROBS} log-probabilities",
    )


async def base_model_of(client: VLLMAdminClient) -> str:
    bases = [m.id for m in await client.list_models() if not m.is_adapter]
    if not bases:
        raise ServerError(f"the vLLM server at {client.base_url} serves no base model")
    return bases[0]


async def probe_output(
    client: VLLMAdminClient,
    adapter: str,
    *,
    base: str | None = None,
    prompt: str = PROMPT,
    tolerance: float = TOLERANCE,
) -> ProbeResult:
    """Send ``prompt`` to ``adapter`` and to the base model (``base``, default: the server's) and compare."""
    base = base or await base_model_of(client)
    params: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": TOP_LOGPROBS, "seed": 0}
    try:
        without = await client.completion(base, prompt, **params)
    except ServerUnavailableError:
        raise
    except ServerError as exc:  # a pooling/classification base: nothing to compare with
        return ProbeResult(
            adapter, base, None, 0.0, f"the base model cannot answer a completion: {exc.message}"
        )
    with_adapter = await client.completion(adapter, prompt, **params)
    changed, largest, detail = compare(positions(with_adapter), positions(without), tolerance)
    return ProbeResult(adapter, base, changed, largest, detail)


async def require_effect(
    client: VLLMAdminClient, adapter: str, *, base: str | None = None, unload: bool = True
) -> ProbeResult:
    """:func:`probe_output`, raising :class:`AdapterHasNoEffectError` when the adapter changes nothing;
    with ``unload``, the adapter is unloaded from that server first (best effort).

    "Changes nothing" must hold for ``ATTEMPTS`` probes in a row: under load, with more adapters than
    LoRA slots swapping, vLLM has answered one request for an adapter as the base model would (seen
    once in our serving acceptance test, with a trained adapter that changed the next probe). An adapter
    whose update is really zero answers like the base model every time; a one-off is logged as such.
    """
    result = await probe_output(client, adapter, base=base)
    for attempt in range(2, ATTEMPTS + 1):
        if result.changed is not False:
            break
        log.warning(
            "output probe: the adapter answered as the base model, probing again",
            extra={"adapter": adapter, "server": client.base_url, "attempt": attempt, "of": ATTEMPTS},
        )
        result = await probe_output(client, adapter, base=result.base)
        if result.changed:
            log.warning(
                "output probe: an earlier answer with the adapter was the base model's (vLLM did not "
                "apply it to that request)",
                extra={"adapter": adapter, "server": client.base_url, "attempt": attempt},
            )
    if result.changed is None:
        log.warning("output probe skipped", extra={"adapter": adapter, "why": result.detail})
        return result
    if result.changed:
        log.info(
            "output probe passed",
            extra={"adapter": adapter, "server": client.base_url, "where": result.detail},
        )
        return result
    if unload:
        with contextlib.suppress(LoraplaneError):
            await client.unload_adapter(adapter)
    raise AdapterHasNoEffectError(
        f"{adapter} changes nothing: the server at {client.base_url} answers the probe prompt "
        f"{PROMPT!r} with it exactly as the base model {result.base} does ({result.detail}, all within "
        f"{TOLERANCE:g}; {ATTEMPTS} probes in a row), so vLLM is not applying it; the load was rolled back",
        hint="its LoRA update is (near) zero: an untrained or zeroed adapter, lora_alpha 0, or weights "
        "too small for the model's precision; check the training run (loss curve, learning rate, steps)",
    )

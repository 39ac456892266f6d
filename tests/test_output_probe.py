"""The output probe's verdict (serving/output_probe.py) for answers vLLM gives only rarely.

The probe itself runs against the real vLLM server in tests/test_load_checks_e2e.py (a zeroed adapter
is rolled back, a trained one passes). What the real server cannot be made to do on demand is answer
one request for an adapter as the base model would, then apply the adapter to the next: that fault is
played here by a stand-in for the two calls the probe makes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loraplane.serving.output_probe import ATTEMPTS, AdapterHasNoEffectError, require_effect


def _answer(tokens: list[str], shift: float = 0.0) -> dict[str, Any]:
    return {
        "choices": [
            {
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": [-1.0 - shift for _ in tokens],
                    "top_logprobs": [{t: -1.0 - shift, "x": -2.0} for t in tokens],
                }
            }
        ]
    }


class FlakyServer:
    """Answers the adapter as the base model for its first ``base_like`` requests, then differently."""

    base_url = "http://stand-in"

    def __init__(self, base_like: int) -> None:
        self.base_like = base_like
        self.adapter_requests = 0
        self.unloaded: list[str] = []

    async def completion(self, model: str, prompt: str, **params: Any) -> dict[str, Any]:
        assert params["temperature"] == 0 and params["logprobs"] == 5
        if model == "base":
            return _answer([" Paris", ","])
        self.adapter_requests += 1
        return _answer([" Paris", ","], shift=0.0 if self.adapter_requests <= self.base_like else 0.5)

    async def unload_adapter(self, name: str) -> None:
        self.unloaded.append(name)


def test_one_answer_as_the_base_model_under_load_does_not_roll_the_load_back() -> None:
    server = FlakyServer(base_like=1)
    result = asyncio.run(require_effect(server, "a@v1", base="base"))  # type: ignore[arg-type]
    assert result.changed is True and server.adapter_requests == 2
    assert server.unloaded == []


def test_an_adapter_that_answers_as_the_base_model_every_time_is_unloaded() -> None:
    server = FlakyServer(base_like=10**6)
    with pytest.raises(AdapterHasNoEffectError, match=rf"a@v1 changes nothing.*{ATTEMPTS} probes in a row"):
        asyncio.run(require_effect(server, "a@v1", base="base"))  # type: ignore[arg-type]
    assert server.adapter_requests == ATTEMPTS
    assert server.unloaded == ["a@v1"]

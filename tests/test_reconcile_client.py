"""The admin client's retry policy and error mapping, for faults a running vLLM cannot be made to
produce on demand (a 503 from a proxy in front of it, an engine that dies during a load). What real
vLLM answers (400/404/500, concurrent loads, idempotence) is tested against the real server in
tests/test_serving_acceptance_e2e.py."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from loraplane.serving.client import (
    AdapterBadRequestError,
    AdapterNotFoundError,
    AdapterRejectedError,
    ServerUnavailableError,
    VLLMAdminClient,
)

MODELS = {"data": [{"id": "base", "root": "/models/base", "parent": None}]}


class Scripted(httpx.AsyncBaseTransport):
    """Answers each load with the next scripted (status, body); records every request."""

    def __init__(self, load_answers: list[tuple[int, str]], *, healthy: bool = True) -> None:
        self.load_answers = load_answers
        self.healthy = healthy
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        status, message = self.load_answers.pop(0)
        if status == 200:
            return httpx.Response(200, text=message)
        return httpx.Response(status, json={"error": {"message": message, "type": "x", "code": status}})

    def loads(self) -> int:
        return self.requests.count("POST /v1/load_lora_adapter")


def _client(transport: httpx.AsyncBaseTransport, **kwargs: float) -> VLLMAdminClient:
    return VLLMAdminClient("http://vllm", transport=transport, backoff_s=0.001, **kwargs)  # type: ignore[arg-type]


def test_503_is_retried_with_backoff_until_it_succeeds() -> None:
    transport = Scripted([(503, "loading"), (503, "loading"), (200, "Success")])

    async def go() -> bool:
        async with _client(transport) as client:
            return await client.load_adapter("bot@v1", "/adapters/bot/v1")

    assert asyncio.run(go()) is True
    assert transport.loads() == 3


def test_a_server_that_stays_unavailable_is_given_up_after_the_retries() -> None:
    transport = Scripted([(503, "busy")] * 3)

    async def go() -> None:
        async with _client(transport, retries=2) as client:
            await client.load_adapter("bot@v1", "/adapters/bot/v1")

    with pytest.raises(ServerUnavailableError, match=r"cannot reach .*HTTP 503: busy; 3 tries"):
        asyncio.run(go())
    assert transport.loads() == 3


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (400, AdapterBadRequestError, "conflicts with a served base model"),
        (404, AdapterNotFoundError, "No adapter found"),
        (500, AdapterRejectedError, "greater than max_lora_rank"),
    ],
)
def test_rejections_map_to_typed_errors_and_are_never_retried(
    status: int, error: type[Exception], message: str
) -> None:
    transport = Scripted([(status, message)])

    async def go() -> None:
        async with _client(transport) as client:
            await client.load_adapter("bot@v1", "/adapters/bot/v1")

    with pytest.raises(error, match=message):
        asyncio.run(go())
    assert transport.loads() == 1


def test_a_500_after_which_the_server_is_unhealthy_is_not_blamed_on_the_adapter() -> None:
    transport = Scripted([(500, "EngineDeadError")], healthy=False)

    async def go() -> None:
        async with _client(transport) as client:
            await client.load_adapter("bot@v1", "/adapters/bot/v1")

    with pytest.raises(ServerUnavailableError, match="no longer healthy"):
        asyncio.run(go())


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        attempts: list[str] = []

        class Counting(httpx.AsyncHTTPTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                attempts.append(request.url.path)
                return await super().handle_async_request(request)

        async def go() -> None:
            async with VLLMAdminClient(
                f"http://127.0.0.1:{port}", transport=Counting(), retries=3, backoff_s=0.001
            ) as client:
                await client.list_models()

        with pytest.raises(ServerUnavailableError, match="ConnectError") as err:
            asyncio.run(go())
    assert attempts == ["/v1/models"] * 4
    assert err.value.hint


def test_unload_of_an_unknown_name_is_a_no_op() -> None:
    class Unknown(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            assert json.loads(request.content) == {"lora_name": "ghost@v1"}
            return httpx.Response(404, json={"error": {"message": "cannot be found"}})

    async def go() -> bool:
        async with _client(Unknown()) as client:
            return await client.unload_adapter("ghost@v1")

    assert asyncio.run(go()) is False

"""Forwarding the user routes (:data:`FORWARDED_ROUTES`) to vLLM.

The routes are the ones that name a ``model`` in their JSON body: chat completions, completions,
the Responses API (``POST /v1/responses``) and vLLM's ``POST /tokenize`` and ``POST /detokenize``
(which perplexity evals need). None of them can change the server. The client's key is checked and
dropped; the request's ``model`` is rewritten to the served name; the upstream request carries the
gateway's own key and a fresh request id. Non-streaming answers are
forwarded with their status and body, streams chunk by chunk as they arrive. In both cases, when the
client goes away the upstream connection is closed at once, which makes vLLM abort the generation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplane.serving.gateway.auth import KeyChecker
from loraplane.serving.gateway.errors import (
    BadRequestError,
    BodyTooLargeError,
    GatewayError,
    UnauthorizedError,
    UpstreamAuthError,
    error_body,
)
from loraplane.serving.gateway.metrics import GatewayMetrics
from loraplane.serving.gateway.models import ModelResolver, Target
from loraplane.serving.gateway.refused_params import refuse_prompt_logprobs
from loraplane.serving.gateway.upstream import (
    UPSTREAM_ERRORS,
    UpstreamAnswer,
    UpstreamClient,
    dropped,
    upstream_error,
)

log = logging.getLogger("loraplane.serving.gateway")
T = TypeVar("T")

FORWARDED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize")
# Streams that always carry their usage (in the ``response.completed`` event), asked for or not.
USAGE_ALWAYS_STREAMED = frozenset({"/v1/responses"})
PASSED_BACK_HEADERS = ("content-type",)
# Answers resent once, on a new connection, before anything reached the client: a replica that is
# going away (deleted, drained, its engine stopping) answers these or drops the connection, and a
# new connection lands on another replica (Envoy's retry_on: 5xx,reset does the same).
RESENT_STATUSES = frozenset({500, 502, 503})
CLIENT_CLOSED = 499  # the `code` label of a request whose client left before the answer (nginx's 499)


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:
        raise BadRequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    return body


async def unless_client_leaves(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """``await work()``, or None as soon as the client disconnects (its body must be read already).

    vLLM sends a non-streaming answer's headers only with the answer, so the gateway would notice a
    client that gave up only when it writes, after the whole generation: this notices it at once.
    """
    result: T | None = None
    failure: BaseException | None = None
    left = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal left
            while (await request.receive())["type"] != "http.disconnect":
                pass
            left = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await work()
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
            failure = exc
        tg.cancel_scope.cancel()
    if left:
        if isinstance(result, UpstreamAnswer):
            with anyio.CancelScope(shield=True):
                await result.aclose()
        return None
    if failure is not None:
        raise failure
    return result


class SSEUsage:
    """Finds the ``usage`` object in an SSE stream fed in arbitrary chunks.

    Chat and completion streams (``include_usage``) carry it at the top of their last chunk; Responses
    API streams inside the ``response`` of their ``response.completed`` event.
    """

    MAX_LINE = 1 << 20

    def __init__(self) -> None:
        self._pending = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        if not self._pending and chunk.endswith(b"\n") and b'"usage"' not in chunk:
            return  # whole lines without a usage object: most chunks of a stream, nothing to parse
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > self.MAX_LINE:  # a huge content line: not the usage chunk, skip it
            self._pending = b""
        for line in lines:
            if not (line.startswith(b"data:") and b'"usage"' in line):
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if isinstance(event.get("usage"), dict):
                self.usage = event["usage"]
            elif event.get("type") == "response.completed" and isinstance(event.get("response"), dict):
                usage = event["response"].get("usage")
                if isinstance(usage, dict):
                    self.usage = usage


class UpstreamStream(StreamingResponse):
    """Relays ``relay`` to the client while watching for the client's disconnect.

    On disconnect the relay is cancelled and closed at once (not at the next chunk), and the relay
    closes the upstream response; it is closed in every other case too.
    """

    def __init__(self, relay: AsyncGenerator[bytes, None], status_code: int, headers: dict[str, str]) -> None:
        super().__init__(relay, status_code=status_code, headers=headers)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                with contextlib.suppress(OSError):  # the client went away while we were sending
                    await self.stream_response(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._relay.aclose()


class Proxy:
    def __init__(
        self,
        *,
        upstream: UpstreamClient,
        resolver: ModelResolver,
        keys: KeyChecker,
        metrics: GatewayMetrics,
        max_body_bytes: int,
        allow_prompt_logprobs: bool = False,
    ) -> None:
        self.upstream = upstream
        self.allow_prompt_logprobs = allow_prompt_logprobs
        self.resolver = resolver
        self.keys = keys
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def authorize(self, request: Request) -> None:
        if not self.keys.allows(request.headers.get("authorization")):
            raise UnauthorizedError(
                "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'"
                if request.headers.get("authorization")
                else "Missing API key: send it as 'Authorization: Bearer KEY'"
            )

    async def forward(self, request: Request, route: str) -> Response:
        started = time.perf_counter()
        model = served = ""
        try:
            self.authorize(request)
            body = await read_json_object(request, self.max_body_bytes)
            requested = body.get("model")
            if not isinstance(requested, str) or not requested:
                raise BadRequestError("you must provide a model parameter (a string)")
            if not self.allow_prompt_logprobs:
                refuse_prompt_logprobs(route, body)
            user = body.get("user")
            target = await self.resolver.resolve(requested, user=user if isinstance(user, str) else None)
            model, served = target.requested, target.served
            body["model"] = served
            request_id = uuid.uuid4().hex  # ours, never the client's: vLLM aborts by request id
            upstream = await unless_client_leaves(
                request, lambda: self._send(route, body, request, request_id)
            )
        except GatewayError as exc:
            if exc.upstream_reason:
                self.metrics.upstream_errors.labels(route, exc.upstream_reason).inc()
                log.warning("upstream request failed", extra={"route": route, "served": served, "error": exc})
            self.metrics.observe(route, model, served, exc.status, time.perf_counter() - started)
            return exc.response()
        if upstream is None:
            return self._client_left(route, target, started)
        if upstream.status_code in (401, 403):  # our key, not the client's: never pass this on as theirs
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            refused = UpstreamAuthError("the model server refused the gateway's credentials")
            self.metrics.upstream_errors.labels(route, refused.upstream_reason or "auth").inc()
            log.error("the model server refused the gateway's upstream API key", extra={"route": route})
            self.metrics.observe(route, model, served, refused.status, time.perf_counter() - started)
            return refused.response()
        if upstream.status_code >= 500:
            self.metrics.upstream_errors.labels(route, "http_5xx").inc()
        headers = {k: upstream.headers[k] for k in PASSED_BACK_HEADERS if k in upstream.headers}
        headers["x-request-id"] = request_id
        is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        if body.get("stream") is True and upstream.status_code == 200 and is_sse:
            options = body.get("stream_options")
            asked = isinstance(options, dict) and options.get("include_usage") is True
            usage = SSEUsage() if asked or route in USAGE_ALWAYS_STREAMED else None
            relay = self._relay(upstream, route, target, started, usage, request_id)
            return UpstreamStream(relay, upstream.status_code, headers)
        return await self._whole(request, upstream, route, target, started, headers)

    async def _send(
        self, route: str, body: dict[str, Any], request: Request, request_id: str
    ) -> UpstreamAnswer:
        headers = {
            "content-type": "application/json",
            "accept": request.headers.get("accept", "application/json"),
            "accept-encoding": "identity",  # bytes are relayed as they come: no compressed streams
            "x-request-id": request_id,
        }
        content = json.dumps(body).encode()
        try:
            answer = await self.upstream.post(route, content, headers)
        except UPSTREAM_ERRORS as exc:
            if not dropped(exc):
                raise upstream_error(exc, f"POST {route}") from None
            # The connection was closed or reset before an answer: its replica went away.
            reason, detail = "dropped", f"{type(exc).__name__}: {exc}"
        else:
            if answer.status_code not in RESENT_STATUSES:
                return answer
            with anyio.CancelScope(shield=True):
                await answer.aclose()
            reason, detail = "status", str(answer.status_code)
        self.metrics.upstream_retries.labels(route, reason).inc()
        log.info("resending on a new connection", extra={"route": route, "reason": reason, "first": detail})
        try:
            return await self.upstream.post(route, content, headers, fresh=True)
        except UPSTREAM_ERRORS as exc:
            raise upstream_error(exc, f"POST {route}") from None

    def _client_left(self, route: str, target: Target, started: float) -> Response:
        self.metrics.observe(
            route, target.requested, target.served, CLIENT_CLOSED, time.perf_counter() - started
        )
        log.debug("client left before the answer", extra={"route": route, "served": target.served})
        return Response(status_code=CLIENT_CLOSED)  # nobody is listening

    async def _whole(
        self,
        request: Request,
        upstream: UpstreamAnswer,
        route: str,
        target: Target,
        started: float,
        headers: dict[str, str],
    ) -> Response:
        try:
            content = await unless_client_leaves(request, upstream.aread)
        except UPSTREAM_ERRORS as exc:
            error = upstream_error(exc, f"POST {route}")
            self.metrics.upstream_errors.labels(route, error.upstream_reason or "transport").inc()
            self.metrics.observe(
                route, target.requested, target.served, error.status, time.perf_counter() - started
            )
            return error.response()
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()  # unread (the client left): vLLM sees the disconnect and aborts
        if content is None:
            return self._client_left(route, target, started)
        if upstream.status_code == 200:
            with contextlib.suppress(ValueError):
                answer = json.loads(content)
                if isinstance(answer, dict):
                    self.metrics.observe_usage(target.requested, target.served, answer.get("usage"))
        seconds = time.perf_counter() - started
        self.metrics.observe(route, target.requested, target.served, upstream.status_code, seconds)
        log.debug(
            "forwarded",
            extra={
                "route": route,
                "model": target.requested,
                "served": target.served,
                "status": upstream.status_code,
                "seconds": round(seconds, 4),
            },
        )
        return Response(content, upstream.status_code, headers=headers)

    async def _relay(
        self,
        upstream: UpstreamAnswer,
        route: str,
        target: Target,
        started: float,
        usage: SSEUsage | None,
        request_id: str,
    ) -> AsyncGenerator[bytes, None]:
        outcome = "client disconnected"
        first = True
        try:
            try:
                async for chunk in upstream.aiter_raw():
                    if first:
                        first = False
                        ttfb = time.perf_counter() - started
                        self.metrics.ttfb_seconds.labels(route, target.requested, target.served).observe(ttfb)
                    if usage is not None:
                        usage.feed(chunk)
                    yield chunk
                outcome = "complete"
            except UPSTREAM_ERRORS as exc:
                outcome = "upstream failed"
                self.metrics.upstream_errors.labels(route, "stream").inc()
                error = upstream_error(exc, "the stream")
                log.warning(
                    "upstream stream broke", extra={"route": route, "served": target.served, "error": exc}
                )
                event = error_body(error.message, error_type=error.error_type, code=error.code)
                yield b"data: " + json.dumps(event).encode() + b"\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()  # before the end of the stream: vLLM sees the disconnect and aborts
            seconds = time.perf_counter() - started
            self.metrics.observe(route, target.requested, target.served, upstream.status_code, seconds)
            if usage is not None and usage.usage is not None:
                self.metrics.observe_usage(target.requested, target.served, usage.usage)
            log.debug(
                "stream ended",
                extra={
                    "route": route,
                    "model": target.requested,
                    "served": target.served,
                    "outcome": outcome,
                    "request_id": request_id,
                    "seconds": round(seconds, 4),
                },
            )

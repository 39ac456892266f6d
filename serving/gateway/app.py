"""The gateway: the OpenAI-compatible front door users talk to, in front of a vLLM server.

It forwards only ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``
(OpenAI's Responses API), and vLLM's ``POST /tokenize`` and ``POST /detokenize`` (perplexity evals
need them), after checking the client's API key and resolving ``model`` through the registry
(``name``, ``name:alias``, ``name@vN`` or a base model). It serves ``GET /v1/models`` and
``GET /v1/models/{id}`` (what the upstream serves, named as the registry names it), and has its own
``GET /health`` and ``GET /metrics``. Every other path and method answers 404, so vLLM's admin
routes (adapter loading, ``/adapters``, ``/pause``, ...) are out of reach.

Run it::

    python -m loraplane.serving.gateway --upstream http://127.0.0.1:8000 --home ~/.loraplane \\
        --api-keys-file keys.txt --upstream-api-key-file vllm.key

or in-process: ``uvicorn.run(create_app(GatewayConfig(...)))``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraplane.common.config_defaults import field_default
from loraplane.common.errors import LoraplaneError
from loraplane.common.logs import configure_logging
from loraplane.common.settings import Settings, default_home
from loraplane.registry.backends import open_registry
from loraplane.serving.gateway.auth import KeyChecker
from loraplane.serving.gateway.config import GatewayConfig, config_from_args
from loraplane.serving.gateway.errors import GatewayError, error_response, transport_error
from loraplane.serving.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from loraplane.serving.gateway.models import ModelResolver, RegistryWatcher, UpstreamModels
from loraplane.serving.gateway.proxy import FORWARDED_ROUTES, Proxy
from loraplane.serving.gateway.registry_poll import PollingRegistryWatcher
from loraplane.serving.gateway.upstream import CONNECT_RETRIES, UpstreamClient

__all__ = ["GatewayConfig", "create_app", "main"]

log = logging.getLogger("loraplane.serving.gateway")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _Upstream:
    """The HTTP clients to vLLM, opened and closed with the app (its lifespan).

    Forwarded requests go through :class:`UpstreamClient` (aiohttp: see upstream.py for why);
    the gateway's own rare calls (``/health``, ``/v1/models``) through one httpx client.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        key = config.upstream_api_key
        self._auth = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self._client: httpx.AsyncClient | None = None
        self.forwarding = UpstreamClient(
            config.upstream,
            headers=self._auth,
            read_timeout_s=config.upstream_timeout_s,
            connect_timeout_s=config.upstream_connect_timeout_s,
        )

    def open(self) -> None:
        self._client = httpx.AsyncClient(
            base_url=self.config.upstream,
            headers=self._auth,
            timeout=httpx.Timeout(
                self.config.upstream_timeout_s, connect=self.config.upstream_connect_timeout_s
            ),
            # retries: connection attempts only (httpcore never resends a request that reached a
            # server). A vLLM pod that just went away leaves iptables pointing at it for a moment; a
            # new connection then lands on a live replica instead of failing the client's request.
            transport=httpx.AsyncHTTPTransport(
                retries=CONNECT_RETRIES,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=8),
            ),
            trust_env=False,  # never route the upstream through a proxy from the environment
        )
        self.forwarding.open()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None
        await self.forwarding.aclose()

    def __call__(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway's upstream client is used outside the app's lifespan")
        return self._client


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway as an ASGI app; each app has its own metrics registry and upstream client."""
    upstream = _Upstream(config)
    metrics = GatewayMetrics()
    registry: RegistryWatcher | PollingRegistryWatcher
    if config.registry == "kubernetes":
        settings = Settings(home=config.home, registry="kubernetes", namespace=config.namespace)
        registry = PollingRegistryWatcher(open_registry(settings), interval=config.registry_poll_s)
    else:
        registry = RegistryWatcher(config.home, check_interval=config.registry_check_interval_s)
    metrics.watch_registry(registry)
    resolver = ModelResolver(
        registry, UpstreamModels(upstream), cache_s=config.models_cache_s, canaries=config.canaries
    )
    proxy = Proxy(
        upstream=upstream.forwarding,
        resolver=resolver,
        keys=KeyChecker(k.get_secret_value() for k in config.api_keys),
        metrics=metrics,
        max_body_bytes=config.max_body_bytes,
        allow_prompt_logprobs=config.allow_prompt_logprobs,
    )
    if not config.api_keys:
        log.warning("the gateway runs WITHOUT authentication (--allow-unauthenticated): anyone can call it")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream.open()
        if isinstance(registry, PollingRegistryWatcher):
            registry.start()
        registry.state()  # read the registry now: a broken one shows in the log at startup
        log.info("gateway ready", extra={"upstream": config.upstream, "home": str(config.home)})
        try:
            yield
        finally:
            if isinstance(registry, PollingRegistryWatcher):
                registry.stop()
            await upstream.aclose()

    app = FastAPI(
        title="loraplane gateway",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        swagger_ui_oauth2_redirect_url=None,
        redirect_slashes=False,
        lifespan=lifespan,
    )

    def forwarder(route: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return await proxy.forward(request, route)

        return handler

    # Plain Starlette routes: FastAPI's request handling (dependency solving, response validation)
    # has nothing to do for a body that is forwarded, and costs CPU on every request.
    for route in FORWARDED_ROUTES:
        app.router.routes.append(Route(route, forwarder(route), methods=["POST"]))

    async def answer_models(
        request: Request, route: str, lookup: Callable[[], Awaitable[dict[str, Any]]]
    ) -> Response:
        started = time.perf_counter()
        try:
            proxy.authorize(request)
            body = await lookup()
        except GatewayError as exc:
            if exc.upstream_reason:
                metrics.upstream_errors.labels(route, exc.upstream_reason).inc()
            metrics.observe(route, "", "", exc.status, time.perf_counter() - started)
            return exc.response()
        # A found card's id is one the gateway lists (a bounded set), never a caller's free-form input.
        model = body["id"] if body.get("object") == "model" else ""
        metrics.observe(route, model, "", 200, time.perf_counter() - started)
        return JSONResponse(body)

    @app.get("/v1/models", include_in_schema=False)
    async def models(request: Request) -> Response:
        return await answer_models(request, "/v1/models", resolver.listing)

    @app.get("/v1/models/{model_id:path}", include_in_schema=False)
    async def model(request: Request, model_id: str) -> Response:
        return await answer_models(request, "/v1/models/{id}", lambda: resolver.card(model_id))

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        """200 only while the upstream's /health answers 200 (unauthenticated, like vLLM's)."""
        try:
            response = await upstream().get("/health", timeout=5.0)
        except httpx.TransportError as exc:
            error = transport_error(exc, "GET /health")
            return error_response(error.status, error.message, error_type=error.error_type, code=error.code)
        if response.status_code != 200:
            return error_response(
                503,
                f"the model server is unhealthy (its /health answered {response.status_code})",
                error_type="server_error",
                code="upstream_unhealthy",
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/{path:path}", methods=ALL_METHODS, include_in_schema=False)
    async def not_found(request: Request, path: str) -> Response:
        metrics.observe("other", "", "", 404, 0.0)
        return _not_found(request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc, extra={"path": request.url.path})
        return error_response(
            500, "internal error in the gateway", error_type="server_error", code="internal_error"
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Methods the catch-all does not list (TRACE, ...) end here: they are 404s too, never 405s.
        return (
            _not_found(request)
            if exc.status_code in (404, 405)
            else error_response(exc.status_code, exc.detail)
        )

    app.state.metrics = metrics
    app.state.registry = registry
    return app


def _not_found(request: Request) -> Response:
    return error_response(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loraplane.serving.gateway",
        description="The OpenAI-compatible gateway in front of a vLLM server (see docs/serving.md).",
    )
    p.add_argument("--upstream", default=os.environ.get("LORAPLANE_SERVER_URL"), help="vLLM's base URL")
    p.add_argument("--home", type=Path, default=default_home(), help="state directory (the local registry)")
    p.add_argument(
        "--registry",
        choices=("local", "kubernetes"),
        default=field_default(Settings, "registry"),
        help="local: HOME/registry.json; kubernetes: LoraAdapter objects in --namespace (polled)",
    )
    p.add_argument("--namespace", default=field_default(Settings, "namespace"))
    p.add_argument("--api-keys-file", type=Path, help="client API keys, one per line (# comments)")
    p.add_argument("--upstream-api-key-file", type=Path, help="vLLM's --api-key (else LORAPLANE_API_KEY)")
    p.add_argument("--allow-unauthenticated", action="store_true", help="run without client API keys")
    p.add_argument(
        "--allow-prompt-logprobs",
        action="store_true",
        help="forward echo + logprobs and prompt_logprobs requests (refused by default: they kill vLLM "
        "0.32's engine when they share a batch on a LoRA server; only for a server with no other traffic)",
    )
    p.add_argument("--host", default=field_default(GatewayConfig, "host"))
    p.add_argument("--port", type=int, default=field_default(GatewayConfig, "port"))
    p.add_argument(
        "--canary",
        action="append",
        default=[],
        metavar="NAME:ALIAS=PERCENT",
        help="send PERCENT of NAME and NAME:prod requests to NAME:ALIAS (repeatable); merged with "
        "LORAPLANE_GATEWAY_CANARIES, this flag winning for the same NAME",
    )
    p.add_argument(
        "--upstream-timeout",
        type=float,
        default=field_default(GatewayConfig, "upstream_timeout_s"),
        help="seconds to wait for upstream bytes",
    )
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = config_from_args(args, os.environ)
    except LoraplaneError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level="warning" if args.verbose == 0 else "info",
        access_log=args.verbose >= 2,
        timeout_graceful_shutdown=10,
    )
    return 0

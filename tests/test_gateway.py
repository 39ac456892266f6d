"""The gateway without vLLM: keys, blocked routes, model resolution, registry reloads, upstream failures.

The upstream here is a small real HTTP server (a FastAPI app under uvicorn) that records what reaches
it; everything about forwarding to the real vLLM server is in test_gateway_e2e.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from support import http, wait_until

from loraplane.common.errors import ConfigError, InvalidInputError
from loraplane.common.files import atomic_write_text
from loraplane.common.settings import Settings
from loraplane.platform.adapters import set_canary
from loraplane.platform.quickstart import free_port
from loraplane.registry.local import LocalRegistry
from loraplane.registry.model import Adapter, AdapterVersion, RegistryState, VersionState, move_alias
from loraplane.serving.gateway.app import GatewayConfig, create_app, main, parse_args
from loraplane.serving.gateway.auth import KeyChecker, load_client_keys, load_upstream_key
from loraplane.serving.gateway.canary import CANARIES_ENV, CanaryRule, parse_canary, takes_canary
from loraplane.serving.gateway.config import config_from_args
from loraplane.serving.gateway.models import ModelResolver, RegistryWatcher, UpstreamModels

CLIENT_KEY = "client-key-1"
UPSTREAM_KEY = "upstream-key-9"
BASE = "tiny-base"
DEADLINE_S = 10.0
RESPONSES_USAGE = {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}
ADMIN_PATHS = [
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/adapters",
    "/adapters/demo@v1",
    "/pause",
    "/resume",
    "/invocations",
    "/tokenizer_info",
    "/v1/responses/resp_1",
    "/v1/responses/resp_1/cancel",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/v1/embeddings",
    "/metrics/",
    "/",
]


# --- serving an ASGI app for real, in a background thread -------------------------------------------


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert server.ready.wait(DEADLINE_S) and server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "the server did not stop"


# --- a registry of the test's own ---------------------------------------------------------------------


def version(name: str, v: str, state: VersionState = "serving") -> AdapterVersion:
    path = f"/adapters/{name}/{v}"
    return AdapterVersion(
        name=name, version=v, served_name=f"{name}@{v}", path=path, weights_sha256="0" * 64, state=state
    )


def write_registry(home: Path, name: str = "demo", prod: str | None = "v1") -> LocalRegistry:
    registry = LocalRegistry(home)
    with registry.transaction() as state:
        state.adapters[name] = Adapter(
            name=name,
            versions={
                v.version: v
                for v in (version(name, "v1"), version(name, "v2"), version(name, "v3", "retired"))
            },
        )
        if prod:
            move_alias(state, name, "prod", prod, expected=None, action="promote")
    return registry


# --- a small real upstream that records what reaches it -----------------------------------------------


@dataclass
class Upstream:
    healthy: bool = True
    loaded: list[str] = field(default_factory=lambda: ["demo@v1", "stray@v1"])  # adapters it serves
    required_key: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    stream_closed: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)
    fail_next: list[int] = field(default_factory=list)  # statuses the next requests get, in order

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse({}, 200 if self.healthy else 500)

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            self.requests.append({"path": "/v1/models", "auth": request.headers.get("authorization")})
            base = {
                "id": BASE,
                "object": "model",
                "root": "/models/tiny",
                "parent": None,
                "max_model_len": 256,
            }
            loras = [
                {"id": a, "object": "model", "root": f"/adapters/{a}", "parent": BASE} for a in self.loaded
            ]
            cards = [base, *loras]
            return JSONResponse({"object": "list", "data": cards})

        @app.post("/v1/chat/completions")
        @app.post("/v1/completions")
        @app.post("/v1/responses")
        @app.post("/tokenize")
        @app.post("/detokenize")
        async def complete(request: Request) -> Any:
            body = await request.json()
            self.requests.append(
                {
                    "path": request.url.path,
                    "auth": request.headers.get("authorization"),
                    "request_id": request.headers.get("x-request-id"),
                    "body": body,
                }
            )
            self.arrived.set()
            if self.fail_next:
                return JSONResponse({"error": {"message": "engine is shutting down"}}, self.fail_next.pop(0))
            if self.required_key and request.headers.get("authorization") != f"Bearer {self.required_key}":
                return JSONResponse({"error": {"message": "Unauthorized"}}, 401)
            if body.get("hold"):  # answer only when released, unless the caller hangs up first
                while not self.release.is_set():
                    if await request.is_disconnected():
                        self.abandoned.set()
                        return JSONResponse({}, 500)
                    await anyio.sleep(0.01)
            path = request.url.path
            if path == "/tokenize":
                return JSONResponse({"count": 3, "max_model_len": 256, "tokens": [5, 6, 7]})
            if path == "/detokenize":
                return JSONResponse({"prompt": "hi"})
            if body.get("stream"):
                stream = self._responses_stream(body) if path == "/v1/responses" else self._stream(body)
                return StreamingResponse(stream, media_type="text/event-stream")
            if path == "/v1/responses":
                return JSONResponse({"object": "response", "model": body["model"], "usage": RESPONSES_USAGE})
            return JSONResponse(
                {
                    "model": body["model"],
                    "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                }
            )

        return app

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            yield b'data: {"choices": [{"delta": {"content": "first"}}], "usage": null}\n\n'
            # The rest waits for the test: the first chunk must reach the client before it is released.
            while not self.release.is_set():
                await anyio.sleep(0.01)
            yield b'data: {"choices": [{"delta": {"content": "second"}}], "usage": null}\n\n'
            if body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.stream_closed.set()

    async def _responses_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """The Responses API's events; the usage comes only in ``response.completed``, unasked."""
        created = {"type": "response.created", "response": {"model": body["model"], "usage": None}}
        done = {"type": "response.completed", "response": {"model": body["model"], "usage": RESPONSES_USAGE}}
        for event in (created, done):
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

    def chats(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] != "/v1/models"]


@dataclass
class Env:
    url: str
    upstream: Upstream
    home: Path

    def client(self, key: str | None = CLIENT_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=DEADLINE_S)


@contextmanager
def running_gateway(home: Path, **config_fields: Any) -> Iterator[Env]:
    """Upstream server + registry (demo: v1 prod, v2, v3 retired) + gateway, all real HTTP on loopback."""
    upstream = Upstream()
    write_registry(home)
    with serve(upstream.app()) as upstream_url:
        config = GatewayConfig(
            upstream=upstream_url,
            home=home,
            api_keys=(CLIENT_KEY, "client-key-2"),
            upstream_api_key=UPSTREAM_KEY,
            **config_fields,
        )
        with serve(create_app(config)) as url:
            yield Env(url, upstream, home)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Env]:
    with running_gateway(tmp_path / "state") as env:
        yield env


@pytest.fixture(scope="module")
def routes_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One gateway for the many route checks: nothing they send may ever reach its upstream."""
    with running_gateway(tmp_path_factory.mktemp("routes") / "state") as env:
        yield env


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def metric(url: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 when there are none)."""
    text = http().get(f"{url}/metrics").text
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert "Traceback" not in response.text
    return dict(error)


# --- API keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong",
        f"Bearer {CLIENT_KEY}x",
        f"Basic {CLIENT_KEY}",
        f"Bearer {UPSTREAM_KEY}",
        "Bearer",
    ],
)
def test_missing_or_wrong_key_gets_401_and_nothing_reaches_the_upstream(
    gateway: Env, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(base_url=gateway.url, headers=headers) as client:
        error = assert_openai_error(
            client.post("/v1/chat/completions", json=chat("demo")), 401, "invalid_api_key"
        )
        assert error["type"] == "invalid_request_error"
        assert_openai_error(client.post("/v1/completions", json={"model": "demo"}), 401, "invalid_api_key")
        assert_openai_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert gateway.upstream.requests == []
    assert metric(gateway.url, "loraplane_gateway_requests_total", {"code": "401", "model": ""}) == 3


def test_every_configured_key_works_with_any_case_of_bearer(gateway: Env) -> None:
    for authorization in (f"Bearer {CLIENT_KEY}", "bearer client-key-2", f"BEARER   {CLIENT_KEY}"):
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions", json=chat("demo"), headers={"Authorization": authorization}
        )
        assert response.status_code == 200, (authorization, response.text)


def test_key_sources_merge_skip_comments_and_keep_upstream_key_separate(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team a\nkey-a\n\n  key-b  \n# key-c is revoked\nkey-a\n")
    env = {"LORAPLANE_GATEWAY_API_KEYS": "key-d, ,key-b", "LORAPLANE_API_KEY": "vllm-key"}
    assert load_client_keys(keys, env) == ("key-a", "key-b", "key-d")
    assert load_client_keys(None, {}) == ()
    assert load_upstream_key(None, env) == "vllm-key"
    (tmp_path / "vllm.key").write_text("file-key\n")
    assert load_upstream_key(tmp_path / "vllm.key", env) == "file-key"
    checker = KeyChecker(["key-a", "key-b"])
    assert checker.allows("Bearer key-b") and not checker.allows("Bearer key-") and not checker.allows(None)
    assert KeyChecker([]).allows(None)  # only with --allow-unauthenticated


def test_no_keys_is_refused_unless_unauthenticated_is_explicit(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="allow-unauthenticated"):
        GatewayConfig(upstream="http://127.0.0.1:9", home=tmp_path)
    assert (
        GatewayConfig(upstream="http://127.0.0.1:9", home=tmp_path, allow_unauthenticated=True).api_keys == ()
    )
    with pytest.raises(ValidationError, match="http"):
        GatewayConfig(upstream="127.0.0.1:9", home=tmp_path, api_keys=("k",))
    config = GatewayConfig(upstream="http://127.0.0.1:9/", home=tmp_path, api_keys=("sekrit",))
    assert "sekrit" not in repr(config) and config.upstream == "http://127.0.0.1:9"


def test_cli_refuses_to_start_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAPLANE_GATEWAY_API_KEYS", raising=False)
    code = main(["--upstream", "http://127.0.0.1:9", "--home", str(tmp_path)])
    assert code == 2
    assert "refusing to start without API keys" in capsys.readouterr().err


def test_cli_serves_with_a_key_file_and_answers_health_while_upstream_is_down(tmp_path: Path) -> None:
    """The entry point as a process: it starts, checks keys, and sees that the upstream is down."""
    keys = tmp_path / "keys"
    keys.write_text("# clients\ncli-key\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLANE_")}
    argv = [
        sys.executable,
        "-m",
        "loraplane.serving.gateway",
        "--upstream",
        f"http://127.0.0.1:{free_port()}",
    ]
    argv += ["--home", str(tmp_path / "state"), "--api-keys-file", str(keys), "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the gateway did not start"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                proc_wait(proc, 0.1)
        assert_openai_error(health, 503, "upstream_unavailable")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        down = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer cli-key"})
        assert_openai_error(down, 503, "upstream_unavailable")  # the key was accepted
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE_S)
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def proc_wait(proc: subprocess.Popen[str], seconds: float) -> None:
    """Wait for the process to exit, at most ``seconds`` (a poll that notices an early exit at once)."""
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


# --- routes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_admin_and_other_routes_are_404_with_or_without_a_key(
    routes_gateway: Env, path: str, method: str
) -> None:
    gateway = routes_gateway
    body = {"lora_name": "x", "lora_path": "/tmp/x", "name": "x", "src": "/tmp/x"}
    for key in (CLIENT_KEY, None):
        with gateway.client(key) as client:
            response = client.request(method, path, json=body if method == "POST" else None)
            assert_openai_error(response, 404, "not_found")
    assert gateway.upstream.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/completions"),
        ("POST", "/v1/models"),
        ("DELETE", "/adapters/demo@v1"),
        ("POST", "/health"),
        ("TRACE", "/v1/models"),
        ("POST", "/v1/chat/completions/"),
    ],
)
def test_other_methods_on_known_paths_are_404_too(routes_gateway: Env, method: str, path: str) -> None:
    gateway = routes_gateway
    with gateway.client() as client:
        response = client.request(method, path)
    assert response.status_code == 404, response.text
    assert gateway.upstream.chats() == []


# --- model resolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("nope", "does not exist"),
        ("demo@v9", "has no version 'v9'"),
        ("demo:staging", "has no alias 'staging'"),
        ("demo@v3", "demo@v3 is retired"),
        ("stray@v1", "does not exist"),  # the upstream serves it, but it is not in the registry
        ("../etc", "does not exist"),
    ],
)
def test_unknown_or_retired_models_are_404_model_not_found(gateway: Env, model: str, fragment: str) -> None:
    with gateway.client() as client:
        error = assert_openai_error(
            client.post("/v1/chat/completions", json=chat(model)), 404, "model_not_found"
        )
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert gateway.upstream.chats() == []


def test_bad_bodies_are_400_and_413(gateway: Env) -> None:
    with gateway.client() as client:
        assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
        assert client.post("/v1/chat/completions", json=["a"]).status_code == 400
        assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        big = {"model": "demo", "prompt": "x" * (9 * 1024 * 1024)}
        assert_openai_error(client.post("/v1/completions", json=big), 413, "request_too_large")
    assert gateway.upstream.chats() == []


@pytest.mark.parametrize(
    ("model", "served"),
    [("demo", "demo@v1"), ("demo:prod", "demo@v1"), ("demo@v2", "demo@v2"), (BASE, BASE)],
)
def test_model_is_rewritten_and_the_upstream_gets_its_own_key_never_the_clients(
    gateway: Env, model: str, served: str
) -> None:
    with gateway.client() as client:
        response = client.post("/v1/chat/completions", json=chat(model, temperature=0))
    assert response.status_code == 200 and response.json()["model"] == served
    (forwarded,) = gateway.upstream.chats()
    assert forwarded["body"] == chat(served, temperature=0)
    assert forwarded["auth"] == f"Bearer {UPSTREAM_KEY}"
    assert forwarded["request_id"] == response.headers["x-request-id"]  # ours, not the client's
    labels = {"route": "/v1/chat/completions", "model": model, "served": served}
    assert metric(gateway.url, "loraplane_gateway_requests_total", {**labels, "code": "200"}) == 1
    assert metric(gateway.url, "loraplane_gateway_tokens_total", {"served": served, "kind": "prompt"}) == 7
    assert (
        metric(gateway.url, "loraplane_gateway_tokens_total", {"served": served, "kind": "completion"}) == 3
    )


def test_models_lists_bases_versions_aliases_and_names_with_what_they_point_at(gateway: Env) -> None:
    gateway.upstream.loaded.append("demo@v2")
    with gateway.client() as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert set(cards) == {BASE, "demo@v1", "demo@v2", "demo:prod", "demo"}  # no retired v3, no stray
    assert (cards["demo:prod"]["parent"], cards["demo:prod"]["root"]) == ("demo@v1", BASE)
    assert cards["demo"]["parent"] == "demo@v1"
    assert (cards["demo@v2"]["parent"], cards[BASE]["parent"]) == (BASE, None)
    assert cards[BASE]["root"] == BASE  # not the server's model path
    assert all(c["object"] == "model" for c in cards.values())


def listed(env: Env) -> set[str]:
    with env.client() as client:
        response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {c["id"] for c in response.json()["data"]}


def test_models_lists_only_what_the_upstream_serves_and_sees_a_load_at_once(gateway: Env) -> None:
    """demo@v2 is registered but the upstream does not serve it (not loaded, or refused): not listed."""
    assert listed(gateway) == {BASE, "demo@v1", "demo:prod", "demo"}
    gateway.upstream.loaded.append("demo@v2")  # loaded now: the next listing sees it (within 1 s)
    wait_until(lambda: "demo@v2" in listed(gateway), "demo@v2 to be listed", timeout=DEADLINE_S, every=0.05)
    with LocalRegistry(gateway.home).transaction() as state:
        move_alias(state, "demo", "prod", "v2", expected="v1", action="promote")
        move_alias(state, "demo", "staging", "v1", expected=None, action="promote")
    gateway.upstream.loaded.remove("demo@v1")  # unloaded: demo@v1 and the alias pointing at it go
    wait_until(lambda: "demo@v1" not in listed(gateway), "demo@v1 to go", timeout=DEADLINE_S, every=0.05)
    assert listed(gateway) == {BASE, "demo@v2", "demo:prod", "demo"}


def test_models_retrieve_answers_a_listed_id_and_404_in_openai_shape_otherwise(gateway: Env) -> None:
    with gateway.client() as client:
        prod = client.get("/v1/models/demo:prod")
        assert prod.status_code == 200, prod.text
        assert prod.json() == {
            "id": "demo:prod",
            "object": "model",
            "created": prod.json()["created"],
            "owned_by": "loraplane",
            "root": BASE,
            "parent": "demo@v1",
        }
        assert client.get("/v1/models/demo%40v1").json()["id"] == "demo@v1"  # percent-encoded too
        assert client.get(f"/v1/models/{BASE}").json()["max_model_len"] == 256
        for unknown in ("nope", "demo@v2", "demo@v3", "stray@v1", "demo:staging", "a/b/c"):
            error = assert_openai_error(client.get(f"/v1/models/{unknown}"), 404, "model_not_found")
            assert f"`{unknown}` does not exist" in error["message"], error
    with gateway.client(key=None) as anonymous:
        assert_openai_error(anonymous.get("/v1/models/demo:prod"), 401, "invalid_api_key")
    route = {"route": "/v1/models/{id}"}
    assert metric(gateway.url, "loraplane_gateway_requests_total", {**route, "model": "demo:prod"}) == 1
    assert metric(gateway.url, "loraplane_gateway_requests_total", {**route, "model": "", "code": "404"}) == 6


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/tokenize", {"prompt": "hi"}),
        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}),
        ("/detokenize", {"tokens": [5, 6, 7]}),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 4}),
    ],
)
def test_tokenize_detokenize_and_responses_are_forwarded_like_completions(
    gateway: Env, route: str, body: dict[str, Any]
) -> None:
    """Keys, alias resolution, the upstream's own key, 404 for unknown models, metrics: as for chat."""
    with gateway.client() as client:
        response = client.post(route, json={"model": "demo:prod", **body})
        assert response.status_code == 200, response.text
        assert_openai_error(client.post(route, json={"model": "demo@v9", **body}), 404, "model_not_found")
        assert client.post(route, json=body).status_code == 400  # no model
    with gateway.client(key="wrong") as client:
        assert_openai_error(client.post(route, json={"model": "demo", **body}), 401, "invalid_api_key")
    (forwarded,) = gateway.upstream.chats()
    assert forwarded["path"] == route and forwarded["body"] == {"model": "demo@v1", **body}
    assert forwarded["auth"] == f"Bearer {UPSTREAM_KEY}"
    labels = {"route": route, "model": "demo:prod", "served": "demo@v1"}
    assert metric(gateway.url, "loraplane_gateway_requests_total", {**labels, "code": "200"}) == 1
    assert metric(gateway.url, "loraplane_gateway_requests_total", {"route": route, "code": "404"}) == 1
    assert metric(gateway.url, "loraplane_gateway_requests_total", {"route": route, "code": "401"}) == 1
    tokens = metric(gateway.url, "loraplane_gateway_tokens_total", {"served": "demo@v1", "kind": "prompt"})
    assert tokens == (11 if route == "/v1/responses" else 0)  # the Responses API names them input_tokens


def test_a_responses_stream_is_relayed_and_its_usage_counted_without_include_usage(gateway: Env) -> None:
    body = {"model": "demo", "input": "hi", "stream": True}
    with gateway.client() as client, client.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = b"".join(response.iter_raw())
    assert events.count(b"event: response.") == 2 and b'"model": "demo@v1"' in events
    labels = {"model": "demo", "served": "demo@v1"}
    assert metric(gateway.url, "loraplane_gateway_tokens_total", {**labels, "kind": "completion"}) == 4
    assert metric(gateway.url, "loraplane_gateway_time_to_first_byte_seconds_count", labels) == 1


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/v1/responses"])
def test_user_routes_other_than_post_are_404_and_post_needs_a_key(routes_gateway: Env, path: str) -> None:
    gateway = routes_gateway
    with gateway.client() as client:
        assert_openai_error(client.get(path), 404, "not_found")
    with gateway.client(key=None) as client:
        assert_openai_error(client.post(path, json={"model": "demo"}), 401, "invalid_api_key")
    assert gateway.upstream.requests == []


# --- the registry changes under a running gateway -----------------------------------------------------


def served_for(env: Env, model: str) -> str:
    with env.client() as client:
        response = client.post("/v1/chat/completions", json=chat(model))
    assert response.status_code == 200, response.text
    return str(response.json()["model"])


def test_alias_flip_is_picked_up_without_restart_and_a_broken_file_keeps_the_last_good_state(
    gateway: Env,
) -> None:
    registry = LocalRegistry(gateway.home)
    assert served_for(gateway, "demo") == "demo@v1"
    with registry.transaction() as state:
        move_alias(state, "demo", "prod", "v2", expected="v1", action="promote")
    deadline = time.monotonic() + DEADLINE_S
    while served_for(gateway, "demo") != "demo@v2":
        assert time.monotonic() < deadline, "the gateway never saw the alias move"

    good = registry.path.read_text()
    warnings = Records()
    logging.getLogger("loraplane.serving.gateway").addHandler(warnings)
    try:
        registry.path.write_text(
            good[: len(good) // 2]
        )  # not how loraplane writes; the gateway must survive it
        # Until the file is mended, the gateway answers from the last good state and says why in its log.
        deadline = time.monotonic() + DEADLINE_S
        while not any("cannot read the registry" in r.getMessage() for r in warnings.records):
            assert served_for(gateway, "demo:prod") == "demo@v2"
            assert time.monotonic() < deadline, "the gateway never read the broken file"
        assert served_for(gateway, "demo:prod") == "demo@v2"
    finally:
        logging.getLogger("loraplane.serving.gateway").removeHandler(warnings)

    atomic_write_text(registry.path, good.replace('"prod": "v2"', '"prod": "v1"'))
    deadline = time.monotonic() + DEADLINE_S
    while served_for(gateway, "demo") != "demo@v1":
        assert time.monotonic() < deadline, "the gateway never recovered from the broken file"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_watcher_rereads_only_on_change_and_at_most_every_interval(tmp_path: Path) -> None:
    now = [0.0]
    write_registry(tmp_path, prod="v1")
    watcher = RegistryWatcher(tmp_path, check_interval=0.2, clock=lambda: now[0])
    assert watcher.state().resolve("demo").version == "v1"
    with LocalRegistry(tmp_path).transaction() as state:
        move_alias(state, "demo", "prod", "v2", expected="v1", action="promote")
    now[0] = 0.1
    assert watcher.state().resolve("demo").version == "v1"  # within the interval: no stat
    now[0] = 0.3
    assert watcher.state().resolve("demo").version == "v2"
    (tmp_path / "registry.json").unlink()
    now[0] = 0.6
    assert watcher.state().adapters == {}  # no file: an empty registry, as LocalRegistry.read says


def test_watcher_reads_a_just_written_file_again_and_an_old_unchanged_one_never(tmp_path: Path) -> None:
    """A file changed within the last 100 ms may be replaced by one with the same stat signature, so its
    signature is trusted only once it is older; an unchanged older file is never read twice."""
    registry = write_registry(tmp_path)
    watcher = RegistryWatcher(tmp_path)
    reads = []
    read = watcher.registry.read

    def counting_read() -> Any:
        reads.append(1)
        return read()

    watcher.registry.read = counting_read  # type: ignore[method-assign]
    watcher.state()
    watcher.state()
    assert len(reads) == 2, "a registry written just now is read again"
    old = time.time() - 5
    os.utime(registry.path, (old, old))  # its ctime changes: one more read, then the file is trusted
    for _ in range(3):
        watcher.state()
    assert len(reads) == 3


# --- the upstream is down or breaks -------------------------------------------------------------------


def test_upstream_down_answers_503_json_on_every_route(tmp_path: Path) -> None:
    home = tmp_path / "state"
    write_registry(home)
    config = GatewayConfig(upstream=f"http://127.0.0.1:{free_port()}", home=home, api_keys=(CLIENT_KEY,))
    with (
        serve(create_app(config)) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client,
    ):
        error = assert_openai_error(
            client.post("/v1/chat/completions", json=chat("demo")), 503, "upstream_unavailable"
        )
        assert error["type"] == "server_error" and "cannot connect" in error["message"]
        assert "127.0.0.1" not in error["message"]  # the internal address is for the log, not for clients
        stream = client.post("/v1/completions", json={"model": "demo@v2", "prompt": "x", "stream": True})
        assert_openai_error(stream, 503, "upstream_unavailable")
        assert_openai_error(client.get("/health"), 503, "upstream_unavailable")
        # Whether an unknown name is a base model cannot be known while the server is down.
        assert_openai_error(
            client.post("/v1/completions", json={"model": "base"}), 503, "upstream_unavailable"
        )
        # What is servable cannot be known either: no listing of what may not answer.
        assert_openai_error(client.get("/v1/models"), 503, "upstream_unavailable")
        assert_openai_error(client.get("/v1/models/demo"), 503, "upstream_unavailable")
        assert metric(url, "loraplane_gateway_upstream_errors_total", {"reason": "connect"}) == 5
        assert metric(url, "loraplane_gateway_requests_total", {"served": "demo@v1", "code": "503"}) == 1


def test_health_follows_the_upstream(gateway: Env) -> None:
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    gateway.upstream.healthy = False
    assert_openai_error(httpx.get(f"{gateway.url}/health"), 503, "upstream_unhealthy")


# --- streaming ----------------------------------------------------------------------------------------


def test_stream_chunks_are_relayed_as_they_arrive_and_usage_is_counted(gateway: Env) -> None:
    body = chat("demo", stream=True, stream_options={"include_usage": True})
    with gateway.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.iter_raw()
        first = next(chunks)
        # The upstream holds the rest until released: the first chunk came through on its own.
        assert b"first" in first and not gateway.upstream.stream_closed.is_set()
        gateway.upstream.release.set()
        rest = b"".join(chunks)
    assert b"second" in rest and rest.endswith(b"data: [DONE]\n\n")
    labels = {"model": "demo", "served": "demo@v1"}
    assert metric(gateway.url, "loraplane_gateway_tokens_total", {**labels, "kind": "completion"}) == 2
    assert metric(gateway.url, "loraplane_gateway_time_to_first_byte_seconds_count", labels) == 1
    assert metric(gateway.url, "loraplane_gateway_requests_total", {**labels, "code": "200"}) == 1


def test_client_disconnect_closes_the_upstream_stream(gateway: Env) -> None:
    with (
        gateway.client() as client,
        client.stream(
            "POST", "/v1/completions", json={"model": "demo@v2", "prompt": "x", "stream": True}
        ) as response,
    ):
        assert b"first" in next(response.iter_raw())
    # The client is gone while the upstream still had more to say: the upstream must see it close.
    assert gateway.upstream.stream_closed.wait(DEADLINE_S), "the upstream stream was left open"
    assert not gateway.upstream.release.is_set()


# --- weighted canary ----------------------------------------------------------------------------------


def test_canary_takes_its_share_of_prod_traffic_per_user_and_never_explicit_names(tmp_path: Path) -> None:
    rule = CanaryRule(alias="canary", percent=30)
    with running_gateway(tmp_path / "state", canaries={"demo": rule}) as env:
        with LocalRegistry(env.home).transaction() as state:
            move_alias(state, "demo", "canary", "v2", expected=None, action="promote")
        users = [f"user-{i}" for i in range(200)]
        with env.client() as client:

            def served(model: str, user: str) -> str:
                response = client.post("/v1/chat/completions", json=chat(model, user=user))
                assert response.status_code == 200, response.text
                return str(response.json()["model"])

            split = {user: served("demo" if i % 2 else "demo:prod", user) for i, user in enumerate(users)}
            to_canary = [u for u in users if takes_canary(rule, "demo", u, random.Random())]
            assert sorted(u for u, v in split.items() if v == "demo@v2") == sorted(to_canary)
            assert 0.15 < len(to_canary) / len(users) < 0.45  # 30 %, give or take what 200 users allow
            assert {served("demo", u) for u in to_canary[:5]} == {"demo@v2"}  # a user stays on its side
            # Names that say which version they want are never diverted.
            assert {served("demo@v1", u) for u in to_canary[:10]} == {"demo@v1"}
            assert {served("demo:canary", u) for u in users[:10]} == {"demo@v2"}
        labels = {"model": "demo", "served": "demo@v2", "code": "200"}
        assert metric(env.url, "loraplane_gateway_requests_total", labels) >= 5


def test_canary_without_its_alias_or_at_100_percent(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "state", canaries={"demo": CanaryRule(percent=100)}) as env:
        assert {served_for(env, "demo") for _ in range(5)} == {"demo@v1"}, "no demo:canary yet: all prod"
        with LocalRegistry(env.home).transaction() as state:
            move_alias(state, "demo", "canary", "v2", expected=None, action="promote")
        assert {served_for(env, "demo") for _ in range(5)} == {"demo@v2"}  # no `user`: a random draw


def test_a_canary_weight_set_in_the_registry_applies_live_and_overrides_the_gateways_rule(
    tmp_path: Path,
) -> None:
    """`loraplane adapters canary` keeps the weight with the adapter: the running gateway follows each
    change at its next registry read, without a restart, over its own --canary rule."""
    with running_gateway(tmp_path / "state", canaries={"demo": CanaryRule(percent=100)}) as env:
        settings = Settings(home=env.home)
        with LocalRegistry(env.home).transaction() as state:
            move_alias(state, "demo", "canary", "v2", expected=None, action="promote")
        assert {served_for(env, "demo") for _ in range(5)} == {"demo@v2"}, "the gateway's own rule: 100 %"
        set_canary(settings, "demo", percent=0)  # the registry's weight wins: nothing to the canary
        wait_until(lambda: served_for(env, "demo") == "demo@v1", "the gateway to read the weight", timeout=10)
        assert {served_for(env, "demo:prod") for _ in range(20)} == {"demo@v1"}
        set_canary(settings, "demo", percent=100)
        wait_until(lambda: served_for(env, "demo") == "demo@v2", "the weight of 100 %", timeout=10)
        assert {served_for(env, "demo") for _ in range(10)} == {"demo@v2"}
        assert served_for(env, "demo@v1") == "demo@v1", "a name that says its version is never diverted"
        set_canary(settings, "demo", percent=None)  # removed: the gateway's own rule applies again
        assert LocalRegistry(env.home).read().adapters["demo"].canary is None
        assert {served_for(env, "demo") for _ in range(5)} == {"demo@v2"}
        events = [
            (e.action, e.reason) for e in LocalRegistry(env.home).read().history if e.action == "canary"
        ]
        assert events == [
            ("canary", "0% to demo:canary"),
            ("canary", "100% to demo:canary"),
            ("canary", "removed"),
        ]
        for bad, field in ((101.0, "percent"), (-1.0, "percent")):
            with pytest.raises(InvalidInputError, match=field):
                set_canary(settings, "demo", percent=bad)
        with pytest.raises(InvalidInputError, match="cannot be prod"):
            set_canary(settings, "demo", percent=5, alias="prod")
        assert len([e for e in LocalRegistry(env.home).read().history if e.action == "canary"]) == 3


def test_canary_rules_from_the_command_line(tmp_path: Path) -> None:
    assert parse_canary("support-bot:canary=12.5") == (
        "support-bot",
        CanaryRule(alias="canary", percent=12.5),
    )
    for bad in ("support-bot=10", "support-bot:prod=10", "support-bot:canary=0", "x:canary=101", "x:c=-1"):
        with pytest.raises(ValueError):
            parse_canary(bad)
    args = [f"--home={tmp_path}", "--upstream=http://127.0.0.1:9", "--allow-unauthenticated"]
    config = config_from_args(parse_args([*args, "--canary", "demo:beta=5"]), {})
    assert config.canaries == {"demo": CanaryRule(alias="beta", percent=5)}
    with pytest.raises(ConfigError, match="--canary"):
        config_from_args(parse_args([*args, "--canary", "demo=5"]), {})


def test_canary_rules_from_the_environment_merge_with_the_command_line_which_wins_per_adapter(
    tmp_path: Path,
) -> None:
    """LORAPLANE_GATEWAY_CANARIES is what the chart's gateway.canary renders (tests/test_chart.py)."""
    args = [f"--home={tmp_path}", "--upstream=http://127.0.0.1:9", "--allow-unauthenticated"]
    env = {CANARIES_ENV: json.dumps({"demo": {"percent": 10}, "other": {"alias": "beta", "percent": 2.5}})}
    assert config_from_args(parse_args(args), env).canaries == {
        "demo": CanaryRule(alias="canary", percent=10),
        "other": CanaryRule(alias="beta", percent=2.5),
    }
    assert config_from_args(parse_args(args), {CANARIES_ENV: " "}).canaries == {}
    warnings = Records()
    logging.getLogger("loraplane.serving.gateway").addHandler(warnings)
    try:
        merged = config_from_args(parse_args([*args, "--canary", "demo:beta=50", "--canary", "new:c=1"]), env)
    finally:
        logging.getLogger("loraplane.serving.gateway").removeHandler(warnings)
    assert merged.canaries == {
        "demo": CanaryRule(alias="beta", percent=50),  # the flag wins for its adapter ...
        "other": CanaryRule(alias="beta", percent=2.5),  # ... and the environment keeps the others
        "new": CanaryRule(alias="c", percent=1),
    }
    (said,) = [r for r in warnings.records if CANARIES_ENV in r.getMessage()]
    assert (said.__dict__["adapter"], said.__dict__["flag"], said.__dict__["env"]) == (
        "demo",
        "beta=50",
        "canary=10",
    )

    for bad, names in [
        ({"demo": {"percent": 0}}, "demo.percent: got 0;"),
        ({"demo": {"percent": 101}}, "demo.percent: got 101;"),
        (
            {"demo": {"alias": "prod", "percent": 5}},
            "demo.alias: got 'prod'; the canary alias cannot be prod",
        ),
        ({"demo": {"weight": 5}}, "demo.weight: unknown field"),
        ({"Demo": {"percent": 5}}, "'Demo' is not an adapter name"),
        ({"demo@v2": {"percent": 5}}, "'demo@v2' is not an adapter name"),
    ]:
        with pytest.raises(ConfigError) as caught:
            config_from_args(parse_args(args), {CANARIES_ENV: json.dumps(bad)})
        assert f"invalid configuration in {CANARIES_ENV}" in str(caught.value) and names in str(caught.value)
        assert "hint:" in str(caught.value) and "gateway.canary" in str(caught.value)
    with pytest.raises(ConfigError, match="Invalid JSON"):
        config_from_args(parse_args(args), {CANARIES_ENV: "demo:canary=10"})
    with pytest.raises(ValidationError, match="cannot be prod"):
        GatewayConfig(upstream="http://u:1", home=tmp_path, allow_unauthenticated=True, canaries={
            "demo": {"alias": "prod", "percent": 5}
        })  # fmt: skip


def test_a_canary_from_the_environment_splits_traffic_by_its_weight(tmp_path: Path) -> None:
    """The gateway the CLI builds from LORAPLANE_GATEWAY_CANARIES (the chart's way), over real HTTP:
    with a `user`, the split is a hash, so exactly the users the rule picks get the canary."""
    home = tmp_path / "state"
    upstream = Upstream()
    write_registry(home)
    with LocalRegistry(home).transaction() as state:
        move_alias(state, "demo", "canary", "v2", expected=None, action="promote")
    environ = {
        CANARIES_ENV: json.dumps({"demo": {"alias": "canary", "percent": 10}}),
        "LORAPLANE_GATEWAY_API_KEYS": CLIENT_KEY,
        "LORAPLANE_API_KEY": UPSTREAM_KEY,
    }
    with serve(upstream.app()) as upstream_url:
        config = config_from_args(parse_args([f"--home={home}", f"--upstream={upstream_url}"]), environ)
        with serve(create_app(config)) as url, Env(url, upstream, home).client() as client:
            users = [f"user-{i}" for i in range(400)]
            served = [
                client.post("/v1/chat/completions", json=chat("demo", user=u)).json()["model"] for u in users
            ]
    rule = config.canaries["demo"]
    picked = [u for u in users if takes_canary(rule, "demo", u, random.Random())]
    assert [u for u, m in zip(users, served, strict=True) if m == "demo@v2"] == picked
    assert {m for m in served} == {"demo@v1", "demo@v2"}
    assert 28 <= len(picked) <= 52, len(picked)  # 10 % of 400 = 40; fixed users, so a fixed count
    assert {r["body"]["model"] for r in upstream.chats()} == {"demo@v1", "demo@v2"}


@pytest.mark.parametrize("percent", [1, 10, 50, 90])
def test_canary_without_user_is_a_seeded_draw_at_the_rules_weight(tmp_path: Path, percent: int) -> None:
    """Requests without `user`: each is one draw of the resolver's random source, so a seeded one
    gives an exact, repeatable count near PERCENT of the requests."""
    registry = write_registry(tmp_path)
    with registry.transaction() as state:
        move_alias(state, "demo", "canary", "v2", expected=None, action="promote")
    env = {CANARIES_ENV: json.dumps({"demo": {"percent": percent}})}
    config = config_from_args(
        parse_args([f"--home={tmp_path}", "--upstream=http://127.0.0.1:9", "--allow-unauthenticated"]), env
    )

    class Snapshot:
        def state(self) -> RegistryState:
            return registry.read()

    def unused() -> httpx.AsyncClient:
        raise AssertionError("adapter names never ask the upstream")

    resolver = ModelResolver(
        Snapshot(), UpstreamModels(unused), canaries=config.canaries, rng=random.Random(1234)
    )

    async def resolve_all() -> list[str]:
        return [(await resolver.resolve("demo")).served for _ in range(4000)]

    served = anyio.run(resolve_all)
    replay = random.Random(1234)
    expected = sum(replay.random() * 100 < percent for _ in range(4000))
    assert served.count("demo@v2") == expected
    assert set(served) <= {"demo@v1", "demo@v2"}
    assert abs(expected / 4000 - percent / 100) < 0.02  # 4000 draws: within 2 points of the weight


@contextmanager
def raw_post(url: str, route: str, body: dict[str, Any], key: str) -> Iterator[socket.socket]:
    """POST ``body`` over a raw socket and hold the connection; leaving the block hangs up mid-request."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(head.encode() + payload)
        yield sock


def test_client_leaving_a_non_streaming_request_closes_the_upstream_request(gateway: Env) -> None:
    with raw_post(gateway.url, "/v1/chat/completions", chat("demo", hold=True), CLIENT_KEY):
        assert gateway.upstream.arrived.wait(DEADLINE_S), "the request never reached the upstream"
    # The client hung up while the upstream was still working on the answer: the upstream must see it.
    assert gateway.upstream.abandoned.wait(DEADLINE_S), "the upstream request was left running"
    assert not gateway.upstream.release.is_set()
    deadline = time.monotonic() + DEADLINE_S
    while metric(gateway.url, "loraplane_gateway_requests_total", {"served": "demo@v1", "code": "499"}) != 1:
        assert time.monotonic() < deadline, "the abandoned request was not counted as 499"


def test_an_upstream_refusing_the_gateways_key_is_a_502_not_the_clients_401(gateway: Env) -> None:
    gateway.upstream.required_key = "rotated-vllm-key"
    with gateway.client() as client:
        error = assert_openai_error(
            client.post("/v1/completions", json={"model": "demo"}), 502, "upstream_auth_failed"
        )
    assert "refused the gateway's credentials" in error["message"]
    assert metric(gateway.url, "loraplane_gateway_upstream_errors_total", {"reason": "auth"}) == 1


# --- a replica going away: one resend on a new connection ----------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_failed_answer_is_resent_once_on_a_new_connection(gateway: Env, status: int) -> None:
    gateway.upstream.fail_next = [status]
    with gateway.client() as client:
        answer = client.post("/v1/chat/completions", json=chat("demo"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "ok"
    sent = gateway.upstream.chats()
    assert len(sent) == 2 and sent[0]["body"] == sent[1]["body"], sent
    assert sent[0]["request_id"] == sent[1]["request_id"] == answer.headers["x-request-id"]
    assert sent[1]["auth"] == f"Bearer {UPSTREAM_KEY}"
    assert metric(gateway.url, "loraplane_gateway_upstream_retries_total", {"reason": "status"}) == 1
    assert metric(gateway.url, "loraplane_gateway_requests_total", {"code": "200"}) == 1


def test_a_second_failure_is_the_answer_and_other_errors_are_never_resent(gateway: Env) -> None:
    gateway.upstream.fail_next = [500, 500, 400, 504]
    with gateway.client() as client:
        first = client.post("/v1/chat/completions", json=chat("demo"))
        assert first.status_code == 500 and "shutting down" in first.text
        assert len(gateway.upstream.chats()) == 2  # once resent, never more
        for status in (400, 504):
            assert client.post("/v1/chat/completions", json=chat("demo")).status_code == status
    assert len(gateway.upstream.chats()) == 4
    assert metric(gateway.url, "loraplane_gateway_upstream_retries_total", {}) == 1


@contextmanager
def raw_http_server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A raw socket server on loopback: each connection goes to ``handle`` in a thread of its own."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with suppress(TimeoutError):
                conn, _ = listener.accept()
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        listener.close()


def read_request(reader: Any) -> str:
    """One HTTP/1.1 request off ``reader``: its request line ("" when the client closed), body skipped."""
    line: str = reader.readline().decode()
    if not line:
        return ""
    length = 0
    while (header := reader.readline().decode()) not in ("\r\n", ""):
        if header.lower().startswith("content-length:"):
            length = int(header.split(":", 1)[1])
    reader.read(length)
    return line


@contextmanager
def dropping_upstream() -> Iterator[tuple[str, list[str]]]:
    """A raw HTTP/1.1 server that closes the first POST's connection unanswered, then answers."""
    seen: list[str] = []
    models = json.dumps(
        {
            "object": "list",
            "data": [
                {"id": BASE, "object": "model", "parent": None},
                {"id": "demo@v1", "object": "model", "parent": BASE},
            ],
        }
    ).encode()
    chat_answer = json.dumps({"model": "demo@v1", "choices": [{"message": {"content": "ok"}}]}).encode()

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while line := read_request(reader):
                seen.append(line.split()[0])
                if line.startswith("POST") and seen.count("POST") == 1:
                    return  # the connection closes with no answer
                body = models if line.startswith("GET") else chat_answer
                head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
                conn.sendall(f"{head}\r\n\r\n".encode() + body)

    with raw_http_server(handle) as url:
        yield url, seen


def test_a_connection_closed_without_an_answer_is_resent_once(tmp_path: Path) -> None:
    home = tmp_path / "state"
    write_registry(home)
    with dropping_upstream() as (upstream_url, seen):
        config = GatewayConfig(upstream=upstream_url, home=home, api_keys=(CLIENT_KEY,))
        with (
            serve(create_app(config)) as url,
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=DEADLINE_S
            ) as client,
        ):
            answer = client.post("/v1/chat/completions", json=chat("demo"))
            assert answer.status_code == 200, answer.text
            assert seen.count("POST") == 2, seen
            assert metric(url, "loraplane_gateway_upstream_retries_total", {"reason": "dropped"}) == 1


# --- an upstream that stalls or breaks: the errors clients and metrics see ----------------------------


def test_an_upstream_silent_past_the_timeout_is_a_504_and_a_stalled_stream_ends_with_an_error_event(
    tmp_path: Path,
) -> None:
    with running_gateway(tmp_path / "state", upstream_timeout_s=0.5) as env, env.client() as client:
        assert_openai_error(
            client.post("/v1/chat/completions", json=chat("demo", hold=True)), 504, "upstream_timeout"
        )
        # The gateway hung up on the upstream: it sees the request abandoned, not answered.
        assert env.upstream.abandoned.wait(DEADLINE_S)
        with client.stream("POST", "/v1/completions", json={"model": "demo", "stream": True}) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data:")]
        # The first chunk came through; then the upstream stalled (it waits for a release that never comes).
        assert "first" in events[0], events
        assert json.loads(events[-1][5:])["error"]["code"] == "upstream_timeout", events
        assert env.upstream.stream_closed.wait(DEADLINE_S), "the stalled upstream stream was left open"
        assert metric(env.url, "loraplane_gateway_upstream_errors_total", {"reason": "timeout"}) == 1
        assert metric(env.url, "loraplane_gateway_upstream_errors_total", {"reason": "stream"}) == 1


def test_a_stream_whose_connection_breaks_midway_ends_with_an_error_event(tmp_path: Path) -> None:
    home = tmp_path / "state"
    write_registry(home)
    with breaking_upstream() as upstream_url:
        config = GatewayConfig(upstream=upstream_url, home=home, api_keys=(CLIENT_KEY,))
        with serve(create_app(config)) as url, Env(url, Upstream(), home).client() as client:
            body = {"model": "demo", "prompt": "x", "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert "first" in events[0], events
            error = json.loads(events[-1][5:])["error"]
            assert error["code"] == "upstream_error" and "the stream" in error["message"], error
            assert metric(url, "loraplane_gateway_upstream_errors_total", {"reason": "stream"}) == 1
            assert metric(url, "loraplane_gateway_upstream_retries_total", {}) == 0  # never resent


@contextmanager
def breaking_upstream() -> Iterator[str]:
    """A raw HTTP/1.1 server whose streams send one chunk, then close the connection mid-answer."""
    models = json.dumps(
        {"object": "list", "data": [{"id": "demo@v1", "object": "model", "parent": BASE}]}
    ).encode()
    event = b'data: {"choices": [{"text": "first"}]}\n\n'

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while line := read_request(reader):
                if line.startswith("GET"):
                    head = (
                        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(models)}"
                    )
                    conn.sendall(f"{head}\r\n\r\n".encode() + models)
                    continue
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
                conn.sendall(head + b"\r\n\r\n%x\r\n%s\r\n" % (len(event), event))
                time.sleep(0.2)
                return  # closed in the middle of the chunked body

    with raw_http_server(handle) as url:
        yield url

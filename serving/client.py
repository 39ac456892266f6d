"""Typed async client for vLLM's model and runtime-LoRA admin endpoints.

vLLM answers ``/v1/load_lora_adapter`` with 200 and a plain-text body on success, 400 for a
duplicate name or a bad request, 404 when the path holds no adapter, and 500 when the engine rejects
the adapter (rank too high, DoRA, no tensors) or fails. Those answers become the exceptions below.

Loads and unloads are idempotent (loading a name that is served from the same path, or unloading
one that is not served, succeeds without a change) and serialized per adapter name within a client
(an ``asyncio.Lock`` per name, the served list re-read inside it). Transient failures (the server
cannot be reached, 502/503/504) are retried with exponential backoff; an answer that rejects the
request (4xx, or a 500 from the engine refusing an adapter) never is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from loraplane.common.errors import ExitCode, LoraplaneError

log = logging.getLogger("loraplane.serving")
T = TypeVar("T")
TRANSIENT_STATUS = (502, 503, 504)


class ServerError(LoraplaneError):
    """Any failure talking to a vLLM server."""


class ServerUnavailableError(ServerError):
    """The server cannot be reached (down, wrong URL, not ready yet), also after retries."""


class AdapterError(ServerError):
    """vLLM answered an adapter request with an error (the request, not the server, is the problem)."""

    exit_code = ExitCode.BAD_INPUT


class AdapterBadRequestError(AdapterError):
    """HTTP 400: vLLM refused the request itself (a name clash with the base model, empty fields)."""


class AdapterNotFoundError(AdapterError):
    """HTTP 404: the server found no adapter at the path (or does not know the name)."""


class AdapterRejectedError(AdapterError):
    """HTTP 500 on load while the server stays healthy: the engine refused the adapter."""


class AdapterConflictError(AdapterError):
    """The served name is already served from another path: served names are immutable."""


@dataclass(frozen=True)
class ModelCard:
    id: str
    root: str | None
    parent: str | None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None

    @classmethod
    def from_json(cls, model: dict[str, Any]) -> ModelCard:
        """One entry of vLLM's ``/v1/models`` ``data`` list."""
        return cls(id=str(model["id"]), root=model.get("root"), parent=model.get("parent"))


def _error_message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    return str(body)


def _same_path(a: str | None, b: str) -> bool:
    return a is not None and os.path.normpath(a) == os.path.normpath(b)


class _Transient(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VLLMAdminClient:
    """``async with VLLMAdminClient(url) as c: await c.list_models()``.

    ``retries`` transient failures are retried per call, waiting ``backoff_s`` and doubling (with
    jitter, at most ``max_backoff_s``) between tries.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Certificates only for https: loading the CA bundle costs ~50 ms of CPU, and seconds on a
        # CPU-only server whose engine keeps the cores busy (the reconciler makes one client a pass).
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=self.base_url.lower().startswith("https://"),
        )

    async def __aenter__(self) -> VLLMAdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = self.backoff_s
        for n in range(self.retries + 1):
            try:
                return await attempt()
            except _Transient as exc:
                if n == self.retries:
                    raise ServerUnavailableError(
                        f"cannot reach the vLLM server at {self.base_url} ({what}: {exc.reason}; "
                        f"{self.retries + 1} tries)",
                        hint="is the server running? start it with `loraplane serve` or check --server-url",
                    ) from None
                log.info("retrying", extra={"what": what, "reason": exc.reason, "in_s": round(delay, 2)})
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried while the failure is transient; returns any other answer."""

        async def attempt() -> httpx.Response:
            try:
                response = await self._client.request(method, path, **kwargs)
            except (
                httpx.ConnectError,
                httpx.ConnectTimeout,
                httpx.RemoteProtocolError,
                httpx.PoolTimeout,
            ) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from None
            except httpx.TransportError as exc:  # a read timeout: the request may be running, do not repeat
                raise ServerUnavailableError(
                    f"{method} {path}: no answer from the vLLM server at {self.base_url} "
                    f"({type(exc).__name__}: {exc})",
                    hint="the server may be overloaded or hung; check its log and /health",
                ) from None
            if response.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {response.status_code}: {_error_message(response)[:200]}")
            return response

        return await self._retrying(f"{method} {path}", attempt)

    async def health(self) -> bool:
        """One try, no retries: a probe answers now."""
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def list_models(self) -> list[ModelCard]:
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise ServerError(f"GET /v1/models: HTTP {response.status_code}: {_error_message(response)}")
        return [ModelCard.from_json(m) for m in response.json().get("data", [])]

    async def completion(self, model: str, prompt: str, **params: Any) -> dict[str, Any]:
        """One ``POST /v1/completions`` (OpenAI's legacy completions API) to ``model``; vLLM's JSON
        answer. An answer other than 200 is a :class:`ServerError` (an :class:`AdapterNotFoundError`
        for a 404: the server does not serve ``model``)."""
        response = await self._request(
            "POST", "/v1/completions", json={"model": model, "prompt": prompt, **params}
        )
        if response.status_code == 404:
            raise AdapterNotFoundError(f"the vLLM server at {self.base_url} does not serve {model!r}")
        if response.status_code != 200:
            raise ServerError(
                f"POST /v1/completions ({model}): HTTP {response.status_code}: {_error_message(response)}"
            )
        body = response.json()
        return body if isinstance(body, dict) else {}

    async def served_adapters(self) -> dict[str, str | None]:
        """Served adapter name -> the path it was loaded from."""
        return {m.id: m.root for m in await self.list_models() if m.is_adapter}

    async def load_adapter(self, name: str, path: str) -> bool:
        """Serve the adapter at ``path`` under ``name``. Returns whether it was loaded now (False: it
        already was, from the same path). A name served from another path is an AdapterConflictError."""
        async with self._locks[name]:
            served = await self.served_adapters()
            if name in served:
                return self._already(name, served[name], path)
            response = await self._request(
                "POST",
                "/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": path, "load_inplace": False},
            )
            if response.status_code == 200:
                log.info("loaded adapter", extra={"adapter": name, "server": self.base_url})
                return True
            message = _error_message(response)
            if response.status_code == 400 and "already been loaded" in message:
                # another client loaded the same name meanwhile: fine if it is the same adapter
                return self._already(name, (await self.served_adapters()).get(name), path)
            raise await self._load_error(name, path, response.status_code, message)

    def _already(self, name: str, served_path: str | None, path: str) -> bool:
        if served_path is not None and not _same_path(served_path, path):
            raise AdapterConflictError(
                f"{name!r} is already served by {self.base_url} from {served_path}, not {path}",
                hint="served names are immutable: register new weights as a new version",
            )
        return False

    async def _load_error(self, name: str, path: str, status: int, message: str) -> ServerError:
        if status == 404:
            return AdapterNotFoundError(f"vLLM found no adapter for {name!r} at {path}: {message}")
        if status == 400:
            return AdapterBadRequestError(f"vLLM refused to load {name!r}: {message}")
        if status == 500:
            if not await self.health():
                return ServerUnavailableError(
                    f"vLLM failed while loading {name!r} and is no longer healthy: {message}"
                )
            return AdapterRejectedError(
                f"vLLM rejected adapter {name!r}: {message}",
                hint="the server's log has vLLM's reason; common ones: a LoRA rank above its "
                "--max-lora-rank, or weights for another base model (loraplane checks both when it "
                "knows the server's limits: start it with loraplane serve or python -m loraplane.serving)",
            )
        if status in (401, 403):
            return ServerError(
                f"the vLLM server at {self.base_url} refused the API key (HTTP {status})",
                hint="set LORAPLANE_API_KEY to the server's --api-key",
            )
        return ServerError(f"POST /v1/load_lora_adapter: HTTP {status}: {message}")

    async def unload_adapter(self, name: str) -> bool:
        """Stop serving ``name``. Returns whether it was served (unloading an unknown name is a no-op)."""
        async with self._locks[name]:
            response = await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
            if response.status_code == 200:
                log.info("unloaded adapter", extra={"adapter": name, "server": self.base_url})
                return True
            if response.status_code == 404:
                return False
            message = _error_message(response)
            if response.status_code == 400:
                raise AdapterBadRequestError(f"vLLM refused to unload {name!r}: {message}")
            raise ServerError(f"POST /v1/unload_lora_adapter: HTTP {response.status_code}: {message}")

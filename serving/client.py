"""Typed async client for vLLM's model and runtime-LoRA admin endpoints.

vLLM answers ``/v1/load_lora_adapter`` with 200 and a plain-text body on success, 400 for a
duplicate name or a bad request, 404 when the path holds no adapter, and 500 when the engine rejects
the adapter (rank too high, DoRA, no tensors) or fails. Those answers become the exceptions below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from loraplane.common.errors import LoraplaneError


class ServerError(LoraplaneError):
    """Any failure talking to a vLLM server."""


class ServerUnavailableError(ServerError):
    """The server cannot be reached (down, wrong URL, not ready yet)."""


class AdapterRejectedError(ServerError):
    """The server refused the adapter (HTTP 400/500 on load)."""

    exit_code = 2


class AdapterNotFoundError(ServerError):
    """The server does not know the adapter, or found no adapter at the path (HTTP 404)."""

    exit_code = 2


@dataclass(frozen=True)
class ModelCard:
    id: str
    root: str | None
    parent: str | None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def _error_message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    return str(body)


class VLLMAdminClient:
    """``async with VLLMAdminClient(url) as c: await c.list_models()``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> VLLMAdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnavailableError(
                f"cannot reach the vLLM server at {self.base_url} ({type(exc).__name__}: {exc})",
                hint="is the server running? start it with `loraplane serve` or check --server-url",
            ) from None

    async def health(self) -> bool:
        try:
            return (await self._request("GET", "/health")).status_code == 200
        except ServerUnavailableError:
            return False

    async def list_models(self) -> list[ModelCard]:
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise ServerError(f"GET /v1/models: HTTP {response.status_code}: {_error_message(response)}")
        return [
            ModelCard(id=m["id"], root=m.get("root"), parent=m.get("parent"))
            for m in response.json().get("data", [])
        ]

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter under ``name``. Loading a name that is already served is a no-op."""
        if name in {m.id for m in await self.list_models()}:
            return
        response = await self._request(
            "POST",
            "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": path, "load_inplace": False},
        )
        if response.status_code == 200:
            return
        message = _error_message(response)
        if response.status_code == 404:
            raise AdapterNotFoundError(f"vLLM found no adapter for {name!r} at {path}: {message}")
        if response.status_code == 400 and "already been loaded" in message:
            return  # a concurrent load of the same name won: the result is what we asked for
        if response.status_code in (400, 500):
            if response.status_code == 500 and not await self.health():
                raise ServerUnavailableError(
                    f"vLLM failed while loading {name!r} and is no longer healthy: {message}"
                )
            raise AdapterRejectedError(f"vLLM rejected adapter {name!r}: {message}")
        raise ServerError(f"POST /v1/load_lora_adapter: HTTP {response.status_code}: {message}")

    async def unload_adapter(self, name: str) -> None:
        """Unload ``name``. Unloading a name that is not served is a no-op."""
        response = await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code in (200, 404):
            return
        raise ServerError(
            f"POST /v1/unload_lora_adapter: HTTP {response.status_code}: {_error_message(response)}"
        )

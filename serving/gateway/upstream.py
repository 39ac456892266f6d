"""The forwarding path's HTTP client to vLLM: aiohttp, whose HTTP parser is C (llhttp).

The gateway first forwarded with httpx. Under short streamed requests (32 prompt / 16 output tokens
at concurrency 8, 30-50 requests/s on 2 cores; ``bench/gateway_overhead.py``) the gateway spent
about 3 ms of CPU per request, two thirds of it in httpx/httpcore/h11: a pure-Python parse of every
chunk of every stream, each read under an anyio timeout scope. On a machine where the gateway shares
its cores with vLLM's API server, that CPU is taken from vLLM. The other upstream calls (``/health``,
``/v1/models``) are rare and stay on httpx.

:class:`UpstreamClient` keeps two sessions: a pooled one (keep-alive) for every first attempt and
one that opens a new connection for every request, for the one resend after a failed answer (a new
connection goes through the Service again and lands on a live replica). Connection attempts are
retried twice (immediately, then after 0.5 s) as httpx's transport ``retries`` did: a vLLM pod that
just went away leaves iptables pointing at it for a moment. A request that reached a server is never
resent here; :mod:`gateway_proxy` decides that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp

from loraplane.serving.gateway.errors import (
    GatewayError,
    UpstreamFailedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)

CONNECT_RETRIES = 2
CONNECT_BACKOFF_S = (0.0, 0.5)
MAX_CONNECTIONS = 1024

# Every way an exchange with the upstream can fail below HTTP (connect, reset, timeout, bad framing).
UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)


def dropped(exc: BaseException) -> bool:
    """The connection was closed or reset before an answer (its replica went away), not refused."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, DROPPED)


def upstream_error(exc: BaseException, what: str) -> GatewayError:
    """The answer for a failed exchange with the model server; names the problem, not the internal URL."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailableError(f"the model server is unavailable: cannot connect ({name})")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeoutError(f"the model server did not answer {what} in time ({name})")
    return UpstreamFailedError(f"the exchange with the model server failed during {what} ({name})")


class UpstreamAnswer:
    """An upstream answer whose headers have arrived; its body is read or relayed, then it is closed."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = response.headers

    async def aread(self) -> bytes:
        return await self._response.read()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (de-chunked, never decompressed)."""
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        """Done: a fully read answer gives its connection back; an unread one closes it (vLLM aborts)."""
        response = self._response
        if response.content.is_eof():
            response.release()
        else:
            response.close()


class UpstreamClient:
    """POSTs to the upstream: pooled, or (``fresh``) each on a new connection."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        read_timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Make the sessions (inside the running event loop: the app's lifespan)."""
        self._pooled = self._session(aiohttp.TCPConnector(limit=MAX_CONNECTIONS))
        self._fresh = self._session(aiohttp.TCPConnector(limit=MAX_CONNECTIONS, force_close=True))

    def _session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            auto_decompress=False,  # bytes are relayed as they come
            trust_env=False,  # never route the upstream through a proxy from the environment
        )

    async def aclose(self) -> None:
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()
        self._pooled = self._fresh = None

    async def post(
        self, path: str, content: bytes, headers: Mapping[str, str], *, fresh: bool = False
    ) -> UpstreamAnswer:
        """Send; return once the answer's headers are in. Raises one of :data:`UPSTREAM_ERRORS`."""
        session = self._fresh if fresh else self._pooled
        if session is None:
            raise RuntimeError("the gateway's upstream client is used outside the app's lifespan")
        url = self.base_url + path
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                response = await session.post(url, data=content, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                if attempt == CONNECT_RETRIES:
                    raise
                await asyncio.sleep(CONNECT_BACKOFF_S[attempt])
                continue
            return UpstreamAnswer(response)
        raise AssertionError("unreachable")  # pragma: no cover

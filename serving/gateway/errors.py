"""The gateway's error answers, in the shape OpenAI clients parse: ``{"error": {message, type, code}}``.

Every error the gateway produces itself goes through :func:`error_response`, so a client sees the same
body for a bad key, an unknown model, a blocked route or a model server that is down, and never a
traceback.
"""

from __future__ import annotations

import httpx
from starlette.responses import JSONResponse


class GatewayError(Exception):
    """An answer the gateway gives instead of forwarding: HTTP status plus an OpenAI-style error."""

    status = 500
    error_type = "server_error"
    code: str | None = None
    upstream_reason: str | None = None  # the `reason` label of loraplane_gateway_upstream_errors_total

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, error_type=self.error_type, code=self.code)


class UnauthorizedError(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def response(self) -> JSONResponse:
        return error_response(
            self.status,
            self.message,
            error_type=self.error_type,
            code=self.code,
            headers={"WWW-Authenticate": "Bearer"},
        )


class BadRequestError(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class UnsupportedParameterError(BadRequestError):
    code = "unsupported_parameter"


class BodyTooLargeError(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class ModelNotFoundError(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class UpstreamUnavailableError(GatewayError):
    """The model server cannot be reached (connection refused, DNS, not started yet)."""

    status = 503
    code = "upstream_unavailable"
    upstream_reason = "connect"


class UpstreamTimeoutError(GatewayError):
    status = 504
    code = "upstream_timeout"
    upstream_reason = "timeout"


class UpstreamFailedError(GatewayError):
    """The model server was reached but the exchange broke (reset connection, bad HTTP)."""

    status = 502
    code = "upstream_error"
    upstream_reason = "transport"


class UpstreamAuthError(UpstreamFailedError):
    """The model server refused the gateway's own key: a configuration error, not the client's."""

    code = "upstream_auth_failed"
    upstream_reason = "auth"


def error_body(message: str, *, error_type: str, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type=error_type, code=code), status, headers=headers)


def transport_error(exc: httpx.TransportError, what: str) -> GatewayError:
    """The answer for a failed exchange with the model server; names the problem, not the internal URL."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(f"the model server did not answer {what} in time ({name})")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnavailableError(f"the model server is unavailable: cannot connect ({name})")
    return UpstreamFailedError(f"the exchange with the model server failed during {what} ({name})")

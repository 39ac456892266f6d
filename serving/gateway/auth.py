"""API keys: the keys clients present to the gateway, and the one key the gateway presents to vLLM.

Client keys come from a file (one per line, ``#`` starts a comment line) and/or the environment
variable ``LORAPLANE_GATEWAY_API_KEYS`` (comma-separated); both sources are merged. The upstream key
(vLLM's ``--api-key``) comes from a file or ``LORAPLANE_API_KEY``. The two sets are separate on
purpose: a client's key is checked here and never forwarded.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from loraplane.common.errors import ConfigError

CLIENT_KEYS_ENV = "LORAPLANE_GATEWAY_API_KEYS"
UPSTREAM_KEY_ENV = "LORAPLANE_API_KEY"


def _check_key(key: str, source: str) -> str:
    if any(ch.isspace() for ch in key) or not key.isprintable():
        raise ConfigError(f"{source}: an API key contains whitespace or control characters")
    return key


def read_key_file(path: Path) -> list[str]:
    """Keys in ``path``: one per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc}") from None
    keys = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keys.append(_check_key(stripped, str(path)))
    return keys


def load_client_keys(path: Path | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The keys clients may use: those in ``path`` plus those in ``LORAPLANE_GATEWAY_API_KEYS``."""
    keys = read_key_file(path) if path is not None else []
    keys += [_check_key(k.strip(), CLIENT_KEYS_ENV) for k in environ.get(CLIENT_KEYS_ENV, "").split(",")]
    return tuple(dict.fromkeys(k for k in keys if k))


def load_upstream_key(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The key for vLLM: the first key in ``path`` if given, else ``LORAPLANE_API_KEY``, else none."""
    if path is not None:
        keys = read_key_file(path)
        if len(keys) != 1:
            raise ConfigError(f"{path}: expected exactly one upstream API key, found {len(keys)}")
        return keys[0]
    key = environ.get(UPSTREAM_KEY_ENV, "").strip()
    return _check_key(key, UPSTREAM_KEY_ENV) if key else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyChecker:
    """Accepts a request whose bearer token equals one of the keys; no keys means everyone is accepted.

    Every key is compared with :func:`hmac.compare_digest` (no early exit), so the answer time does
    not depend on how much of a key a caller guessed, nor on which key matched.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        token = bearer_token(authorization)
        if token is None:
            return False
        presented = token.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched

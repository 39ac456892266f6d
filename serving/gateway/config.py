"""The gateway's configuration: :class:`GatewayConfig`, and how the command line and environment make one."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from loraplane.common.errors import ConfigError, format_validation_error
from loraplane.serving.gateway.auth import load_client_keys, load_upstream_key
from loraplane.serving.gateway.canary import CANARIES_ENV, CanaryRules, canaries_from_env, parse_canary

log = logging.getLogger("loraplane.serving.gateway")


class GatewayConfig(BaseModel):
    """Everything the gateway needs; API keys are :class:`SecretStr` so they never show in a repr."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str = Field(description="Base URL of the vLLM server, e.g. http://127.0.0.1:8000.")
    home: Path = Field(description="loraplane state directory; its registry.json resolves aliases.")
    registry: Literal["local", "kubernetes"] = Field(
        default="local",
        description="local: HOME/registry.json; kubernetes: LoraAdapter objects in namespace.",
    )
    namespace: str = Field(default="default", description="Namespace of the LoraAdapter objects.")
    registry_poll_s: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5, description="How often a Kubernetes registry is listed (an alias flip shows within it)."
    )
    api_keys: tuple[SecretStr, ...] = Field(default=(), description="Keys clients may send as Bearer.")
    upstream_api_key: SecretStr | None = Field(default=None, description="vLLM's --api-key.")
    allow_unauthenticated: bool = Field(default=False, description="Required to run without api_keys.")
    allow_prompt_logprobs: bool = Field(
        default=False,
        description="Forward requests for prompt log-probabilities (echo + logprobs, prompt_logprobs). "
        "vLLM 0.32's engine dies when one shares a batch on a LoRA server (gateway/refused_params.py): "
        "only for a server that serves nothing else, e.g. one an eval has to itself.",
    )
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    registry_check_interval_s: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="Least time between two stats of registry.json; 0: on every request."
    )
    models_cache_s: Annotated[float, Field(gt=0)] = 30.0
    upstream_connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    upstream_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=600.0, description="Longest wait for the next bytes of an answer (a whole non-stream answer)."
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    canaries: CanaryRules = Field(
        default_factory=dict,
        description="Adapter name -> rule: that share of NAME and NAME:prod requests goes to NAME:ALIAS.",
    )

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8000")
        return value.rstrip("/")

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for key in value:
            secret = key.get_secret_value()
            if not secret or not secret.isprintable() or any(ch.isspace() for ch in secret):
                raise ValueError("API keys must be non-empty, without whitespace or control characters")
        return value

    @model_validator(mode="after")
    def _keys_or_explicit_opt_out(self) -> GatewayConfig:
        if not self.api_keys and not self.allow_unauthenticated:
            raise ValueError(
                "no API keys: give --api-keys-file or LORAPLANE_GATEWAY_API_KEYS, "
                "or pass --allow-unauthenticated to let anyone in"
            )
        return self


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> GatewayConfig:
    """The config the CLI runs: keys from files and environment. Raises ConfigError saying what is wrong."""
    if not args.upstream:
        raise ConfigError("--upstream is required (or set LORAPLANE_SERVER_URL)")
    api_keys = load_client_keys(args.api_keys_file, environ)
    if not api_keys and not args.allow_unauthenticated:
        raise ConfigError(
            "refusing to start without API keys",
            hint="give --api-keys-file FILE or LORAPLANE_GATEWAY_API_KEYS, or pass --allow-unauthenticated",
        )
    try:
        flags = dict(parse_canary(spec) for spec in args.canary)
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"--canary: {exc}") from None
    # One rule per adapter name: the environment's (the chart's gateway.canary), then --canary on top.
    canaries = canaries_from_env(environ)
    for name in sorted(set(canaries) & set(flags)):
        log.warning(
            "--canary overrides the rule of %s for this adapter",
            CANARIES_ENV,
            extra={
                "adapter": name,
                "flag": f"{flags[name].alias}={flags[name].percent:g}",
                "env": f"{canaries[name].alias}={canaries[name].percent:g}",
            },
        )
    canaries.update(flags)
    fields: dict[str, Any] = {
        "upstream": args.upstream,
        "home": args.home,
        "registry": args.registry,
        "namespace": args.namespace,
        "api_keys": api_keys,
        "upstream_api_key": load_upstream_key(args.upstream_api_key_file, environ),
        "allow_unauthenticated": args.allow_unauthenticated,
        "allow_prompt_logprobs": args.allow_prompt_logprobs,
        "host": args.host,
        "port": args.port,
        "upstream_timeout_s": args.upstream_timeout,
        "canaries": canaries,
    }
    try:
        return GatewayConfig(**fields)
    except ValidationError as exc:
        raise format_validation_error(exc, source="python -m loraplane.serving.gateway") from None

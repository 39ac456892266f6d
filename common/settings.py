"""Where the control layer keeps its state and which server it talks to.

Every value can come from an environment variable (``LORAPLANE_*``) or a CLI option.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplane.common.errors import ConfigError


def default_home() -> Path:
    """The state directory: ``$LORAPLANE_HOME``, else ``~/.loraplane`` (the one place that says so)."""
    return Path(os.environ.get("LORAPLANE_HOME") or Path.home() / ".loraplane")


def _registry_from_env() -> Literal["local", "kubernetes"]:
    value = os.environ.get("LORAPLANE_REGISTRY", "local")
    if value not in ("local", "kubernetes"):
        raise ConfigError(f"LORAPLANE_REGISTRY: got {value!r}; use 'local' or 'kubernetes'")
    return "kubernetes" if value == "kubernetes" else "local"


def vllm_key_path(home: Path) -> Path:
    """vLLM's API key as ``loraplane serve`` keeps it (made once, mode 0600)."""
    return home / "serving" / "vllm-api-key"


class Settings(BaseModel):
    """Where loraplane keeps state and which cluster and servers it talks to; each field's environment
    variable is its ``LORAPLANE_`` name (``KUBECONFIG`` for ``kubeconfig``). The CLI's global options
    take their help from the descriptions here."""

    model_config = ConfigDict(frozen=True)

    home: Path = Field(
        default_factory=default_home,
        description="State directory: local registry, reports, logs (default: ~/.loraplane).",
    )
    adapters_root: Path | None = Field(default=None, description="Adapters root (default: HOME/adapters).")
    server_url: str = Field(
        default_factory=lambda: os.environ.get("LORAPLANE_SERVER_URL", "http://127.0.0.1:8000"),
        description="vLLM server (default: http://127.0.0.1:8000).",
    )
    server_urls: tuple[str, ...] = Field(
        default=(),
        description="Every vLLM replica a change must reach (the CLI's port-forwards to each Ready pod); "
        "empty: see serving/replicas.py:replica_urls.",
    )
    api_key: str | None = Field(default_factory=lambda: os.environ.get("LORAPLANE_API_KEY"))
    max_lora_rank: int = 16
    registry: Literal["local", "kubernetes"] = Field(
        default_factory=lambda: _registry_from_env(),
        description="Registry backend: local (HOME/registry.json) or kubernetes (LoraAdapter objects in the "
        "namespace); it also decides where training runs (platform/training.py).",
    )
    namespace: str = Field(
        default_factory=lambda: os.environ.get("LORAPLANE_NAMESPACE", "default"),
        description="Kubernetes namespace (default: default).",
    )
    release: str = Field(
        default_factory=lambda: os.environ.get("LORAPLANE_RELEASE", "platform"),
        description="Helm release whose vLLM pods serve the adapters (default: platform).",
    )
    kubeconfig: Path | None = Field(default=None, description="Kubeconfig file (default: ~/.kube/config).")
    kube_context: str | None = Field(default=None, description="Kubeconfig context (default: current).")

    @model_validator(mode="after")
    def _key_of_the_local_server(self) -> Settings:
        """Without LORAPLANE_API_KEY, the key of the server ``loraplane serve`` runs from this home."""
        if self.api_key is None:
            path = vllm_key_path(self.home)
            with contextlib.suppress(OSError, UnicodeDecodeError):
                key = path.read_text(encoding="utf-8").strip()
                if key:
                    self.__dict__["api_key"] = key  # frozen model: set once, while it is built
        return self

    @property
    def adapters_dir(self) -> Path:
        if self.adapters_root is not None:
            return self.adapters_root
        env = os.environ.get("LORAPLANE_ADAPTERS_ROOT")
        return Path(env) if env else self.home / "adapters"

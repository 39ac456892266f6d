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
    model_config = ConfigDict(frozen=True)

    home: Path = Field(default_factory=default_home, description="State directory (registry, logs).")
    adapters_root: Path | None = Field(default=None, description="Default: <home>/adapters.")
    server_url: str = Field(
        default_factory=lambda: os.environ.get("LORAPLANE_SERVER_URL", "http://127.0.0.1:8000")
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
        description="local: <home>/registry.json; kubernetes: LoraAdapter objects in `namespace`.",
    )
    namespace: str = Field(default_factory=lambda: os.environ.get("LORAPLANE_NAMESPACE", "default"))
    kubeconfig: Path | None = Field(default=None, description="Default: KUBECONFIG, else ~/.kube/config.")
    kube_context: str | None = None

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

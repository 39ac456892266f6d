"""Which registry backend the settings choose: the local file or the Kubernetes custom resources."""

from __future__ import annotations

from loraplane.common.settings import Settings
from loraplane.registry.local import LocalRegistry
from loraplane.registry.model import Registry


def open_registry(settings: Settings) -> Registry:
    """The backend the settings choose (``local`` by default; ``kubernetes`` imports its client lazily)."""
    if settings.registry == "kubernetes":
        from loraplane.registry.kubernetes import KubernetesRegistry

        return KubernetesRegistry(settings)
    return LocalRegistry(settings.home)

"""One way to reach the Kubernetes API for every loraplane command: the client from the settings'
kubeconfig and context (or the pod's service account), and API errors turned into messages."""

from __future__ import annotations

import json
import os
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings


class KubernetesError(LoraplaneError):
    """The API server refused a request or could not be reached."""


def api_client(settings: Settings) -> Any:
    """A ``kubernetes.client.ApiClient``: in a pod (no kubeconfig or context given) its service account,
    else ``settings.kubeconfig`` (default ``KUBECONFIG``, then ``~/.kube/config``) and its context."""
    from kubernetes import client, config

    if (
        settings.kubeconfig is None
        and settings.kube_context is None
        and "KUBERNETES_SERVICE_HOST" in os.environ
    ):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    try:
        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(settings.kubeconfig) if settings.kubeconfig else None,
            context=settings.kube_context,
        )
    except (config.ConfigException, OSError) as exc:
        raise KubernetesError(
            f"cannot load a kubeconfig ({settings.kubeconfig or 'KUBECONFIG / ~/.kube/config'}): {exc}",
            hint="pass --kubeconfig/--context, or set KUBECONFIG",
        ) from None


def api_message(exc: Any) -> str:
    """The API server's own message of an ``ApiException``."""
    try:
        return str(json.loads(exc.body).get("message", exc.reason))
    except (TypeError, ValueError):
        return str(exc.reason)

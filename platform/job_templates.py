"""The Job templates the chart installs as ConfigMaps (training runs, evaluations), read by the CLI.

A template is a ConfigMap labelled with its component and the Helm release, holding ``job.yaml``: the
Job (or JobSet) the chart rendered with the release's values, which ``train submit`` and ``evals
submit`` name and complete for one run.
"""

from __future__ import annotations

from typing import Any

import yaml

from loraplane.common.errors import InvalidInputError
from loraplane.common.kube import KubernetesError, api_message


def read_job_template(
    core: Any, namespace: str, release: str, *, component: str, what: str, hint: str
) -> dict[str, Any]:
    """The ``job.yaml`` of release ``release``'s template ``component`` in ``namespace``; ``what``
    names it in errors (``training template``), ``hint`` says how to get one installed."""
    from kubernetes.client.exceptions import ApiException

    selector = f"app.kubernetes.io/component={component},app.kubernetes.io/instance={release}"
    try:
        found = core.list_namespaced_config_map(namespace, label_selector=selector).items
    except ApiException as exc:
        raise KubernetesError(f"cannot read the {what} in {namespace!r}: {api_message(exc)}") from None
    if len(found) != 1:
        raise InvalidInputError(
            f"no {what} of Helm release {release!r} in namespace {namespace!r}"
            + (f" ({len(found)} match)" if found else ""),
            hint=hint,
        )
    job: dict[str, Any] = yaml.safe_load(found[0].data["job.yaml"])
    return job

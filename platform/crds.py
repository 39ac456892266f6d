"""Keep the chart's CustomResourceDefinitions current: Helm installs ``crds/`` once and never updates
them (helm.sh/docs/chart_best_practices/custom_resource_definitions), so a release upgraded to a
chart whose ``LoraAdapter`` CRD gained fields (the status subresource the vLLM pods report in,
``spec.canary``) would keep the old schema, and the API server would drop or refuse the new fields.

``loraplane install`` and ``upgrade`` therefore create or replace each CRD of the chart before Helm
runs. CRDs are cluster-wide: who may not change them (no RBAC on
``customresourcedefinitions``) gets a warning with the ``kubectl apply`` a cluster admin runs, and
the deploy goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings


@dataclass(frozen=True)
class CrdResult:
    created: list[str]
    replaced: list[str]  # an older version was there: now the chart's
    unchanged: list[str]
    refused: str | None = None  # why they could not be written (with the command for an admin)


def chart_crds(chart_dir: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((chart_dir / "crds").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return [d for d in docs if d.get("kind") == "CustomResourceDefinition"]


def apply_crds(settings: Settings, chart_dir: Path) -> CrdResult:
    """Create each CRD of the chart that is missing and replace each whose spec differs."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api: Any = client.ApiextensionsV1Api(api_client(settings))
    try:
        api.get_api_resources(_request_timeout=10)
    except (HTTPError, OSError):
        # an API server that cannot be reached: Helm's own error says so next, in one line
        return CrdResult([], [], [])
    created: list[str] = []
    replaced: list[str] = []
    unchanged: list[str] = []
    for crd in chart_crds(chart_dir):
        name = crd["metadata"]["name"]
        try:
            try:
                current = api.read_custom_resource_definition(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                api.create_custom_resource_definition(crd)
                created.append(name)
                continue
            live = api.api_client.sanitize_for_serialization(current)
            if _same_spec(live["spec"], crd["spec"]):
                unchanged.append(name)
                continue
            body = {
                **crd,
                "metadata": {**crd["metadata"], "resourceVersion": live["metadata"]["resourceVersion"]},
            }
            api.replace_custom_resource_definition(name, body)
            replaced.append(name)
        except ApiException as exc:
            if exc.status in (401, 403):
                return CrdResult(
                    created,
                    replaced,
                    unchanged,
                    refused=f"cannot update the CustomResourceDefinition {name} ({api_message(exc)}); a "
                    f"cluster admin runs: kubectl apply --server-side -f {chart_dir / 'crds'}",
                )
            raise KubernetesError(
                f"cannot apply the CustomResourceDefinition {name}: {api_message(exc)}"
            ) from None
    return CrdResult(created, replaced, unchanged)


def _same_spec(live: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether the live spec already holds everything the chart's does (the API server adds
    defaults, such as conversion: None, that the file leaves out)."""

    def covers(have: Any, want: Any) -> bool:
        if isinstance(want, dict):
            return isinstance(have, dict) and all(covers(have.get(k), v) for k, v in want.items())
        if isinstance(want, list):
            return isinstance(have, list) and len(have) == len(want) and all(map(covers, have, want))
        return bool(have == want)

    return covers(live, wanted)

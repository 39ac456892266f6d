"""The Kubernetes registry backend: one ``LoraAdapter`` object (CRD ``loraadapters.loraplane.dev``,
installed by the chart) per adapter, visible with ``kubectl get loraadapters``.

A :meth:`KubernetesRegistry.transaction` lists the objects, yields the registry state, and writes back
each adapter object the block changed with the ``resourceVersion`` it read: when another client wrote
that object meanwhile, the API server answers 409 and the transaction raises ConflictError without
having written it. Of two concurrent promotions of one adapter exactly one wins. A command changes
one adapter, so one object: that write is atomic. The API server also checks the object's schema
(version and alias names, sha256 format, every alias pointing at a registered version).

``status`` is the object's status subresource, written apart from the spec: the summary that
``kubectl get loraadapters`` shows (patched by the command after each spec write) and
``status.servers``, where each vLLM pod's reconciler (``serving/replica_reconciler.py``) reports, under
its pod name, the versions of this adapter it serves and those it could not load, with the reason. A
spec write never touches them; the CLI waits on them (``platform/convergence.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loraplane.common.kube import KubernetesError, api_client, api_message
from loraplane.common.settings import Settings
from loraplane.registry.model import (
    Adapter,
    AdapterVersion,
    CanaryWeight,
    ConflictError,
    EvalRecord,
    HistoryEvent,
    LoadFailure,
    RegistryState,
)

GROUP = "loraplane.dev"
VERSION = "v1alpha1"
PLURAL = "loraadapters"
KIND = "LoraAdapter"
MANAGED_BY = {"app.kubernetes.io/managed-by": "loraplane"}

log = logging.getLogger("loraplane.platform")
REPORT_TIMEOUT_S = 10


class KubernetesRegistryError(KubernetesError):
    """The registry's objects could not be read or written."""


def _version_to_k8s(v: AdapterVersion) -> dict[str, Any]:
    out: dict[str, Any] = {
        "servedName": v.served_name,
        "path": v.path,
        "weightsSha256": v.weights_sha256,
        "state": v.state,
        "registeredAt": v.registered_at,
        "manifest": v.manifest,
        "evals": [e.model_dump(mode="json") for e in v.evals],
    }
    if v.base_model is not None:
        out["baseModel"] = v.base_model
    if v.failure is not None:
        out["failure"] = v.failure.model_dump(mode="json", exclude_none=True)
    return out


def _version_from_k8s(name: str, version: str, data: dict[str, Any]) -> AdapterVersion:
    return AdapterVersion(
        name=name,
        version=version,
        served_name=data["servedName"],
        path=data["path"],
        weights_sha256=data["weightsSha256"],
        base_model=data.get("baseModel"),
        manifest=data.get("manifest") or {},
        state=data["state"],
        registered_at=data["registeredAt"],
        evals=[EvalRecord.model_validate(e) for e in data.get("evals") or []],
        failure=LoadFailure.model_validate(data["failure"]) if data.get("failure") else None,
    )


def _event_to_k8s(e: HistoryEvent) -> dict[str, Any]:
    return {k: v for k, v in e.model_dump(mode="json").items() if v is not None and k != "adapter"}


SUMMARY_KEYS = ("versions", "latest", "aliases", "prod", "prodState", "prodScore")


def _summary(adapter: Adapter) -> dict[str, Any]:
    """What ``kubectl get loraadapters`` shows (the CRD's printer columns)."""
    status: dict[str, Any] = {"versions": len(adapter.versions)}
    if adapter.versions:
        status["latest"] = max(adapter.versions, key=lambda v: int(v[1:]))
    if adapter.aliases:
        status["aliases"] = ", ".join(f"{a}={v}" for a, v in sorted(adapter.aliases.items()))
    prod = adapter.versions.get(adapter.aliases.get("prod", ""))
    if prod is not None:
        status["prod"] = prod.version
        status["prodState"] = prod.state
        latest = prod.latest_eval()
        if latest is not None:
            status["prodScore"] = latest.summary()[:120]
    return status


def adapter_to_object(adapter: Adapter, history: list[HistoryEvent]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "versions": {v: _version_to_k8s(entry) for v, entry in adapter.versions.items()},
        "history": [_event_to_k8s(e) for e in history],
    }
    if adapter.aliases:
        spec["aliases"] = dict(adapter.aliases)
    if adapter.canary is not None:
        spec["canary"] = adapter.canary.model_dump(mode="json")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": adapter.name, "labels": dict(MANAGED_BY)},
        "spec": spec,
        "status": _summary(adapter),
    }


def server_reports(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``status.servers``: pod name -> ``{"loaded": [versions], "failed": [{"version", "reason"}], "at"}``."""
    servers = (obj.get("status") or {}).get("servers") or {}
    return {str(k): v for k, v in servers.items() if isinstance(v, dict)}


def _reported_failures(obj: dict[str, Any]) -> dict[str, LoadFailure]:
    """Version -> the first failure a server reports for it in ``status.servers`` (by pod name)."""
    out: dict[str, LoadFailure] = {}
    for pod, report in sorted(server_reports(obj).items()):
        for failed in report.get("failed") or []:
            version = failed.get("version")
            if isinstance(version, str) and version not in out:
                out[version] = LoadFailure(
                    reason=str(failed.get("reason", "")), at=str(report.get("at", "")), server=pod
                )
    return out


def adapter_from_object(
    obj: dict[str, Any], *, with_reports: bool = False
) -> tuple[Adapter, list[HistoryEvent]]:
    """The adapter and its history; ``with_reports``: a version without a recorded failure gets the
    one a server reports in ``status.servers`` (for reading: a transaction never writes it back)."""
    name = obj["metadata"]["name"]
    spec = obj.get("spec") or {}
    versions = {v: _version_from_k8s(name, v, d) for v, d in (spec.get("versions") or {}).items()}
    for version, failure in _reported_failures(obj).items() if with_reports else ():
        if version in versions and versions[version].failure is None:
            versions[version].failure = failure
    canary = CanaryWeight.model_validate(spec["canary"]) if spec.get("canary") else None
    adapter = Adapter(name=name, versions=versions, aliases=dict(spec.get("aliases") or {}), canary=canary)
    history = [HistoryEvent.model_validate({**e, "adapter": name}) for e in spec.get("history") or []]
    return adapter, history


class WatchExpiredError(KubernetesRegistryError):
    """The resourceVersion a watch started from is too old (HTTP 410): list again."""


def state_from_objects(objects: dict[str, dict[str, Any]], *, with_reports: bool = False) -> RegistryState:
    """The registry state that LoraAdapter ``objects`` (by name) hold (``with_reports``: see
    :func:`adapter_from_object`)."""
    state = RegistryState()
    history: list[HistoryEvent] = []
    for name, obj in sorted(objects.items()):
        adapter, events = adapter_from_object(obj, with_reports=with_reports)
        state.adapters[name] = adapter
        history.extend(events)
    state.history = sorted(history, key=lambda e: e.at)  # stable: per adapter, order is kept
    return state


class KubernetesRegistry:
    """The registry as LoraAdapter objects in one namespace."""

    def __init__(self, settings: Settings) -> None:
        from kubernetes import client

        self.namespace = settings.namespace
        api = api_client(settings)
        self._api = client.CustomObjectsApi(api)
        self._where = f"namespace {self.namespace!r} of {api.configuration.host}"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs)
        except ApiException as exc:
            message = api_message(exc)
            if exc.status == 404 and "the server could not find the requested resource" in message:
                raise KubernetesRegistryError(
                    f"the LoraAdapter resource is not installed in the cluster ({self._where})",
                    hint="install the chart (its crds/ folder), or kubectl apply -f charts/loraplane/crds/",
                ) from None
            if exc.status == 403:
                raise KubernetesRegistryError(
                    f"{what}: not allowed in {self._where}: {message}",
                    hint="bind the chart's loraplane-edit ClusterRole (or 'edit') to your user here",
                ) from None
            if exc.status == 409:
                raise ConflictError(
                    f"{what}: another command changed this adapter in {self._where} while this one ran; "
                    "nothing was changed",
                    hint="check 'loraplane adapters show NAME', then re-run the command if still wanted",
                ) from None
            raise KubernetesRegistryError(
                f"{what}: the API server refused it ({exc.status}): {message}"
            ) from None
        except HTTPError as exc:
            raise KubernetesRegistryError(
                f"{what}: cannot reach the Kubernetes API server ({self._where}): {exc}"
            ) from None

    def list_objects(self) -> tuple[dict[str, dict[str, Any]], str]:
        """Every LoraAdapter object by name, and the list's resourceVersion (to watch from)."""
        listed = self._call("listing adapters", self._api.list_namespaced_custom_object)
        items: list[dict[str, Any]] = listed.get("items", [])
        return {o["metadata"]["name"]: o for o in items}, str(listed["metadata"]["resourceVersion"])

    def get_object(self, name: str) -> dict[str, Any] | None:
        """The LoraAdapter object ``name``; None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self._api.get_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404 and "not found" in api_message(exc):
                return None
            return self._call(f"reading {KIND} {name}", self._api.get_namespaced_custom_object, name)  # type: ignore[no-any-return]
        return obj

    def watch(self, resource_version: str, timeout_s: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event type, object)`` for each change after ``resource_version``, for ``timeout_s`` seconds
        (the API server ends the watch then). An expired ``resource_version`` raises
        :class:`WatchExpiredError`: list again and watch from the new one."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in stream.stream(  # type: ignore[no-untyped-call]
                self._api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                resource_version=resource_version,
                timeout_seconds=timeout_s,
                allow_watch_bookmarks=True,
                _request_timeout=timeout_s + 10,
            ):
                yield str(event["type"]), event["raw_object"]
        except ApiException as exc:
            if exc.status == 410:
                raise WatchExpiredError(f"watch from resourceVersion {resource_version} expired") from None
            raise KubernetesRegistryError(
                f"watching adapters in {self._where}: {exc.status} {api_message(exc)}"
            ) from None
        finally:
            stream.stop()  # type: ignore[no-untyped-call]

    def report_server(self, name: str, pod: str, report: dict[str, Any] | None) -> None:
        """Set (or with None remove) ``status.servers[pod]`` of adapter ``name``: a JSON merge patch of
        the status subresource, so pods reporting at once never conflict and the spec is untouched."""
        self._call(
            f"reporting {pod}'s adapters on {KIND} {name}",
            self._api.patch_namespaced_custom_object_status,
            name,
            {"status": {"servers": {pod: report}}},
            _request_timeout=REPORT_TIMEOUT_S,  # a pod stopping must not hang on an API server gone
        )

    def _write_summary(self, adapter: Adapter, previous: dict[str, Any] | None) -> None:
        """The printer columns' summary, into the status subresource (a spec write does not change it).
        Best effort: the spec write, which is the registry, has already happened."""
        summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)  # keys no longer set are removed
        summary.update(_summary(adapter))
        shown = (previous or {}).get("status") or {}
        if previous is not None and {k: shown.get(k) for k in SUMMARY_KEYS} == summary:
            return
        try:
            self._call(
                f"updating the summary of {KIND} {adapter.name}",
                self._api.patch_namespaced_custom_object_status,
                adapter.name,
                {"status": summary},
            )
        except KubernetesRegistryError as exc:
            log.info("summary not updated", extra={"adapter": adapter.name, "why": exc.message})

    def read(self) -> RegistryState:
        objects, _ = self.list_objects()
        return state_from_objects(objects, with_reports=True)

    def _read(self) -> tuple[RegistryState, dict[str, dict[str, Any]]]:
        objects, _ = self.list_objects()
        return state_from_objects(objects), objects

    @contextmanager
    def transaction(self) -> Iterator[RegistryState]:
        """Yield the state; write back each changed adapter guarded by the resourceVersion read."""
        state, objects = self._read()
        known = len(state.history)
        before = {name: a.model_dump_json() for name, a in state.adapters.items()}
        yield state
        new_events = state.history[known:]
        for name, adapter in state.adapters.items():
            events = [e for e in new_events if e.adapter == name]
            if before.get(name) == adapter.model_dump_json() and not events:
                continue
            previous = objects.get(name)
            old_history = adapter_from_object(previous)[1] if previous else []
            body = adapter_to_object(adapter, old_history + events)
            if previous is None:
                self._call(f"creating {KIND} {name}", self._api.create_namespaced_custom_object, body)
            else:
                body["metadata"]["labels"] = {**previous["metadata"].get("labels", {}), **MANAGED_BY}
                self._replace(name, body, previous)
            self._write_summary(adapter, previous)

    def _replace(self, name: str, body: dict[str, Any], previous: dict[str, Any]) -> None:
        """Write ``body`` over the object read as ``previous``, guarded by its resourceVersion. A vLLM
        pod's status report also changes the resourceVersion (not the spec's ``generation``): when
        only that happened meanwhile, the write is tried again on the new resourceVersion; a change of
        the spec by anyone else is a ConflictError (of two concurrent promotions exactly one wins)."""
        version = previous["metadata"]["resourceVersion"]
        for _ in range(20):
            body["metadata"]["resourceVersion"] = version
            try:
                self._call(f"updating {KIND} {name}", self._api.replace_namespaced_custom_object, name, body)
                return
            except ConflictError:
                current = self.get_object(name)
                if current is None or current["metadata"].get("generation") != previous["metadata"].get(
                    "generation"
                ):
                    raise
                version = current["metadata"]["resourceVersion"]
        raise ConflictError(
            f"updating {KIND} {name}: its status kept changing while this command wrote it; "
            "nothing was changed",
            hint="re-run the command",
        )

"""The reconciler of one vLLM pod: watch the registry, serve its servable set, report what it serves.

It runs inside ``python -m loraplane.serving`` (the supervisor, the vLLM container's main process), as
a thread beside vLLM, when the registry is Kubernetes' ``LoraAdapter`` objects:

1. *list* the objects (their ``resourceVersion``), make this server serve exactly the registry's
   servable versions (``reconcile.servable_versions``: registered, serving or promoted; not retired,
   not unloaded) through vLLM's own admin routes, with the same checks as ``adapters load``;
2. *watch* from that ``resourceVersion``: each change (a registration, ``adapters load``, a promotion,
   an unload, a deleted object) is applied as it arrives, in well under a second; after
   ``resync_s`` the API server ends the watch and the loop lists again (a resync, which also retries
   versions that failed), and a watch that expired (HTTP 410) lists again at once;
3. after each pass, write what this server serves into the pod's state file (read by the readiness
   probe, which so makes no Kubernetes call) and, when it changed, into each adapter's
   ``status.servers[<pod>]``: the versions loaded here and those that failed here with the reason.
   ``loraplane adapters load|promote|rollback`` wait on those reports.

A version that fails (files gone or changed, another base, a rank above this server's limit, vLLM
refusing it) fails alone: it is reported with its reason, other adapters are untouched, and it is not
required for readiness. It is tried again when its object's spec changes (``metadata.generation``)
or at the next resync. A new pod is Ready only after its first pass (everything tried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplane.common.config_defaults import field_default
from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.registry.kubernetes import (
    KubernetesRegistry,
    WatchExpiredError,
    server_reports,
    state_from_objects,
)
from loraplane.serving.capacity import cpu_lora_capacity
from loraplane.serving.reconcile import ReplicaReport, servable_versions, sync_replica
from loraplane.serving.replica_metrics import ReplicaMetrics
from loraplane.serving.server_state import ServerState

log = logging.getLogger("loraplane.serving")

RESYNC_S = 300  # the API server ends each watch after this long: then list again
RETRY_S = 2.0  # after the API server could not be reached


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Served:
    """What this server serves after a pass: served names loaded, and those that failed with why."""

    loaded: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


class ReplicaReconciler:
    """Make the vLLM server at ``url`` serve the registry's servable versions, and say so."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        *,
        pod: str,
        state: ServerState,
        state_path: Path,
        registry: KubernetesRegistry | None = None,
        resync_s: int = RESYNC_S,
        prune_unknown: bool = True,
        on_first_pass: Callable[[Served], None] | None = None,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.url = url
        self.pod = pod
        self.state = state
        self.state_path = state_path
        self.registry = registry or KubernetesRegistry(settings)
        self.resync_s = resync_s
        self.prune_unknown = prune_unknown  # False: leave adapters the registry does not know alone
        self.on_first_pass = on_first_pass  # told what the pod serves once everything was tried
        self.metrics = metrics  # Prometheus metrics of what this server serves (replica_metrics.py)
        self.served = Served()
        # served name -> (generation of its object when it failed, why): not retried until that changes
        self._failed: dict[str, tuple[int, str]] = {}
        self.passes = 0
        self.known: dict[str, dict[str, Any]] = {}  # the objects of the last pass, by name
        self.stopped = False

    def apply(self, objects: dict[str, dict[str, Any]]) -> ReplicaReport:
        """One pass: make the server match ``objects`` (LoraAdapter objects by name), then report."""
        registry = state_from_objects(objects)
        generation = {n: int(o["metadata"].get("generation") or 0) for n, o in objects.items()}
        wanted = servable_versions(registry)
        wanted_names = {e.served_name for e in wanted}
        for name in list(self._failed):  # gone from the wanted set, or its object changed: forget it
            entry = next((e for e in wanted if e.served_name == name), None)
            if entry is None or self._failed[name][0] != generation.get(entry.name):
                del self._failed[name]
        to_try = [e for e in wanted if e.served_name not in self._failed]
        registered = {v.served_name for a in registry.adapters.values() for v in a.versions.values()}
        report = asyncio.run(
            sync_replica(
                self.settings,
                self.url,
                to_try,
                registered=registered | set(self._failed),
                prune_unknown=self.prune_unknown,
                rank_limit=self.state.limits.max_lora_rank,
                capacity=cpu_lora_capacity(self.state.limits.max_loras, self.state.limits.max_cpu_loras),
            )
        )
        if report.error is not None:  # vLLM did not answer: nothing is known, nothing is reported
            log.warning("cannot reconcile this server", extra={"server": self.url, "why": report.error})
            return report
        by_name = {e.served_name: e for e in wanted}
        new_failures: list[str] = []
        for name, why in {**report.skipped, **report.failed}.items():
            if name in by_name:  # a failed unload of an unwanted adapter is not a version's failure
                self._failed[name] = (generation.get(by_name[name].name, 0), why)
                new_failures.append(name)
                log.warning(f"not serving {name}: {why}", extra={"adapter": name, "why": why})
        if self.stopped:  # the server is going: its final state is the supervisor's to write
            return report
        self.served = Served(
            loaded={*report.loaded, *report.unchanged},
            failed={name: why for name, (_, why) in self._failed.items()},
        )
        for name in report.loaded:
            log.info("loaded", extra={"adapter": name, "server": self.url})
        for name in report.unloaded:
            log.info("unloaded", extra={"adapter": name, "server": self.url})
        self.state.loaded = sorted(self.served.loaded)
        self.state.failed = dict(sorted(self.served.failed.items()))
        self.state.required = sorted(e.served_name for e in wanted if e.state == "serving")
        self.state.phase = "ready"
        self.state.write(self.state_path)
        self.passes += 1
        if self.metrics is not None:
            self.metrics.observe_pass(
                wanted=wanted_names,
                loaded=self.served.loaded,
                failed=self.served.failed,
                new_failures=new_failures,
            )
            self.metrics.ready.set(1)
        if self.passes == 1 and self.on_first_pass is not None:
            self.on_first_pass(self.served)
        self._report(objects, wanted_names, generation)
        return report

    def _report(
        self, objects: dict[str, dict[str, Any]], wanted: set[str], generation: dict[str, int]
    ) -> None:
        """``status.servers[pod]`` of every adapter whose spec (``metadata.generation``, reported as
        ``observedGeneration``) or whose part of what this server serves changed."""
        for name, obj in sorted(objects.items()):
            loaded = sorted(
                (n.split("@", 1)[1] for n in self.served.loaded if n.split("@", 1)[0] == name),
                key=lambda v: int(v[1:]),
            )
            failed = [
                {"version": n.split("@", 1)[1], "reason": why[:4000]}
                for n, why in sorted(self.served.failed.items())
                if n.split("@", 1)[0] == name and n in wanted
            ]
            mine = server_reports(obj).get(self.pod) or {}
            now = {"loaded": loaded, "failed": failed, "observedGeneration": generation.get(name, 0)}
            if {key: mine.get(key) for key in now} == now:
                continue
            try:
                self.registry.report_server(name, self.pod, {**now, "at": _now()})
            except LoraplaneError as exc:  # the report is for the CLI; serving goes on without it
                log.warning("cannot report in the registry", extra={"adapter": name, "why": exc.message})

    def withdraw(self) -> None:
        """Remove this pod's reports (when it stops); best effort: the CLI only waits on Ready pods."""
        self.stopped = True
        if self.metrics is not None:
            self.metrics.ready.set(0)
        for name in sorted(self.known):
            with contextlib.suppress(LoraplaneError):
                self.registry.report_server(name, self.pod, None)

    def run(self, stop: threading.Event) -> None:
        """List, apply, watch and apply each change; list again after each watch; until ``stop``."""
        objects: dict[str, dict[str, Any]] = {}
        while not stop.is_set():
            try:
                objects, version = self.registry.list_objects()
                self.known = objects
                self._failed.clear()  # a resync tries every failed version again
                self.apply(objects)
                for kind, obj in self.registry.watch(version, timeout_s=self.resync_s):
                    if stop.is_set():
                        break
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        objects.pop(obj["metadata"]["name"], None)
                    else:
                        objects[obj["metadata"]["name"]] = obj
                    self.apply(objects)
            except WatchExpiredError:
                continue
            except LoraplaneError as exc:
                log.warning("cannot watch the registry; retrying", extra={"why": exc.message})
                stop.wait(RETRY_S)
            except Exception as exc:  # one bad pass must not end the reconciler of a serving pod
                log.exception("reconciler pass failed; retrying", extra={"why": str(exc)})
                stop.wait(RETRY_S)


def start(reconciler: ReplicaReconciler, stop: threading.Event) -> threading.Thread:
    """Run ``reconciler`` in a daemon thread (the supervisor's main thread waits on vLLM)."""
    thread = threading.Thread(target=reconciler.run, args=(stop,), name="loraplane-reconciler", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    """``python -m loraplane.serving.replica_reconciler``: the reconciler alone, for a vLLM server that
    runs without our supervisor (a sidecar beside someone else's vLLM container, or a test)."""
    import argparse
    import os
    import signal
    import sys

    from loraplane.serving.server_state import ServerLimits

    prog = "python -m loraplane.serving.replica_reconciler"
    p = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    p.add_argument("--url", required=True, help="the vLLM server (its admin routes)")
    p.add_argument("--pod", default=os.environ.get("POD_NAME"), help="this server's name in the reports")
    p.add_argument("--namespace", default=field_default(Settings, "namespace"))
    p.add_argument("--kubeconfig", type=Path, help="default: the pod's service account, else KUBECONFIG")
    p.add_argument("--api-key-file", type=Path, help="file holding vLLM's API key (default: $VLLM_API_KEY)")
    p.add_argument("--adapters-root", type=Path, required=True, help="adapters must live under it")
    p.add_argument("--max-lora-rank", type=int, required=True, help="the server's --max-lora-rank")
    p.add_argument("--max-loras", type=int, default=1, help="the server's --max-loras")
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        help="the server's --max-cpu-loras (default: loraplane's, serving/capacity.py); no more are loaded",
    )
    p.add_argument("--state-file", type=Path, required=True, help="where to write what this server serves")
    p.add_argument("--resync", type=int, default=RESYNC_S, help="seconds between full lists")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve the reconciler's Prometheus metrics here (0: off)"
    )
    p.add_argument(
        "--keep-unknown", action="store_true", help="never unload adapters the registry does not know"
    )
    args = p.parse_args(argv)
    if not args.pod:
        p.error("--pod (or POD_NAME) names this server in the reports")
    key = args.api_key_file.read_text().strip() if args.api_key_file else os.environ.get("VLLM_API_KEY")
    settings = Settings(
        registry="kubernetes",
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        adapters_root=args.adapters_root,
        api_key=key,
        server_url=args.url,
        max_lora_rank=args.max_lora_rank,
    )
    state = ServerState(
        url=args.url,
        model="",
        served_model_name="",
        limits=ServerLimits(
            max_lora_rank=args.max_lora_rank,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_model_len=0,
        ),
        adapters_root=str(settings.adapters_dir),
        phase="loading",
    )
    state.write(args.state_file)
    reconciler = ReplicaReconciler(
        settings,
        args.url,
        pod=args.pod,
        state=state,
        state_path=args.state_file,
        resync_s=args.resync,
        prune_unknown=not args.keep_unknown,
        metrics=ReplicaMetrics() if args.metrics_port else None,
    )
    if reconciler.metrics is not None:
        reconciler.metrics.serve(args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    thread = start(reconciler, stop)
    stop.wait()
    reconciler.withdraw()
    thread.join(timeout=1.0)
    state.phase = "stopped"
    state.write(args.state_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prometheus metrics of one vLLM pod's reconciler: what the registry wants served here, and what is.

vLLM's own ``/metrics`` says nothing about which adapters a replica serves. The reconciler
(``replica_reconciler.py``) knows after every pass, so the supervisor serves these on a port of
their own (``python -m loraplane.serving --metrics-port``; the chart's ``serving.metricsPort``),
scraped beside vLLM's. The alerts of the chart's PrometheusRule read them:

- ``loraplane_replica_ready``: 1 once the first pass tried every servable version (the pod's
  readiness needs it), 0 before and while stopping;
- ``loraplane_replica_adapters{state}``: how many versions are ``wanted`` (servable in the
  registry), ``loaded`` here, ``failed`` here (with their reason in the registry) and ``missing``
  (wanted but not loaded: a replica missing a servable adapter);
- ``loraplane_replica_adapter_loaded{served}``: 1 per served name loaded here (``support-bot@v3``);
  the registry bounds the series;
- ``loraplane_replica_adapter_load_failures_total{adapter}``: versions that failed to load (counted
  at each try: a version that keeps failing counts again at each resync);
- ``loraplane_replica_reconcile_passes_total`` and ``loraplane_replica_last_pass_timestamp_seconds``.

No ``pod`` label: Prometheus adds the pod's own from the scrape target.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from loraplane.common.metrics_endpoint import MetricsEndpoint

STATES = ("wanted", "loaded", "failed", "missing")


class ReplicaMetrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__()
        self.ready = Gauge(
            "loraplane_replica_ready",
            "1 once the reconciler's first pass tried every servable version, 0 before and while stopping.",
            registry=self.registry,
        )
        self.adapters = Gauge(
            "loraplane_replica_adapters",
            "Adapter versions on this replica: wanted (servable in the registry), loaded, failed, and "
            "missing (wanted but not loaded).",
            ["state"],
            registry=self.registry,
        )
        self.adapter_loaded = Gauge(
            "loraplane_replica_adapter_loaded",
            "1 for each adapter version (served name) loaded on this replica.",
            ["served"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            "loraplane_replica_adapter_load_failures",
            "Adapter versions that failed to load on this replica, by adapter, counted at each try.",
            ["adapter"],
            registry=self.registry,
        )
        self.passes = Counter(
            "loraplane_replica_reconcile_passes",
            "Reconciler passes that reached the vLLM server.",
            registry=self.registry,
        )
        self.last_pass = Gauge(
            "loraplane_replica_last_pass_timestamp_seconds",
            "Unix time of the last reconciler pass that reached the vLLM server.",
            registry=self.registry,
        )
        for state in STATES:
            self.adapters.labels(state).set(0)
        self.ready.set(0)
        self._loaded: set[str] = set()

    def observe_pass(
        self,
        *,
        wanted: Iterable[str],
        loaded: Iterable[str],
        failed: Iterable[str],
        new_failures: Iterable[str],
    ) -> None:
        """Record one pass: served names wanted, loaded and failed here, and those that failed this pass."""
        wanted_set, loaded_set, failed_set = set(wanted), set(loaded), set(failed)
        self.adapters.labels("wanted").set(len(wanted_set))
        self.adapters.labels("loaded").set(len(loaded_set))
        self.adapters.labels("failed").set(len(failed_set & wanted_set))
        self.adapters.labels("missing").set(len(wanted_set - loaded_set))
        for served in self._loaded - loaded_set:
            self.adapter_loaded.remove(served)
        for served in loaded_set:
            self.adapter_loaded.labels(served).set(1)
        self._loaded = loaded_set
        for served in new_failures:
            self.load_failures.labels(served.split("@", 1)[0]).inc()
        self.passes.inc()
        self.last_pass.set(time.time())

"""Prometheus metrics per alias and per adapter version (vLLM's own carry only the base model's name).

Labels: ``route`` (the path), ``model`` (what the client asked for: ``support-bot``, ``support-bot:prod``,
``support-bot@v3`` or the base model), ``served`` (the name vLLM served it under: ``support-bot@v3``).
``model`` and ``served`` are empty when the request never got that far (bad key, unknown model): a
caller's free-form input never becomes a label, so a client cannot blow up the series count.
Each app gets its own :class:`CollectorRegistry`, so several apps can live in one process.

The gateway also reads the registry (to resolve names), so it exports what the registry says at each
scrape (:class:`RegistryCollector`): ``loraplane_registry_alias_version{adapter, alias, version}`` (1
for the version each alias points at: which version serves ``support-bot:prod``) and
``loraplane_registry_alias_changes_total{adapter, alias, action}`` (promotions and rollbacks, counted
from the registry's history) and ``loraplane_registry_alias_change_timestamp_seconds{adapter, alias,
action, version}`` (when the last of each happened: the dashboard's annotations).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from loraplane.registry.model import HistoryEvent, RegistryState

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _StateSource(Protocol):
    def state(self) -> RegistryState: ...


class RegistryCollector(Collector):
    """Aliases and their promotions and rollbacks, read from the registry the gateway resolves with."""

    def __init__(self, source: _StateSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        state = self.source.state()
        version = GaugeMetricFamily(
            "loraplane_registry_alias_version",
            "1 for the adapter version each alias points at, as the gateway reads the registry.",
            labels=["adapter", "alias", "version"],
        )
        for adapter in sorted(state.adapters.values(), key=lambda a: a.name):
            for alias, ver in sorted(adapter.aliases.items()):
                version.add_metric([adapter.name, alias, ver], 1)
        yield version
        changes = CounterMetricFamily(
            "loraplane_registry_alias_changes",
            "Promotions and rollbacks of each alias, counted from the registry's history.",
            labels=["adapter", "alias", "action"],
        )
        tally = Tally(
            (e.adapter, e.alias or "prod", e.action)
            for e in state.history
            if e.action in ("promote", "rollback")
        )
        for labels, count in sorted(tally.items()):
            changes.add_metric(list(labels), count)
        yield changes
        last = GaugeMetricFamily(
            "loraplane_registry_alias_change_timestamp_seconds",
            "Unix time of the last promotion and of the last rollback of each alias, with the version "
            "it moved to (the dashboard draws them as annotations at that time).",
            labels=["adapter", "alias", "action", "version"],
        )
        latest: dict[tuple[str, str, str], HistoryEvent] = {}
        for e in state.history:
            if e.action in ("promote", "rollback"):
                latest[(e.adapter, e.alias or "prod", e.action)] = e
        for (name, alias, action), event in sorted(latest.items()):
            at = _timestamp(event.at)
            if at is not None:
                last.add_metric([name, alias, action, event.version or ""], at)
        yield last


def _timestamp(at: str) -> float | None:
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "loraplane_gateway_requests",
            "Requests answered by the gateway, by route, requested model, served name and HTTP status.",
            ["route", "model", "served", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "loraplane_gateway_request_seconds",
            "Time from receiving a request to the end of its answer (the last byte, for streams).",
            ["route", "model", "served"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttfb_seconds = Histogram(
            "loraplane_gateway_time_to_first_byte_seconds",
            "Streams only: time from receiving the request to the first byte from the model server.",
            ["route", "model", "served"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "loraplane_gateway_tokens",
            "Tokens from the answers' usage objects (chat and completion streams only with "
            "stream_options.include_usage; Responses API streams always).",
            ["model", "served", "kind"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "loraplane_gateway_upstream_errors",
            "Failed exchanges with the model server: connect, timeout, transport, stream (broke mid-way), "
            "http_5xx, auth (it refused the gateway's key).",
            ["route", "reason"],
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "loraplane_gateway_upstream_retries",
            "Requests sent to the model server a second time, on a new connection, before anything was "
            "relayed: status (it answered 500, 502 or 503) or dropped (it closed the connection unanswered).",
            ["route", "reason"],
            registry=self.registry,
        )

    def observe(self, route: str, model: str, served: str, code: int, seconds: float) -> None:
        self.requests.labels(route, model, served, str(code)).inc()
        self.request_seconds.labels(route, model, served).observe(seconds)

    def observe_usage(self, model: str, served: str, usage: object) -> None:
        """Count the tokens of an OpenAI ``usage`` object, if well formed.

        Chat and completions name them ``prompt_tokens`` and ``completion_tokens``, the Responses API
        ``input_tokens`` and ``output_tokens``: both count as ``prompt`` and ``completion``.
        """
        if not isinstance(usage, dict):
            return
        for kind, responses_name in (("prompt", "input_tokens"), ("completion", "output_tokens")):
            value = usage.get(f"{kind}_tokens", usage.get(responses_name))
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                self.tokens.labels(model, served, kind).inc(value)

    def watch_registry(self, source: _StateSource) -> None:
        """Export the aliases and their changes as ``source`` (the gateway's registry) reads them."""
        self.registry.register(RegistryCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)

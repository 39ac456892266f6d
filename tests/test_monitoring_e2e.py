"""The dashboard and the alerts against real parts: a real Prometheus (built from the Go module proxy)
scrapes, every second, the real gateway in front of the session's real vLLM server, a second gateway
whose upstream refuses its key (the fault), vLLM's own /metrics, and a replica reconciler that loaded
the registry's versions into that vLLM (one version's weights were changed after registration: it
fails to load). While the test sends traffic (chat and completions, streams with usage, a weighted
canary, a bad key, an unknown model), every dashboard query and every alert expression is evaluated
through Prometheus's HTTP API and must return data.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prom_server import (
    Prometheus,
    alerts,
    dashboard_queries,
    grafana_expand,
    load_dashboard,
    metric_names,
    prometheus,
    render_monitoring,
    rule_groups,
)
from pydantic import SecretStr
from support import API_KEY, Live, wait_until
from test_gateway import serve

from loraplane.common.settings import Settings
from loraplane.platform.adapters import promote_adapter, register_adapter, rollback_alias
from loraplane.platform.quickstart import free_port
from loraplane.registry.kubernetes import adapter_to_object
from loraplane.registry.local import LocalRegistry
from loraplane.serving.gateway.app import GatewayConfig, create_app
from loraplane.serving.gateway.canary import CanaryRule
from loraplane.serving.replica_metrics import ReplicaMetrics
from loraplane.serving.replica_reconciler import ReplicaReconciler
from loraplane.serving.server_state import ServerLimits, ServerState

pytestmark = pytest.mark.e2e

NS = "loraplane-e2e"  # the namespace label the static targets carry, as a ServiceMonitor's would
CLIENT_KEY = "monitoring-e2e-client-key"
DEADLINE_S = 180.0
MESSAGES = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "Classify the sentiment: The movie was wonderful."},
]


class _Reports:
    """Where the reconciler writes its per-pod reports: the LoraAdapter status in a cluster; here none."""

    def report_server(self, name: str, pod: str, report: dict[str, Any] | None) -> None:
        return None


@dataclass
class Stack:
    name: str
    gateway: str
    broken_gateway: str
    prom: Prometheus
    metrics: ReplicaMetrics
    reconciler: ReplicaReconciler


@pytest.fixture
def stack(live: Live, tmp_path: Path) -> Iterator[Stack]:
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    name = "mon-" + re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-30:].strip("-")
    for version, task in (("v1", "sentiment"), ("v2", "animals"), ("v3", "sentiment")):
        copy = live.settings.adapters_dir / name / version
        shutil.copytree(live.adapters[task], copy)
        register_adapter(settings, copy, name=name, version=version)
    weights = live.settings.adapters_dir / name / "v3" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # changed after registration: every replica refuses to load it
    weights.write_bytes(bytes(data))
    # History for the annotations: v1 -> prod, v2 -> prod, rolled back to v1; v2 is the canary.
    asyncio.run(promote_adapter(settings, f"{name}@v1", force=True, reason="monitoring e2e"))
    asyncio.run(promote_adapter(settings, f"{name}@v2", force=True, reason="monitoring e2e"))
    asyncio.run(rollback_alias(settings, name, reason="monitoring e2e"))
    asyncio.run(promote_adapter(settings, f"{name}@v2", alias="canary", force=True, reason="canary"))

    reconciler = _reconciler(settings, live, tmp_path, name)
    metrics = reconciler.metrics
    assert metrics is not None
    with ExitStack() as stack:
        stack.callback(metrics.close)
        reconciler_port = metrics.serve(0, host="127.0.0.1")
        good = GatewayConfig(
            upstream=live.server.url,
            home=settings.home,
            api_keys=(CLIENT_KEY,),
            upstream_api_key=API_KEY,
            canaries={name: CanaryRule(alias="canary", percent=50)},
        )
        gateway = stack.enter_context(serve(create_app(good)))
        wrong_key = good.model_copy(update={"upstream_api_key": SecretStr("not-vllm-s-key")})
        broken = stack.enter_context(serve(create_app(wrong_key)))
        targets = [
            _target("loraplane-gateway", gateway, "gateway-0"),
            _target("loraplane-gateway", broken, "gateway-1"),
            _target("vllm", live.server.url, "vllm-0"),
            _target("vllm-reconciler", f"http://127.0.0.1:{reconciler_port}", "vllm-0"),
        ]
        prom = stack.enter_context(prometheus(tmp_path / "prometheus", free_port(), targets))
        wait_until(
            lambda: set(prom.targets_up().values()) == {"up"},
            "Prometheus scraping every target",
            timeout=DEADLINE_S,
            every=0.2,
        )
        yield Stack(name, gateway, broken, prom, metrics, reconciler)


def _reconciler(settings: Settings, live: Live, tmp_path: Path, name: str) -> ReplicaReconciler:
    """A reconciler of vLLM pod ``vllm-0`` (the session's server), handed this registry's object."""
    state = ServerState(
        url=live.server.url,
        model="",
        served_model_name="",
        limits=ServerLimits(max_lora_rank=8, max_loras=4, max_model_len=0),
        adapters_root=str(settings.adapters_dir),
    )
    reconciler = ReplicaReconciler(
        settings,
        live.server.url,
        pod="vllm-0",
        state=state,
        state_path=tmp_path / "server-state.json",
        registry=_Reports(),  # type: ignore[arg-type]
        prune_unknown=False,  # the session's server also serves other tests' adapters
        metrics=ReplicaMetrics(),
    )
    registry = LocalRegistry(settings.home).read()
    obj = adapter_to_object(registry.adapters[name], [e for e in registry.history if e.adapter == name])
    obj["metadata"]["generation"] = 1
    report = reconciler.apply({name: obj})
    assert report.error is None, report.error
    assert reconciler.served.loaded >= {f"{name}@v1", f"{name}@v2"}, reconciler.served
    assert set(reconciler.served.failed) == {f"{name}@v3"}, reconciler.served.failed
    return reconciler


def _target(job: str, url: str, pod: str) -> dict[str, Any]:
    return {"job": job, "target": url.split("://", 1)[1], "labels": {"namespace": NS, "pod": pod}}


def _traffic(stack: Stack) -> None:
    """One round of what clients do, good and bad."""
    name = stack.name
    client = OpenAI(base_url=f"{stack.gateway}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=DEADLINE_S)
    for model in (name, name, f"{name}:prod", f"{name}@v2"):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    for model in (name, f"{name}@v1"):
        for _ in client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        ):
            pass
    client.completions.create(model=name, prompt="The movie was", max_tokens=4)
    with httpx.Client(base_url=stack.gateway, timeout=60) as raw:
        body = {"model": name, "messages": MESSAGES, "max_tokens": 2}
        assert (
            raw.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        unknown = {**body, "model": f"{name}-unknown"}
        answer = raw.post(
            "/v1/chat/completions", json=unknown, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        assert answer.status_code == 404
    with httpx.Client(base_url=stack.broken_gateway, timeout=60) as raw:
        body = {"model": f"{name}@v1", "messages": MESSAGES, "max_tokens": 2}
        answer = raw.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        assert answer.status_code >= 500, answer.text


def _empty(prom: Prometheus, exprs: dict[str, str]) -> list[str]:
    return [name for name, expr in exprs.items() if not prom.query(expr)]


def _until_all_have_data(stack: Stack, exprs: dict[str, str], what: str) -> None:
    """Send rounds of traffic until every expression returns data (or fail at the deadline, naming them)."""
    missing: list[str] = list(exprs)

    def done() -> bool:
        nonlocal missing
        _traffic(stack)
        missing = _empty(stack.prom, exprs)
        return not missing

    try:
        wait_until(done, what, timeout=DEADLINE_S, every=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; no data: {missing}") from None


def test_every_dashboard_query_returns_data_from_the_real_gateway_and_vllm(stack: Stack) -> None:
    dashboard = load_dashboard()
    queries = {
        name: grafana_expand(expr).replace('namespace=~".*"', f'namespace=~"{NS}"')
        for name, expr in dashboard_queries(dashboard).items()
    }
    _until_all_have_data(stack, queries, "every dashboard query to return data")

    # And the data says what it should.
    prom = stack.prom
    name = stack.name
    aliases = {
        (r["metric"]["alias"], r["metric"]["version"])
        for r in prom.query(f'loraplane_registry_alias_version{{adapter="{name}"}}')
    }
    assert aliases == {("prod", "v1"), ("canary", "v2")}
    served = {
        r["metric"]["served"] for r in prom.query(queries["Canary split/A"]) if r["metric"]["model"] == name
    }
    assert served == {f"{name}@v1", f"{name}@v2"}, "a 50% canary: both versions answer the bare name"
    rollbacks = prom.query(queries["annotation Rollbacks"])
    assert [r["metric"]["version"] for r in rollbacks if r["metric"]["adapter"] == name] == ["v1"]
    loaded = {r["metric"]["served"] for r in prom.query(queries["Loaded adapter versions per pod/A"])}
    assert {f"{name}@v1", f"{name}@v2"} <= loaded and f"{name}@v3" not in loaded
    for variable in dashboard["templating"]["list"][1:]:  # the namespace and model pickers have values
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector = match[1].replace("$namespace", NS)
        assert prom.query(f"count by ({match[2]}) ({selector})"), variable["name"]


def test_every_alert_expression_has_its_series_and_fires_under_its_fault(stack: Stack) -> None:
    """With thresholds any traffic crosses (the wrong-key gateway's 5xx, any stream's TTFT) and the
    broken v3, each alert's expression returns data; the metrics each one reads exist; and "no Ready
    vLLM" stays quiet while the replica is ready, and returns data once its reconciler says it is not."""
    rules = alerts(
        rule_groups(
            render_monitoring(
                NS,
                "json:monitoring.rules.gateway5xxRatio=0.001",
                "json:monitoring.rules.ttftP95Seconds=0.0001",
            )
        )
    )
    names = {metric for rule in rules.values() for metric in metric_names(rule["expr"])}
    assert {"loraplane_replica_ready", "vllm:num_requests_running", "loraplane_replica_adapters"} <= names
    firing = {alert: rule["expr"] for alert, rule in rules.items() if alert != "LoraplaneNoReadyVLLM"}
    exists = {metric: f"{metric}{{namespace={NS!r}}}".replace("'", '"') for metric in names}
    _until_all_have_data(stack, {**firing, **exists}, "every alert's series and expression under its fault")

    no_ready = rules["LoraplaneNoReadyVLLM"]["expr"]
    assert not stack.prom.query(no_ready), "one replica is ready: quiet"
    stack.metrics.ready.set(0)  # what the supervisor says while vLLM restarts or stops
    wait_until(
        lambda: bool(stack.prom.query(no_ready)), "LoraplaneNoReadyVLLM's condition", timeout=60, every=0.2
    )
    stack.metrics.ready.set(1)
    wait_until(lambda: not stack.prom.query(no_ready), "LoraplaneNoReadyVLLM to clear", timeout=60, every=0.2)

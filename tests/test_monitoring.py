"""Monitoring without vLLM: the chart's dashboard ConfigMap and PrometheusRule (real helm), the alerts
unit-tested by the real promtool (series that fire and series that do not), and the metrics the
reconciler, the gateway's registry view and the trainer export (scraped by a real Prometheus)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prom_server import (
    DASHBOARD,
    alerts,
    dashboard_queries,
    load_dashboard,
    metric_names,
    prometheus,
    prometheus_bin,
    render_monitoring,
    rule_groups,
)
from prometheus_client.parser import text_string_to_metric_families
from support import wait_until

from loraplane.common.settings import Settings
from loraplane.platform.quickstart import free_port
from loraplane.registry.model import Adapter, AdapterVersion, HistoryEvent, RegistryState
from loraplane.serving.gateway.metrics import GatewayMetrics
from loraplane.serving.replica_metrics import ReplicaMetrics
from loraplane.trainer.metrics import TrainingMetrics, loss_curve

NS = "ml"
ALERTS = {
    "LoraplaneGateway5xxRatio",
    "LoraplaneTTFTHigh",
    "LoraplaneNoReadyVLLM",
    "LoraplaneAdapterLoadFailed",
    "LoraplaneReplicaMissingAdapter",
}


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


# --- the chart -------------------------------------------------------------------------------------


def test_monitoring_on_renders_the_dashboard_configmap_and_the_prometheus_rule() -> None:
    objs = render_monitoring(NS, "monitoring.dashboards.annotations.grafana_folder=LLM")
    cm = objs["ConfigMap/platform-loraplane-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "the Grafana sidecar's default label"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(cm["data"]["loraplane.json"]) == load_dashboard(), "the file, unchanged"
    rule = objs["PrometheusRule/platform-loraplane-alerts"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["namespace"] == NS
    rules = alerts(rule["spec"])
    assert set(rules) == ALERTS
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning"), name
        assert len(r["annotations"]["runbook"]) > 200 and r["annotations"]["summary"], name
        assert f'namespace="{NS}"' in r["expr"], f"{name} is scoped to the release's namespace"


def test_monitoring_is_off_by_default_and_thresholds_are_values() -> None:
    from test_chart import _render

    objs = _render()
    assert not [k for k in objs if k.startswith("PrometheusRule/") or k.endswith("-dashboard")]
    rules = alerts(
        rule_groups(
            render_monitoring(
                NS,
                "json:monitoring.rules.gateway5xxRatio=0.2",
                "json:monitoring.rules.ttftP95Seconds=1.5",
                "monitoring.rules.for=10m",
                "monitoring.rules.noReplicaFor=1m",
                "monitoring.rules.alertLabels.team=ml",
                "monitoring.rules.labels.release=kps",
            )
        )
    )
    assert rules["LoraplaneGateway5xxRatio"]["expr"].rstrip().endswith("> 0.2")
    assert rules["LoraplaneTTFTHigh"]["expr"].rstrip().endswith("> 1.5")
    assert rules["LoraplaneGateway5xxRatio"]["for"] == "10m" and rules["LoraplaneNoReadyVLLM"]["for"] == "1m"
    assert all(r["labels"]["team"] == "ml" for r in rules.values())
    # Without vLLM there is no replica alert; without the reconciler's metrics, readiness is vLLM's.
    assert set(alerts(rule_groups(render_monitoring(NS, "serving.enabled=false")))) == {
        "LoraplaneGateway5xxRatio",
        "LoraplaneTTFTHigh",
    }
    no_reconciler = alerts(rule_groups(render_monitoring(NS, "serving.metricsPort=0")))
    assert "loraplane_replica" not in no_reconciler["LoraplaneNoReadyVLLM"]["expr"]


def test_the_reconciler_metrics_port_is_a_container_port_a_service_port_and_scraped() -> None:
    from test_chart import _vllm

    objs = render_monitoring(NS, "serving.serviceMonitor.enabled=true")
    _, _, container = _vllm(objs)
    assert "--metrics-port=9400" in container["args"]
    assert {"name": "metrics", "containerPort": 9400} in container["ports"]
    service = objs["Service/platform-loraplane-vllm"]
    assert {"name": "metrics", "port": 9400, "targetPort": "metrics"} in service["spec"]["ports"]
    monitor = objs["ServiceMonitor/platform-loraplane-vllm"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http", "metrics"]
    policy = objs["NetworkPolicy/platform-loraplane-vllm"]
    assert {"port": 9400, "protocol": "TCP"} in policy["spec"]["ingress"][-1]["ports"]


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    dashboard = load_dashboard()
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in (
        "Requests/s by requested name and served version",
        "Error rate by class",
        "Time to first token p50 / p95 / p99 by served version",
        "Latency p50 / p95 / p99 by served version",
        "Tokens/s by served version",
        "Canary split",
        "Running and waiting requests",
        "KV-cache use",
        "Adapters per pod: loaded, wanted, missing, failed",
    ):
        assert needed in titles, needed
    names = {a["name"] for a in dashboard["annotations"]["list"]}
    assert {"Promotions", "Rollbacks"} <= names
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["description"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", "the datasource is a variable"


# --- the alerts, through promtool --------------------------------------------------------------------


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


@pytest.mark.e2e  # a real Prometheus (scripts/prometheus-tools.sh builds it)
def test_promtool_checks_the_rules_and_unit_tests_each_alert(tmp_path: Path) -> None:
    """Each alert with series that make it fire and series that must not (promtool test rules)."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule_groups(render_monitoring(NS))))
    promtool = str(prometheus_bin() / "promtool")
    check = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    gw = {"namespace": NS, "pod": "gw-0", "route": "/v1/chat/completions", "model": "bot", "served": "bot@v1"}
    other_ns = {**gw, "namespace": "elsewhere"}
    pod = {"namespace": NS, "pod": "vllm-0"}
    pod1 = {"namespace": NS, "pod": "vllm-1"}
    bucket = "loraplane_gateway_time_to_first_byte_seconds_bucket"
    tests: list[dict[str, Any]] = [
        {  # 10% 5xx for 10 minutes: fires (over 5%); the same in another namespace does not
            "interval": "1m",
            "input_series": [
                _series("loraplane_gateway_requests_total", {**gw, "code": "200"}, "0+90x15"),
                _series("loraplane_gateway_requests_total", {**gw, "code": "502"}, "0+10x15"),
                _series("loraplane_gateway_requests_total", {**other_ns, "code": "502"}, "0+100x15"),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "3m",
                    "alertname": "LoraplaneGateway5xxRatio",
                    "exp_alerts": [],
                },  # not yet `for`
                {
                    "eval_time": "12m",
                    "alertname": "LoraplaneGateway5xxRatio",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "critical", "namespace": NS},
                            "description": f"10% of the loraplane gateway's answers in {NS} were 5xx "
                            "over the last 5 minutes.",
                        }
                    ],
                },
            ],
        },
        {  # 1% 5xx: does not fire
            "interval": "1m",
            "input_series": [
                _series("loraplane_gateway_requests_total", {**gw, "code": "200"}, "0+99x15"),
                _series("loraplane_gateway_requests_total", {**gw, "code": "500"}, "0+1x15"),
            ],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "LoraplaneGateway5xxRatio", "exp_alerts": []}
            ],
        },
        {  # every first byte after 2.5-5 s: p95 above 2 s, fires; a fast model beside it does not
            "interval": "1m",
            "input_series": [
                *[_series(bucket, {**gw, "le": le}, "0+0x15") for le in ("0.5", "1.0", "2.5")],
                *[_series(bucket, {**gw, "le": le}, "0+10x15") for le in ("5.0", "+Inf")],
                *[
                    _series(bucket, {**gw, "model": "fast", "served": "fast@v1", "le": le}, "0+10x15")
                    for le in ("0.5", "1.0", "2.5", "5.0", "+Inf")
                ],
            ],
            "alert_rule_test": [
                {
                    "eval_time": "12m",
                    "alertname": "LoraplaneTTFTHigh",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "namespace": NS, "model": "bot"},
                            "description": f"p95 time to the first streamed byte for bot in {NS} is 4.875s.",
                        }
                    ],
                }
            ],
        },
        {  # one replica ready and scraped: quiet; then its reconciler says not ready: fires after 2m
            "interval": "1m",
            "input_series": [
                _series("loraplane_replica_ready", pod, "1 1 1 0 0 0 0 0"),
                _series("vllm:num_requests_running", {**pod, "model_name": "base", "engine": "0"}, "0x8"),
                _series("loraplane_replica_ready", pod1, "1x8"),  # ready, but vLLM is not scraped there
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "LoraplaneNoReadyVLLM", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "LoraplaneNoReadyVLLM",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NS}}],
                },
            ],
        },
        {  # no series at all (every vLLM pod gone): fires
            "interval": "1m",
            "input_series": [_series("loraplane_gateway_requests_total", {**gw, "code": "200"}, "0+1x5")],
            "alert_rule_test": [
                {
                    "eval_time": "4m",
                    "alertname": "LoraplaneNoReadyVLLM",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": NS}}],
                }
            ],
        },
        {  # a failed version on vllm-1 fires at once; missing fires after `for`; vllm-0 is fine
            "interval": "1m",
            "input_series": [
                _series("loraplane_replica_adapters", {**pod, "state": "failed"}, "0x10"),
                _series("loraplane_replica_adapters", {**pod, "state": "missing"}, "0x10"),
                _series("loraplane_replica_adapters", {**pod1, "state": "failed"}, "1x10"),
                _series("loraplane_replica_adapters", {**pod1, "state": "missing"}, "1x10"),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "1m",
                    "alertname": "LoraplaneAdapterLoadFailed",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", **pod1},
                            "description": f"1 servable adapter version(s) failed to load on vllm-1 in {NS}.",
                        }
                    ],
                },
                {"eval_time": "3m", "alertname": "LoraplaneReplicaMissingAdapter", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "LoraplaneReplicaMissingAdapter",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", **pod1},
                            "description": f"vllm-1 in {NS} has not loaded 1 version(s) the registry says "
                            "are servable.",
                        }
                    ],
                },
            ],
        },
    ]
    rules = alerts(rule_groups(render_monitoring(NS)))
    for test in tests:  # promtool compares every annotation: the rule's, with the description expanded
        for case in test["alert_rule_test"]:
            for alert in case["exp_alerts"]:
                annotations = dict(rules[case["alertname"]]["annotations"])
                if "description" in alert:
                    annotations["description"] = alert.pop("description")
                alert["exp_annotations"] = annotations
    tested = {c["alertname"] for t in tests for c in t["alert_rule_test"]}
    assert tested == ALERTS, "every alert has a promtool test"
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(rules_file)], "tests": tests}))
    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the metrics, scraped by a real Prometheus ---------------------------------------------------------


def _registry_with_history() -> RegistryState:
    versions = {
        v: AdapterVersion(name="bot", version=v, served_name=f"bot@{v}", path="/x", weights_sha256="0" * 64)
        for v in ("v1", "v2")
    }
    state = RegistryState(adapters={"bot": Adapter(name="bot", versions=versions, aliases={"prod": "v1"})})
    state.history = [
        HistoryEvent(
            action="promote", adapter="bot", version="v1", alias="prod", at="2026-01-01T00:00:00+00:00"
        ),
        HistoryEvent(
            action="promote", adapter="bot", version="v2", alias="prod", at="2026-01-02T00:00:00+00:00"
        ),
        HistoryEvent(
            action="rollback", adapter="bot", version="v1", alias="prod", at="2026-01-03T00:00:00+00:00"
        ),
        HistoryEvent(action="register", adapter="bot", version="v2"),
    ]
    return state


class _Source:
    def __init__(self, state: RegistryState) -> None:
        self._state = state

    def state(self) -> RegistryState:
        return self._state


def test_gateway_exports_aliases_promotions_and_rollbacks_from_the_registry() -> None:
    metrics = GatewayMetrics()
    metrics.watch_registry(_Source(_registry_with_history()))
    got = samples(metrics.render())
    assert (
        got[("loraplane_registry_alias_version", (("adapter", "bot"), ("alias", "prod"), ("version", "v1")))]
        == 1
    )
    key = (("action", "promote"), ("adapter", "bot"), ("alias", "prod"))
    assert got[("loraplane_registry_alias_changes_total", key)] == 2
    assert got[("loraplane_registry_alias_changes_total", (("action", "rollback"), *key[1:]))] == 1
    rollback = (("action", "rollback"), ("adapter", "bot"), ("alias", "prod"), ("version", "v1"))
    assert got[("loraplane_registry_alias_change_timestamp_seconds", rollback)] == 1767398400.0


def test_replica_metrics_say_what_is_wanted_loaded_failed_and_missing() -> None:
    metrics = ReplicaMetrics()
    assert samples(metrics.render())[("loraplane_replica_ready", ())] == 0
    metrics.observe_pass(
        wanted={"a@v1", "a@v2", "b@v1"}, loaded={"a@v1", "x@v9"}, failed={"a@v2"}, new_failures=["a@v2"]
    )
    got = samples(metrics.render())
    by_state = {dict(k[1])["state"]: v for k, v in got.items() if k[0] == "loraplane_replica_adapters"}
    assert by_state == {"wanted": 3, "loaded": 2, "failed": 1, "missing": 2}
    assert got[("loraplane_replica_adapter_load_failures_total", (("adapter", "a"),))] == 1
    metrics.observe_pass(wanted={"a@v1"}, loaded={"a@v1"}, failed=set(), new_failures=[])
    loaded = {
        dict(k[1])["served"] for k in samples(metrics.render()) if k[0] == "loraplane_replica_adapter_loaded"
    }
    assert loaded == {"a@v1"}, "an unloaded version's series goes away"


@pytest.mark.e2e  # a real Prometheus (scripts/prometheus-tools.sh builds it)
def test_training_metrics_and_the_published_loss_curve(tmp_path: Path) -> None:
    """The trainer's metrics server, fed the events a run logs, scraped by a real Prometheus; and the
    curve `adapters show` reads from metrics.jsonl."""
    metrics = TrainingMetrics()
    port = metrics.serve(0, host="127.0.0.1")
    try:
        metrics({"step": 0.0, "max_steps": 20.0})
        metrics(
            {
                "step": 5.0,
                "max_steps": 20.0,
                "loss": 3.5,
                "learning_rate": 0.01,
                "num_input_tokens_seen": 500.0,
            }
        )
        metrics(
            {
                "step": 10.0,
                "max_steps": 20.0,
                "loss": 1.2,
                "learning_rate": 0.005,
                "num_input_tokens_seen": 1000.0,
            }
        )
        target = {"job": "trainer", "target": f"127.0.0.1:{port}", "labels": {"pod": "train-0"}}
        with prometheus(tmp_path / "prom", free_port(), [target]) as prom:
            wait_until(lambda: bool(prom.query("loraplane_trainer_loss")), "the trainer scraped", timeout=60)
            assert float(prom.query("loraplane_trainer_loss")[0]["value"][1]) == 1.2
            assert float(prom.query("loraplane_trainer_learning_rate")[0]["value"][1]) == 0.005
            assert (
                float(prom.query("loraplane_trainer_step / loraplane_trainer_max_steps")[0]["value"][1])
                == 0.5
            )
            assert float(prom.query("loraplane_trainer_tokens_per_second")[0]["value"][1]) > 0
    finally:
        metrics.close()
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps(e) + "\n"
            for e in (
                {"step": 5, "loss": 3.5},
                {"step": 10, "loss": 1.2},
                {"step": 10, "eval_loss": 1.4},
                {"x": 1},
            )
        )
    )
    curve = loss_curve(tmp_path)
    assert curve.train == [(5, 3.5), (10, 1.2)] and curve.eval == [(10, 1.4)]
    assert curve.summary() == "3.5 -> 1.2 (min 1.2) over 10 steps; eval 1.4"
    assert loss_curve(tmp_path / "nothing").summary() == ""


@pytest.mark.e2e  # a real Prometheus (scripts/prometheus-tools.sh builds it)
def test_every_dashboard_query_and_alert_expression_is_valid_promql(tmp_path: Path) -> None:
    """Prometheus parses each query (empty TSDB: no data is expected here; the e2e test wants data)."""
    from prom_server import grafana_expand

    exprs = {name: grafana_expand(q) for name, q in dashboard_queries(load_dashboard()).items()}
    exprs.update({name: r["expr"] for name, r in alerts(rule_groups(render_monitoring(NS))).items()})
    with prometheus(tmp_path / "prom", free_port(), []) as prom:
        for name, expr in exprs.items():
            response = httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=30)
            assert response.status_code == 200, f"{name}: {response.text}"
            assert metric_names(expr), f"{name}: no metric found in {expr!r}"
    assert DASHBOARD.is_file()


@pytest.mark.parametrize("expr", ['sum by (pod) (vllm:num_requests_running{namespace=~".*"})'])
def test_metric_names_finds_selectors(expr: str) -> None:
    assert metric_names(expr) == {"vllm:num_requests_running"}


def test_train_status_reads_the_last_progress_step_from_the_trainers_json_log() -> None:
    """The lines ProgressReporter logs in a pod (JSON), formatted by the real formatter, read back."""
    import logging
    from types import SimpleNamespace

    from loraplane.common.logs import _KeyValueFormatter
    from loraplane.trainer.callbacks import ProgressReporter
    from loraplane.trainer.metrics import last_progress, progress_summary

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(_KeyValueFormatter(as_json=True))
    logger = logging.getLogger("loraplane.trainer")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        reporter = ProgressReporter(None, is_main=True)
        state = SimpleNamespace(global_step=10, max_steps=40, num_input_tokens_seen=0)
        reporter._emit(state, {"loss": 2.5, "learning_rate": 0.01, "epoch": 0.5})
        state.global_step = 20
        reporter._emit(state, {"loss": 1.25, "learning_rate": 0.005, "epoch": 1.0})
        logger.info("something else")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    progress = last_progress(["not json", *lines, '{"msg": "train progress"}'])
    assert progress is not None and progress["step"] == 20 and progress["loss"] == 1.25
    assert progress_summary(progress) == "step 20/40, loss 1.25, learning rate 0.005, epoch 1"
    assert last_progress(["plain text train progress"]) is None


def test_adapters_show_prints_each_versions_loss_curve(settings: Settings, fake_adapter: Path) -> None:
    from test_cli import _cli

    from loraplane.platform.adapters import register_adapter

    (fake_adapter / "metrics.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in ({"step": 2, "loss": 8.0}, {"step": 4, "loss": 1.5}))
    )
    register_adapter(settings, fake_adapter, name="demo", version="v1")
    shown = _cli(settings, "adapters", "show", "demo", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["loss_curves"]["v1"]["train"] == [[2, 8.0], [4, 1.5]]
    table = _cli(settings, "adapters", "show", "demo")
    assert table.returncode == 0 and "8 -> 1.5 (min 1.5) over 4 steps" in table.stdout, table.stdout


def test_training_pods_serve_their_metrics_and_a_pod_monitor_scrapes_them() -> None:
    from test_chart import _profile, _render, _template_job

    objs = _render(files=(_profile("autoscaling-monitoring"),))
    job = _template_job(objs)
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LORAPLANE_TRAINER_METRICS_PORT"] == "9402", "what trainer/__main__.py reads"
    assert {"name": "metrics", "containerPort": 9402} in container["ports"]
    monitor = objs["PodMonitor/platform-loraplane-trainer"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items(), "the PodMonitor selects the run's pods"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    ingress = objs["NetworkPolicy/platform-loraplane-trainer"]["spec"]["ingress"]
    assert [rule["ports"] for rule in ingress if "ports" in rule] == [
        [{"port": "metrics", "protocol": "TCP"}]
    ]

    # off: no port, no env, no PodMonitor, no ingress for scrapers
    off = _render("trainer.metrics.enabled=false")
    (plain,) = _template_job(off)["spec"]["template"]["spec"]["containers"]
    assert "ports" not in plain and "LORAPLANE_TRAINER_METRICS_PORT" not in {e["name"] for e in plain["env"]}
    assert "PodMonitor/platform-loraplane-trainer" not in off
    assert "ingress" not in off["NetworkPolicy/platform-loraplane-trainer"]["spec"]

"""A real Prometheus for the monitoring tests: built by scripts/prometheus-tools.sh (from the Go module
proxy, cached outside the clone), run as a process on loopback with static scrape targets, queried
through its HTTP API. Also: the chart's dashboard and PrometheusRule, rendered by the real helm."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from kube_client import helm_args
from support import wait_until

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraplane"
DASHBOARD = CHART / "dashboards" / "loraplane.json"
HELM = shutil.which("helm") or str(ROOT / ".venv" / "bin" / "helm")


@functools.cache
def prometheus_bin() -> Path:
    """The bin directory holding prometheus and promtool (built once per machine; then instant)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "prometheus-tools.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def render_monitoring(namespace: str, *sets: str) -> dict[str, dict[str, Any]]:
    """The chart rendered with monitoring on (dashboard and rules), by kind/name. ``json:KEY=VALUE``
    sets a JSON value (a number: ``--set`` makes ``0.2`` a string)."""
    args = ["template", "platform", str(CHART), "--namespace", namespace]
    for s in ("monitoring.dashboards.enabled=true", "monitoring.rules.enabled=true", *sets):
        args += ["--set-json", s[5:]] if s.startswith("json:") else ["--set", s]
    proc = subprocess.run([HELM, *helm_args(tuple(args))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def rule_groups(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rendered PrometheusRule's spec: a Prometheus rule file (``groups:``)."""
    (rule,) = [o for o in objs.values() if o["kind"] == "PrometheusRule"]
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts(groups: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in groups["groups"] for r in g["rules"]}


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every query of the dashboard (panels, annotations), by ``panel title/refId``."""
    queries: dict[str, str] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']}/{target['refId']}"] = target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries[f"annotation {annotation['name']}"] = annotation["expr"]
    return queries


def grafana_expand(expr: str, *, rate_interval: str = "30s") -> str:
    """Grafana's variables as Grafana would expand them with "All" selected."""
    return expr.replace("$__rate_interval", rate_interval).replace("$namespace", ".*").replace("$model", ".*")


_SELECTOR = re.compile(r"(?<![\w:\"$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (``name{...}``)."""
    return {m for m in _SELECTOR.findall(expr) if m not in _NOT_METRICS}


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant query's result (a vector); fails on a query Prometheus refuses."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        data = body["data"]
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, str]:
        """Each scrape target's ``job/pod`` -> its health (up, down, unknown)."""
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=30).json()
        return {
            f"{t['labels']['job']}/{t['labels'].get('pod', '')}": t["health"]
            for t in body["data"]["activeTargets"]
        }


@contextmanager
def prometheus(
    workdir: Path, port: int, targets: list[dict[str, Any]], *, rule_files: tuple[Path, ...] = ()
) -> Iterator[Prometheus]:
    """Run Prometheus on 127.0.0.1:``port``, scraping ``targets`` (job, target, labels, path) every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [],
    }
    jobs: dict[str, dict[str, Any]] = {}
    for t in targets:  # one scrape config per job, one static config (with its labels) per target
        job = jobs.setdefault(t["job"], {"job_name": t["job"], "static_configs": []})
        job["metrics_path"] = t.get("path", "/metrics")
        job["static_configs"].append({"targets": [t["target"]], "labels": t.get("labels", {})})
    config["scrape_configs"] = list(jobs.values())
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(prometheus_bin() / "prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        def alive() -> None:
            assert process.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"

        wait_until(ready, "Prometheus ready", timeout=60, every=0.2, alive=alive)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard

"""``loraplane evals ...``: eval suites against any OpenAI-compatible endpoint; suite checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
import typer.core

from loraplane.common.errors import ExitCode, InvalidInputError, LoraplaneError
from loraplane.platform.cli.app import (
    _duration_option,
    _escape,
    _output_option,
    _print_report,
    _progress_bar,
    _settings,
    err,
    evals_app,
    handled,
    out,
)


@evals_app.command("run")
@handled
def evals_run(
    suite: Path = typer.Argument(..., help="Eval suite YAML."),
    endpoint: str | None = typer.Option(
        None,
        "--endpoint",
        "-e",
        envvar="LORAPLANE_EVAL_ENDPOINT",
        help="OpenAI-compatible base URL (with --registry kubernetes and none given: the namespace's "
        "gateway, through a port-forward).",
    ),
    candidate: str = typer.Option(..., "--candidate", "-m", help="Model name to evaluate."),
    prod: str | None = typer.Option(None, help="Model serving production today (compared, gated on)."),
    base: str | None = typer.Option(None, help="Base model name (compared, gated on)."),
    api_key_env: str | None = typer.Option(
        None,
        help="Environment variable holding the API key (default: LORAPLANE_API_KEY, then OPENAI_API_KEY).",
    ),
    report_dir: Path = typer.Option(Path("eval-reports"), help="Where the JSON, Markdown and PNG go."),
    check: bool = typer.Option(False, "--check", help="Exit 3 when the suite's gate fails (for CI)."),
    output: str = _output_option(),
) -> None:
    """Run a suite against an endpoint (vLLM, the gateway, or another provider); nothing is registered.

    \b
    Example:
      loraplane evals run suite.yaml -e http://127.0.0.1:8000/v1 -m support-bot@v3 --base my-base
    """

    from loraplane.evals.suite import load_suite
    from loraplane.platform.suite_runs import run_suite_on_endpoint

    loaded = load_suite(suite)
    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise InvalidInputError(f"--api-key-env {api_key_env}: that environment variable is not set")
    models = {
        "candidate": candidate,
        **({"prod": prod} if prod else {}),
        **({"base": base} if base else {}),
    }
    with _progress_bar("requests") as progress:
        report, files = run_suite_on_endpoint(
            _settings(),
            loaded,
            models,
            endpoint=endpoint,
            api_key=key,
            report_dir=report_dir,
            on_progress=progress,
        )
    if output == "json":
        out.print_json(files.json.read_text())
    else:
        _print_report(report)
        out.print(f"report: {files.markdown}, {files.png}, {files.json}")
    if check and report.gate is not None and not report.gate.passed:
        raise typer.Exit(ExitCode.REFUSED)


@evals_app.command("validate")
@handled
def evals_validate(
    suite: Path = typer.Argument(..., help="Eval suite YAML."),
    output: str = _output_option(),
) -> None:
    """Check a suite file and every dataset it names, without sending a request.

    Example: loraplane evals validate evals/support.yaml
    """

    from loraplane.evals.suite import load_suite

    loaded = load_suite(suite)
    gate = loaded.suite.gate
    if output == "json":
        datasets = {
            name: {
                "path": str(path),
                "examples": len(examples),
                "metrics": next(d for d in loaded.suite.datasets if d.name == name).figures(),
            }
            for name, (path, examples) in loaded.datasets.items()
        }
        rules = [{"rule": r, "key": k, "threshold": t} for r, k, t in gate.rules()] if gate else []
        summary = {"suite": loaded.suite.name, "datasets": datasets, "gate": rules}
        out.print_json(json.dumps(summary))
        return
    for name, (path, examples) in loaded.datasets.items():
        spec = next(d for d in loaded.suite.datasets if d.name == name)
        out.print(f"{name}: {len(examples)} examples from {path}; metrics: {', '.join(spec.figures())}")
    out.print(
        f"gate: {len(gate.rules())} rules" if gate else "gate: none (promote will refuse without --force)"
    )


# --- in the cluster: a Job next to vLLM (platform/eval_jobs.py) -------------------------------------


def _print_verdict(record: Any) -> None:
    """What the registry keeps of an evaluation: each dataset's figures per model, then the gate."""
    from rich.table import Table

    from loraplane.evals.metrics import FIGURES
    from loraplane.evals.report import ROLE_ORDER

    roles = sorted(record.models, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 99, r))
    for dataset, by_role in record.scores.items():
        present = [r for r in roles if r in by_role]
        table = Table(title=f"{record.suite} / {dataset} via {record.endpoint} ({record.created_at})")
        table.add_column("metric")
        for role in present:
            table.add_column(f"{role}\n{record.models[role]}", justify="right")
        figures = list(dict.fromkeys(f for role in present for f in by_role[role]))
        for figure in figures:
            info = FIGURES.get(figure)
            arrow = "" if info is None else " ↑" if info.higher_is_better else " ↓"
            values = [by_role[role].get(figure) for role in present]
            table.add_row(f"{figure}{arrow}", *("n/a" if v is None else f"{v:.3f}" for v in values))
        out.print(table)
    if not record.checks:
        out.print("gate: none (promote will refuse without --force)")
        return
    out.print(f"gate: {'[green]PASS[/]' if record.passed else '[red]FAIL[/]'}")
    for check in record.checks:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[dim]skip[/]"}[check.passed]
        out.print(f"  {mark} {check.rule}: {_escape(check.message)}")


@evals_app.command("submit")
@handled
def evals_submit(
    ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS (resolved now)."),
    suite: Path | None = typer.Option(
        None, "--suite", "-s", help="Eval suite YAML (datasets, metrics, gate); read here."
    ),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="Or one eval JSONL with the default metrics and gate."
    ),
    release: str = typer.Option(
        "platform", "--release", help="Helm release whose evaluation template to use."
    ),
    wait: bool = typer.Option(
        False,
        "--wait",
        help="Wait for the Job, print the verdict from the registry; exit 3 if the gate failed.",
    ),
    timeout: float = _duration_option("1h", "Longest --wait."),
    output: str = _output_option(),
) -> None:
    """Evaluate a version in the cluster: a Job next to vLLM runs `adapters eval` through vLLM's Service
    and records the verdict in the registry (needs the kubernetes registry).

    \b
    Examples:
      loraplane --registry kubernetes -n ml evals submit support-bot@v4 --suite evals/support.yaml --wait
      loraplane --registry kubernetes -n ml evals status eval-support-bot-v4-x7k2p
    """

    from loraplane.platform.eval_jobs import finished_verdict, submit_eval, wait_for_eval

    settings = _settings()
    run = submit_eval(settings, ref, suite=suite, dataset=dataset, release=release)
    result: dict[str, Any] = run.to_dict()
    where = f"loraplane --registry kubernetes -n {run.namespace}"
    if not wait:
        if output == "json":
            out.print_json(json.dumps(result))
            return
        out.print(
            f"submitted {run.job} ({run.ref}, suite {run.suite}) in namespace {run.namespace}",
            highlight=False,
        )
        out.print(f"follow it: {where} evals status {run.job}", highlight=False)
        out.print(f"its log:   kubectl -n {run.namespace} logs job/{run.job} -f", highlight=False)
        return
    if output != "json":
        err.print(f"submitted {run.job} ({run.ref}); waiting for it to finish", highlight=False)
    status = wait_for_eval(settings, run.job, timeout=timeout)
    record = finished_verdict(settings, status)
    if output == "json":
        out.print_json(
            json.dumps({**result, "state": status.state, "verdict": record.model_dump(mode="json")})
        )
    else:
        _print_verdict(record)
    if record.checks and not record.passed:
        raise typer.Exit(ExitCode.REFUSED)


@evals_app.command("status")
@handled
def evals_status(
    job: str = typer.Argument(..., help="Job name printed by evals submit."),
    output: str = _output_option(),
) -> None:
    """Show an evaluation Job: running, succeeded (with the verdict from the registry) or failed (with
    its pod's exit code and last log lines).

    Example: loraplane --registry kubernetes -n ml evals status eval-support-bot-v4-x7k2p
    """

    from rich.table import Table

    from loraplane.platform.eval_jobs import eval_status, finished_verdict

    settings = _settings()
    status = eval_status(settings, job)
    record, problem = None, None
    if status.state != "Running":
        try:
            record = finished_verdict(settings, status)
        except LoraplaneError as exc:
            problem = str(exc)
    if output == "json":
        verdict = record.model_dump(mode="json") if record is not None else None
        out.print_json(json.dumps({**status.to_dict(), "verdict": verdict, "error": problem}))
        return
    why = f": {status.reason}: {status.message}" if status.reason else ""
    out.print(f"{status.job} ({status.ref}, suite {status.suite}): {status.state}{why}", highlight=False)
    table = Table()
    for col in ("pod", "phase", "exit code", "meaning"):
        table.add_column(col)
    for pod in status.pods:
        code = "" if pod.exit_code is None else str(pod.exit_code)
        table.add_row(pod.name, pod.phase, code, pod.meaning or "")
    out.print(table)
    if problem is not None:
        out.print(_escape(problem), highlight=False)
    if record is not None:
        _print_verdict(record)

"""``loraplane evals ...``: eval suites against any OpenAI-compatible endpoint; suite checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

import typer
import typer.core

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.platform.cli.app import (
    _output_option,
    _print_report,
    _progress_bar,
    _run,
    _settings,
    evals_app,
    out,
)


@evals_app.command("run")
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

    def body() -> None:
        from datetime import UTC, datetime

        from loraplane.evals.render import write_report
        from loraplane.evals.runner import SuiteIncompleteError, run_suite
        from loraplane.evals.suite import load_suite

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
        stem = f"{loaded.suite.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
        if endpoint is not None:
            reach: contextlib.AbstractContextManager[str] = contextlib.nullcontext(endpoint)
        elif _settings().registry == "kubernetes":
            from loraplane.platform.portforward import service_url

            reach = service_url(_settings(), "gateway")
        else:
            raise InvalidInputError(
                "--endpoint URL is required", hint="e.g. -e http://127.0.0.1:8000/v1 (vLLM or the gateway)"
            )
        try:
            with reach as url, _progress_bar("requests") as progress:
                base_url = url if endpoint is not None else f"{url}/v1"
                report = asyncio.run(run_suite(loaded, base_url, models, api_key=key, on_progress=progress))
        except SuiteIncompleteError as exc:
            files = write_report(exc.report, report_dir, stem + "-INCOMPLETE")
            raise LoraplaneError(str(exc), hint=f"partial report: {files.markdown}") from None
        files = write_report(report, report_dir, stem)
        if output == "json":
            out.print_json(files.json.read_text())
        else:
            _print_report(report)
            out.print(f"report: {files.markdown}, {files.png}, {files.json}")
        if check and report.gate is not None and not report.gate.passed:
            raise typer.Exit(3)

    _run(body)


@evals_app.command("validate")
def evals_validate(
    suite: Path = typer.Argument(..., help="Eval suite YAML."),
    output: str = _output_option(),
) -> None:
    """Check a suite file and every dataset it names, without sending a request.

    Example: loraplane evals validate evals/support.yaml
    """

    def body() -> None:
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

    _run(body)

"""``loraplane train ...``: training runs, a Job per run on the cluster or a local trainer process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
import typer.core

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.platform.cli.app import (
    _duration_option,
    _escape,
    _output_option,
    _settings,
    err,
    handled,
    out,
    train_app,
)


def _cluster_settings() -> Any:
    settings = _settings()
    if settings.registry != "kubernetes":
        raise InvalidInputError(
            "train status/logs/register/cancel run on a Kubernetes cluster: pass --registry kubernetes "
            "-n NAMESPACE (or set LORAPLANE_REGISTRY=kubernetes)",
            hint="with the local registry, `loraplane train submit CONFIG` trains on this machine",
        )
    return settings


def _register_run(settings: Any, job: str) -> tuple[Any, bool]:
    from loraplane.platform.training_k8s import published_result, register_published

    return register_published(settings, published_result(settings, job), job=job)


def _registered_line(entry: Any, created: bool) -> str:
    return f"{'registered' if created else 'already registered'} {entry.ref} ({entry.path})"


def _print_registration(entry: Any, created: bool, output: str) -> None:
    """The answer of a command whose result is one registered adapter: the entry as JSON, or a line."""
    if output == "json":
        out.print_json(json.dumps({"adapter": entry.model_dump(mode="json"), "registered": created}))
    else:
        out.print(_registered_line(entry, created), highlight=False, soft_wrap=True)


@train_app.command("submit")
@handled
def train_submit(
    config: Path = typer.Argument(..., help="Training config (YAML); on a cluster, paths are on its volume."),
    overrides: list[str] | None = typer.Argument(None, help="section.key=value overrides."),
    release: str = typer.Option("platform", help="Helm release whose training template to use."),
    wait: bool = typer.Option(
        False, "--wait", help="Cluster: wait for the Job to finish, then register what it published."
    ),
    timeout: float = _duration_option("24h", "Longest --wait."),
    output: str = _output_option(),
) -> None:
    """Train an adapter. With the kubernetes registry: validate the config and start a Job from the
    release's template (--wait: until it ends, then register the adapter). With the local registry:
    run the trainer here, show its progress, and register the adapter it publishes.

    \b
    Examples:
      loraplane --registry kubernetes -n ml train submit train.yaml training.epochs=3 --wait
      loraplane train submit train.yaml        # local: trains on this machine
    """

    from loraplane.platform.training import train

    def submitted(outcome: Any) -> None:
        if output != "json":
            err.print(f"submitted {outcome.job}; waiting for it to finish", highlight=False)

    outcome = train(
        _settings(),
        config,
        overrides or [],
        release=release,
        wait=wait,
        timeout=timeout,
        on_submitted=submitted,
    )
    if output == "json" and outcome.backend == "kubernetes":
        out.print_json(json.dumps(outcome.to_dict()))
        return
    if outcome.registered is not None:  # local (its json: the entry), or a cluster run waited for
        _print_registration(outcome.registered, outcome.created, output)
        return
    out.print(f"submitted {outcome.job} (adapter {outcome.adapter}) in namespace {outcome.namespace}")
    out.print(
        f"follow it: loraplane --registry kubernetes -n {outcome.namespace} train logs {outcome.job} -f"
    )


def _training_progress(settings: Any, job: str) -> dict[str, float] | None:
    """The run's last ``train progress`` step (loss, learning rate) from its newest started pod's log;
    None when no pod started or the log cannot be read (the status stands without it)."""
    from loraplane.platform.training_k8s import training_logs
    from loraplane.trainer.metrics import last_progress

    try:
        return last_progress(training_logs(settings, job, wait_seconds=0))
    except LoraplaneError:
        return None


def _training_cost(
    settings: Any, job: str, state: str, manifest: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A succeeded run's cost (GPU-seconds, tokens trained, tokens/s) from the manifest it published:
    the registered version's, else the one in the run's result line; None for a run still going or
    failed, or when the log cannot be read (the status stands without it)."""
    from loraplane.trainer.cost import manifest_cost

    if state != "Succeeded":
        return None
    if manifest is None:
        from loraplane.platform.training_k8s import published_result

        try:
            manifest = published_result(settings, job).get("manifest")
        except LoraplaneError:
            return None
    return manifest_cost(manifest)


@train_app.command("status")
@handled
def train_status(
    job: str = typer.Argument(..., help="Job name printed by train submit."),
    register: bool = typer.Option(
        True, "--register/--no-register", help="Register the published adapter when the run succeeded."
    ),
    output: str = _output_option(),
) -> None:
    """Show a run: running, succeeded or failed (with the reason), and each pod's exit code. A
    succeeded run's adapter is registered (once; later calls say it already is).

    Example: loraplane --registry kubernetes -n ml train status train-support-bot-x7k2p
    """

    from rich.table import Table

    from loraplane.platform.training import training_run_status

    settings = _cluster_settings()
    run = training_run_status(settings, job, register=register)
    status, registered = run.status, run.registered_dict()
    manifest = run.registered.manifest if run.registered is not None else None
    if run.register_error is not None:
        err.print(f"[yellow]warning:[/] not registered: {_escape(run.register_error)}", highlight=False)
    progress = _training_progress(settings, job)
    cost = _training_cost(settings, job, status.state, manifest)
    if output == "json":
        payload = {**status.to_dict(), "registered": registered, "progress": progress, "cost": cost}
        out.print_json(json.dumps(payload))
        return
    why = f": {status.reason}: {status.message}" if status.reason else ""
    out.print(f"{status.job} ({status.adapter or '?'}): {status.state}{why}", highlight=False)
    if progress is not None:
        from loraplane.trainer.metrics import progress_summary

        out.print(f"training: {progress_summary(progress)}", highlight=False)
    if cost is not None:
        from loraplane.trainer.cost import cost_summary

        out.print(f"cost: {cost_summary(cost)}", highlight=False)
    table = Table()
    for col in ("pod", "phase", "node", "exit code", "meaning"):
        table.add_column(col)
    for pod in status.pods:
        code = "" if pod.exit_code is None else str(pod.exit_code)
        table.add_row(pod.name, pod.phase, pod.node or "", code, pod.meaning or "")
    out.print(table)
    if registered is not None and "error" not in registered:
        verb = "registered" if registered["new"] else "already registered"
        out.print(f"{verb} {registered['ref']} ({registered['path']})", highlight=False, soft_wrap=True)


@train_app.command("register")
@handled
def train_register(
    job: str = typer.Argument(..., help="Job name of a succeeded run."),
    output: str = _output_option(),
) -> None:
    """Register the adapter a succeeded run published (idempotent: a second call changes nothing).

    Example: loraplane --registry kubernetes -n ml train register train-support-bot-x7k2p
    """

    entry, created = _register_run(_cluster_settings(), job)
    _print_registration(entry, created, output)


@train_app.command("logs")
@handled
def train_logs(
    job: str = typer.Argument(..., help="Job name printed by train submit."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the trainer exits."),
) -> None:
    """Print the trainer's log of a run (its newest pod), through the Kubernetes API.

    Example: loraplane --registry kubernetes -n ml train logs train-support-bot-x7k2p -f
    """

    from loraplane.platform.training_k8s import training_logs

    for line in training_logs(_cluster_settings(), job, follow=follow):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@train_app.command("cancel")
@handled
def train_cancel(job: str = typer.Argument(..., help="Job name printed by train submit.")) -> None:
    """Delete a run's Job; its pod gets SIGTERM, saves a checkpoint and stops.

    Example: loraplane --registry kubernetes -n ml train cancel train-support-bot-x7k2p
    """

    from loraplane.platform.training_k8s import cancel_training

    cancel_training(_cluster_settings(), job)
    out.print(f"cancelled {job}")

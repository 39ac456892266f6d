"""``loraplane install|upgrade|uninstall|status``: the platform's Helm release."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
import typer.core

from loraplane.common.errors import LoraplaneError
from loraplane.platform.cli.app import (
    _duration_option,
    _escape,
    _output_option,
    _settings,
    app,
    err,
    handled,
    out,
)
from loraplane.platform.helm_release import GPU_OPERATOR_REPO, GPU_OPERATOR_VERSION


def _release_option() -> Any:
    return typer.Option("platform", "--release", help="Helm release name.")


def _print_release(verb: str, info: Any, output: str) -> None:
    if output == "json":
        out.print_json(json.dumps(info.to_dict()))
        return
    out.print(
        f"{verb} {info.name} ({info.chart}) in namespace {info.namespace}: revision {info.revision}, "
        f"{info.status}",
        highlight=False,
    )


def _deploy(
    *,
    upgrade: bool,
    values: list[Path] | None,
    sets: list[str] | None,
    release: str,
    chart: Path | None,
    wait: bool,
    timeout: float,
) -> Any:
    from loraplane.platform.helm_release import deploy, load_values
    from loraplane.platform.storage_check import wait_for_claim

    merged = load_values(values or [], sets or [])
    settings = _settings()
    _update_crds(settings, chart)
    try:
        info = deploy(
            settings, upgrade=upgrade, release=release, chart=chart, values=merged, wait=wait, timeout=timeout
        )
    except LoraplaneError as exc:
        # a wait that timed out: a claim that never bound is the usual reason, and helm does not say it
        report = _claim_problem(settings, release) if wait else None
        if report is None:
            raise
        raise LoraplaneError(f"{exc.message}\n{report}", hint=exc.hint) from None
    # the claim binds (or waits for its first pod) within seconds, or says why it never will
    try:
        storage = wait_for_claim(settings, release)
    except LoraplaneError as exc:
        err.print(f"warning: cannot check the shared volume's claim: {_escape(str(exc))}", highlight=False)
    else:
        if storage is not None and storage.problem:
            err.print(f"warning: {_escape(storage.problem)}", highlight=False)
    return info


def _update_crds(settings: Any, chart: Path | None) -> None:
    """Helm never updates a chart's CRDs after the first install: bring them to the chart's first."""
    from loraplane.platform.crds import apply_crds
    from loraplane.platform.helm_release import default_chart

    result = apply_crds(settings, chart or default_chart())
    for name in result.replaced:
        err.print(f"updated the CustomResourceDefinition {name} to the chart's", highlight=False)
    if result.refused:
        err.print(f"warning: {_escape(result.refused)}", highlight=False)


def _claim_problem(settings: Any, release: str) -> str | None:
    from loraplane.platform.storage_check import check_claim, release_claim

    try:
        claim = release_claim(settings, release)
        return check_claim(settings, claim).problem if claim else None
    except LoraplaneError:
        return None


GPU_MODES = ("none", "device-plugin", "operator")


def _gpu_mode_choice(value: str | None) -> str | None:
    if value is not None and value not in GPU_MODES:
        raise typer.BadParameter(f"{value!r}: use one of {', '.join(GPU_MODES)}")
    return value


def _gpu_mode_sets(gpu_mode: str | None, *, label: bool = True) -> list[str]:
    """--gpu-mode as chart values: the mode and the operator dependency's condition, which must agree.
    For the operator (whose driver and toolkit pods run in the release's namespace and need the
    host) the namespace is labelled to admit them first (``label``)."""
    if gpu_mode is None:
        return []
    if gpu_mode == "operator" and label:
        from loraplane.platform.helm_release import OPERATOR_IN_RELEASE_LABELS, label_privileged_namespace

        settings = _settings()
        label_privileged_namespace(settings, settings.namespace, OPERATOR_IN_RELEASE_LABELS)
    enable_operator = "true" if gpu_mode == "operator" else "false"
    return [f"gpu.mode={gpu_mode}", f"gpu-operator.enabled={enable_operator}"]


def _gpu_mode_option() -> Any:
    return typer.Option(
        None,
        "--gpu-mode",
        help="How GPUs become schedulable: none | device-plugin | operator (sets gpu.mode; operator also "
        "sets gpu-operator.enabled and labels the namespace Pod Security privileged). Default: the "
        "values' gpu.mode.",
        callback=_gpu_mode_choice,
    )


_VALUES_HELP = "Values file (YAML); repeat to layer several, later ones win."
_SET_HELP = "KEY=VALUE on the command line (e.g. serving.replicas=2); repeatable; applied after -f."
_WAIT_HELP = "Wait until every pod is Ready and every hook Job is done (up to --timeout)."


def _render_release(values: list[Path] | None, sets: list[str], release: str, chart: Path | None) -> None:
    """--dry-run: the manifests on stdout, for which Kubernetes version on stderr; nothing changes."""
    from loraplane.platform.helm_release import load_values, render

    rendered = render(_settings(), release=release, chart=chart, values=load_values(values or [], sets))
    err.print(
        f"rendered {release} for Kubernetes {rendered.kube_version} ({rendered.kube_version_from}); "
        "nothing was installed",
        highlight=False,
    )
    sys.stdout.write(rendered.manifests)


@app.command()
@handled
def install(
    values: list[Path] | None = typer.Option(None, "--values", "-f", help=_VALUES_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    release: str = _release_option(),
    chart: Path | None = typer.Option(None, help="Chart directory (default: the loraplane chart)."),
    wait: bool = typer.Option(False, "--wait", help=_WAIT_HELP),
    timeout: float = _duration_option("5m", "Longest wait for helm."),
    gpu_mode: str | None = _gpu_mode_option(),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the manifests the release would create (helm template, for the cluster's Kubernetes "
        "version when one answers, else the chart's minimum); change nothing.",
    ),
    gpu_operator: bool = typer.Option(
        False,
        "--gpu-operator",
        help="First install NVIDIA's GPU operator chart from its repository as a release of its own, in "
        "its own privileged namespace (the alternative to --gpu-mode operator).",
    ),
    gpu_operator_repo: str = typer.Option(GPU_OPERATOR_REPO, help="Chart repository of the GPU operator."),
    gpu_operator_version: str | None = typer.Option(
        GPU_OPERATOR_VERSION, help="GPU operator chart version ('' for the repository's latest)."
    ),
    gpu_operator_namespace: str = typer.Option(
        "gpu-operator", help="Namespace of the GPU operator (labelled Pod Security privileged)."
    ),
    output: str = _output_option(),
) -> None:
    """Install the platform's Helm release in the namespace (-n); refused if it is installed already.

    \b
    Examples:
      loraplane -n ml install -f my-values.yaml --set serving.replicas=2 --wait
      loraplane -n ml install --gpu-mode device-plugin --wait
      loraplane -n ml-gpu install --gpu-mode operator --wait
      loraplane -n ml install --dry-run -f my-values.yaml > manifests.yaml
    """
    if dry_run and gpu_operator:
        raise typer.BadParameter("--dry-run renders this chart only; --gpu-operator installs another release")

    from loraplane.platform.helm_release import GpuOperator, install_gpu_operator

    if dry_run:
        _render_release(values, [*_gpu_mode_sets(gpu_mode, label=False), *(sets or [])], release, chart)
        return
    mode_sets = _gpu_mode_sets(gpu_mode)
    operator_info = None
    if gpu_operator:
        operator = GpuOperator(
            repo=gpu_operator_repo,
            version=gpu_operator_version or None,
            namespace=gpu_operator_namespace,
        )
        operator_info = install_gpu_operator(_settings(), operator, wait=wait, timeout=timeout)
        if output != "json":
            _print_release("installed", operator_info, output)
    info = _deploy(
        upgrade=False,
        values=values,
        sets=[*mode_sets, *(sets or [])],
        release=release,
        chart=chart,
        wait=wait,
        timeout=timeout,
    )
    if output == "json":
        both = {"release": info.to_dict()}
        if operator_info is not None:
            both["gpu_operator"] = operator_info.to_dict()
        out.print_json(json.dumps(both))
        return
    _print_release("installed", info, output)
    out.print(f"next: loraplane -n {info.namespace} status", highlight=False)


@app.command()
@handled
def upgrade(
    values: list[Path] | None = typer.Option(None, "--values", "-f", help=_VALUES_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    release: str = _release_option(),
    chart: Path | None = typer.Option(None, help="Chart directory (default: the loraplane chart)."),
    wait: bool = typer.Option(False, "--wait", help=_WAIT_HELP),
    timeout: float = _duration_option("5m", "Longest wait for helm."),
    gpu_mode: str | None = _gpu_mode_option(),
    output: str = _output_option(),
) -> None:
    """Upgrade the installed release with new values or a new chart (values not given reset to the
    chart's defaults, as `helm upgrade` does: pass --gpu-mode again, or keep it in a values file).

    \b
    Example:
      loraplane -n ml upgrade -f my-values.yaml --set serving.maxLoras=8 --wait
    """

    info = _deploy(
        upgrade=True,
        values=values,
        sets=[*_gpu_mode_sets(gpu_mode), *(sets or [])],
        release=release,
        chart=chart,
        wait=wait,
        timeout=timeout,
    )
    _print_release("upgraded", info, output)


@app.command()
@handled
def uninstall(
    release: str = _release_option(),
    wait: bool = typer.Option(False, "--wait", help="Wait until the release's objects are gone."),
    timeout: float = _duration_option("5m", "Longest wait for helm."),
) -> None:
    """Remove the release. The data volume (models, datasets, adapters) and the registry's
    LoraAdapter objects are kept.

    \b
    Example:
      loraplane -n ml uninstall --wait
    """

    from loraplane.platform.helm_release import uninstall as helm_uninstall

    settings = _settings()
    helm_uninstall(settings, release, wait=wait, timeout=timeout)
    out.print(f"uninstalled {release} from namespace {settings.namespace}", highlight=False)


@app.command()
@handled
def status(
    release: str = _release_option(),
    output: str = _output_option(),
) -> None:
    """Show what runs in the namespace: the release, vLLM replicas ready/desired, the adapters vLLM
    has loaded (through a port-forward) and the registry's aliases.

    \b
    Example:
      loraplane -n ml status -o json
    """

    from rich.table import Table

    from loraplane.platform.cluster_status import cluster_status

    found = cluster_status(_settings(), release)
    if output == "json":
        out.print_json(json.dumps(found.to_dict()))
        return
    r = found.release
    if r is None:
        out.print(f"release {release}: not installed in namespace {found.namespace}", highlight=False)
    else:
        out.print(
            f"release {r.name}: {r.chart}, revision {r.revision}, {r.status} (updated {r.updated})",
            highlight=False,
        )
    for rep in found.vllm:
        out.print(f"vLLM {rep.deployment}: {rep.ready}/{rep.desired} ready", highlight=False)
    if found.gpu is not None:
        g = found.gpu
        out.print(
            f"GPUs ({g.mode}): {g.advertising}/{g.nodes} nodes offer {g.resource}"
            + (f", {g.gpu_labelled} GPU-labelled" if g.resource == "nvidia.com/gpu" else ""),
            highlight=False,
        )
        if g.warning:
            out.print(f"  warning: {_escape(g.warning)}", highlight=False)
    elif found.gpu_error:
        out.print(f"GPUs: unknown ({_escape(found.gpu_error)})", highlight=False)
    for fetch in found.model_fetch:
        out.print(f"model {fetch.model}: fetch {fetch.state} (job {fetch.job})", highlight=False)
        if fetch.message:
            out.print(f"  reason: {_escape(fetch.message)}", highlight=False)
    if found.storage is not None:
        st = found.storage
        out.print(f"volume {st.claim}: {st.phase} ({st.storage_class or 'no class'})", highlight=False)
        if st.problem:
            out.print(f"  problem: {_escape(st.problem)}", highlight=False)
    elif found.storage_error:
        out.print(f"volume: unknown ({_escape(found.storage_error)})", highlight=False)
    if found.loaded_error:
        out.print(f"loaded adapters: unknown ({_escape(found.loaded_error)})", highlight=False)
    else:
        out.print("loaded adapters: " + (", ".join(found.loaded_adapters) or "none"), highlight=False)
    table = Table(title="aliases")
    for col in ("adapter", "alias", "version"):
        table.add_column(col)
    for name, aliases in sorted(found.aliases.items()):
        for alias, version in sorted(aliases.items()):
            table.add_row(name, alias, version)
    if found.aliases_error:
        out.print(f"aliases: unknown ({_escape(found.aliases_error)})", highlight=False)
    else:
        out.print(table)

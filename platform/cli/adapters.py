"""``loraplane adapters ...``: register, load, evaluate, promote, roll back, retire, merge, export."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import typer
import typer.core

from loraplane.common.errors import ExitCode, InvalidInputError
from loraplane.platform.cli.app import (
    _escape,
    _output_option,
    _print_report,
    _progress_bar,
    _served_by,
    _served_settings,
    _settings,
    _state,
    adapters_app,
    err,
    handled,
    out,
)


@adapters_app.command("list")
@handled
def adapters_list(
    output: str = _output_option(),
) -> None:
    """List adapters, their versions, states, aliases and latest eval.

    \b
    Example:
      loraplane adapters list -o json
    """

    from rich.table import Table

    from loraplane.registry.backends import open_registry

    state = open_registry(_settings()).read()
    if output == "json":
        out.print_json(state.model_dump_json(exclude={"history"}))
        return
    table = Table()
    for col in ("adapter", "version", "served name", "state", "aliases", "latest eval"):
        table.add_column(col)
    for adapter in state.adapters.values():
        for v in adapter.versions.values():
            aliases = ", ".join(a for a, ver in adapter.aliases.items() if ver == v.version)
            ev = v.latest_eval()
            summary = ev.summary() if ev else ""
            table.add_row(adapter.name, v.version, v.served_name, v.state, aliases, summary)
    out.print(table)


@adapters_app.command("register")
@handled
def adapters_register(
    path: Path = typer.Argument(..., help="Adapter directory under the adapters root."),
    name: str | None = typer.Option(None, help="Adapter name (default: from manifest.json)."),
    version: str | None = typer.Option(None, help="Version, e.g. v3 (default: from manifest.json)."),
    allow_template_mismatch: bool = typer.Option(
        False,
        "--allow-template-mismatch",
        help="Register although the adapter was trained with another chat template than the server "
        "uses for the base model (needs --reason).",
    ),
    reason: str | None = typer.Option(None, help="Why the mismatch is allowed; recorded in the history."),
) -> None:
    """Check an adapter directory (safetensors, under the root, rank, chat template) and record it.

    The chat template recorded in the adapter's manifest must be the one the server uses for the
    base model (its --chat-template, else the base model's own): a mismatch is refused (exit 2).

    \b
    Example:
      loraplane adapters register ~/.loraplane/adapters/support-bot/v3
    """

    from loraplane.platform.adapters import register_adapter

    def warn(message: str) -> None:
        err.print(f"[yellow]warning:[/] {_escape(message)}", highlight=False)

    entry = register_adapter(
        _settings(),
        path,
        name=name,
        version=version,
        allow_template_mismatch=allow_template_mismatch,
        reason=reason,
        on_warning=warn,
    )
    out.print(f"registered {entry.served_name} ({entry.path})")


@adapters_app.command("load")
@handled
def adapters_load(ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS")) -> None:
    """Make the servers serve a registered version under its immutable served name. With the
    kubernetes registry and no --server-url: recorded in the registry, then every Ready vLLM pod
    that watches it must report it loaded (else by one port-forward per Ready pod).

    \b
    Example:
      loraplane adapters load support-bot@v3
    """

    from loraplane.platform.adapters import load_adapter

    with _served_settings(admin=True) as settings:
        entry = asyncio.run(load_adapter(settings, ref))
        out.print(f"{entry.served_name} is served by {_served_by(settings)}")


@adapters_app.command("eval")
@handled
def adapters_eval(
    ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS"),
    suite: Path | None = typer.Option(
        None, "--suite", "-s", help="Eval suite YAML (datasets, metrics, gate)."
    ),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="Or one eval JSONL with the default metrics and gate."
    ),
    report_dir: Path | None = typer.Option(None, help="Where report files go (default: HOME/reports)."),
    output: str = _output_option(),
) -> None:
    """Evaluate a version, the adapter's current prod and the base model side by side through the live
    server; write JSON, Markdown and PNG reports and store the verdict of the suite's gate. A version
    trained with tracking.mlflow gets its figures and report logged to that MLflow run as well.

    \b
    Example:
      loraplane adapters eval support-bot@v3 --suite evals/support.yaml
    """

    from loraplane.evals.report import SuiteReport
    from loraplane.platform.adapters import evaluate_adapter

    if (suite is None) == (dataset is None):
        raise InvalidInputError("give exactly one of --suite FILE or --dataset FILE")
    from loraplane.evals.suite import load_suite, suite_for_dataset

    source = load_suite(suite) if suite is not None else suite_for_dataset(dataset)  # type: ignore[arg-type]
    warnings: list[str] = []  # e.g. an MLflow server that refused the results: after the progress bar
    with _served_settings() as settings, _progress_bar("requests") as progress:
        record = asyncio.run(
            evaluate_adapter(
                settings,
                ref,
                source,
                report_dir=report_dir,
                on_progress=progress,
                on_warning=warnings.append,
            )
        )
    for message in warnings:
        err.print(f"[yellow]warning:[/] {_escape(message)}", highlight=False)
    if output == "json":
        out.print_json(record.model_dump_json())
        return
    assert record.report_path is not None
    report = SuiteReport.model_validate_json(Path(record.report_path).read_bytes())
    _print_report(report)
    stem = Path(record.report_path).with_suffix("")
    out.print(f"report: {stem}.md, {stem}.png, {stem}.json")


@adapters_app.command("promote")
@handled
def adapters_promote(
    ref: str = typer.Argument(
        ..., help="NAME@VERSION: the version to point the alias at (e.g. support-bot@v3)."
    ),
    alias: str = typer.Option("prod", help="Alias to point at this version."),
    force: bool = typer.Option(
        False, "--force", help="Override a failed or missing evaluation (needs --reason)."
    ),
    reason: str | None = typer.Option(None, help="Why; recorded in the history."),
) -> None:
    """Point NAME:ALIAS at a version (NAME@vN) that passed its evaluation and is loaded on the server.

    Refused (exit 2) when the alias already points at that version: a bare NAME means NAME:prod's own
    version, so 'promote NAME' would change nothing.

    \b
    Example:
      loraplane adapters promote support-bot@v3 --alias prod --reason "beats v2 on the support suite"
    """

    from loraplane.platform.adapters import promote_adapter

    with _served_settings(admin=True) as settings:
        entry, previous = asyncio.run(promote_adapter(settings, ref, alias=alias, force=force, reason=reason))
    was = f" (was {entry.name}@{previous})" if previous else ""
    out.print(f"{entry.name}:{alias} -> {entry.served_name}{was}")


@adapters_app.command("show")
@handled
def adapters_show(
    name: str = typer.Argument(..., help="Adapter name."),
    output: str = _output_option(),
) -> None:
    """Show one adapter: its versions, aliases and the history of every change.

    Example: loraplane adapters show support-bot -o json
    """

    from rich.table import Table

    from loraplane.registry.backends import open_registry
    from loraplane.trainer.cost import cost_summary, manifest_cost
    from loraplane.trainer.metrics import loss_curve

    state = open_registry(_settings()).read()
    adapter = state.adapter(name)
    history = [e for e in state.history if e.adapter == name]
    # The training curve published next to each version's weights (metrics.jsonl), where readable.
    curves = {v.version: loss_curve(v.path) for v in adapter.versions.values()}
    # What each version's training run cost (GPU-seconds, tokens, tokens/s), from its manifest.
    costs = {v.version: manifest_cost(v.manifest) for v in adapter.versions.values()}
    if output == "json":
        dumped = [e.model_dump(mode="json") for e in history]
        curves_json = {ver: curve.to_dict() for ver, curve in curves.items()}
        payload = {
            "adapter": adapter.model_dump(mode="json"),
            "history": dumped,
            "loss_curves": curves_json,
            "costs": costs,
        }
        out.print_json(json.dumps(payload))
        return
    versions = Table(title=f"{name}: versions")
    columns = ("version", "served name", "state", "aliases", "latest eval", "training loss", "cost")
    for col in (*columns, "path"):
        versions.add_column(col)
    for v in adapter.versions.values():
        aliases = ", ".join(a for a, ver in adapter.aliases.items() if ver == v.version)
        ev = v.latest_eval()
        versions.add_row(
            v.version,
            v.served_name,
            v.state,
            aliases,
            ev.summary() if ev else "",
            curves[v.version].summary(),
            cost_summary(costs[v.version]),
            v.path,
        )
    out.print(versions)
    events = Table(title=f"{name}: history")
    for col in ("at", "who", "action", "version", "alias", "previous", "reason"):
        events.add_column(col)
    for e in history:
        reason = (e.reason or "") + (" (forced)" if e.forced else "")
        events.add_row(e.at, e.who, e.action, e.version or "", e.alias or "", e.previous or "", reason)
    out.print(events)


@adapters_app.command("rollback")
@handled
def adapters_rollback(
    name: str = typer.Argument(..., help="Adapter name."),
    alias: str = typer.Option("prod", help="Alias to move back."),
    to: str | None = typer.Option(None, "--to", help="Version to roll back to (default: the previous one)."),
    reason: str | None = typer.Option(None, help="Why; recorded in the history."),
) -> None:
    """Point NAME:ALIAS back at the version it had before its last promotion.

    Example: loraplane adapters rollback support-bot --reason "v4 answers in French"
    """

    from loraplane.platform.adapters import rollback_alias

    with _served_settings(admin=True) as settings:
        entry, replaced = asyncio.run(rollback_alias(settings, name, alias=alias, to=to, reason=reason))
    out.print(f"{name}:{alias} -> {entry.served_name} (was {name}@{replaced})")


@adapters_app.command("unload")
@handled
def adapters_unload(ref: str = typer.Argument(..., help="NAME@VERSION")) -> None:
    """Stop serving a version (refused while an alias points at it, and for a retired version); it
    stays registered, and neither a restart nor sync serves it again until 'adapters load'.

    Example: loraplane adapters unload support-bot@v2
    """

    from loraplane.platform.adapters import unload_adapter

    with _served_settings(admin=True) as settings:
        entry = asyncio.run(unload_adapter(settings, ref))
        out.print(f"{entry.served_name} is no longer served by {_served_by(settings)}")


@adapters_app.command("canary")
@handled
def adapters_canary(
    name: str = typer.Argument(..., help="Adapter name."),
    percent: float | None = typer.Option(
        None, "--percent", help="Share of NAME / NAME:prod requests for the canary, 0 to 100."
    ),
    alias: str = typer.Option("canary", help="The alias whose version gets that share (not prod)."),
    clear: bool = typer.Option(False, "--clear", help="Remove it: the gateway's own rule applies again."),
) -> None:
    """Set the weighted canary of an adapter, live: the gateway sends --percent of the requests for
    NAME and NAME:prod to the version NAME:ALIAS points at, from its next registry read (no restart).
    It overrides the gateway's --canary / the chart's gateway.canary for this adapter.

    \b
    Example:
      loraplane adapters promote support-bot@v4 --alias canary
      loraplane adapters canary support-bot --percent 10
      loraplane adapters canary support-bot --percent 50      # widen it
      loraplane adapters promote support-bot@v4               # done: v4 is prod
      loraplane adapters canary support-bot --clear
    """

    from loraplane.platform.adapters import set_canary

    if (percent is None) == (not clear):
        raise InvalidInputError("give exactly one of --percent P or --clear")
    adapter = set_canary(_settings(), name, percent=None if clear else percent, alias=alias)
    if adapter.canary is None:
        out.print(f"{name}: no canary set in the registry")
    else:
        target = adapter.aliases.get(adapter.canary.alias)
        now = f"{name}@{target}" if target else f"nothing yet: {name}:{adapter.canary.alias} is not set"
        out.print(
            f"{name}: {adapter.canary.percent:g}% of {name}:prod -> {name}:{adapter.canary.alias} ({now})"
        )


@adapters_app.command("retire")
@handled
def adapters_retire(ref: str = typer.Argument(..., help="NAME@VERSION")) -> None:
    """Unload a version and mark it retired for good: retired is terminal, it can no longer be loaded,
    unloaded, evaluated, promoted or rolled back to (register the weights as a new version instead).

    Refused while an alias points at it. Example: loraplane adapters retire support-bot@v1
    """

    from loraplane.platform.adapters import retire_adapter

    with _served_settings(admin=True) as settings:
        entry, changed = asyncio.run(retire_adapter(settings, ref))
    out.print(f"{entry.ref} is retired" if changed else f"{entry.ref} was already retired: nothing changed")


@adapters_app.command("sync")
@handled
def adapters_sync(
    server_urls: list[str] | None = typer.Option(
        None, "--server-url", help="A vLLM replica; repeat for each (default: see below)."
    ),
    release: str = typer.Option("platform", help="Helm release whose vLLM pods to sync (Kubernetes)."),
    keep_unknown: bool = typer.Option(
        False, "--keep-unknown", help="Leave adapters the registry does not know loaded."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would change; change nothing."),
    output: str = _output_option(),
) -> None:
    """Make each vLLM replica serve exactly the registry's servable versions; report the changes.

    Replicas: every --server-url; else, with --registry kubernetes, the Ready vLLM pods of --release
    (inside the cluster by pod IP, from outside through one port-forward per pod); else
    LORAPLANE_SERVER_URLS (comma-separated) or the global --server-url. Exit 1 when a replica could
    not be synced completely.

    \b
    Example:
      loraplane --registry kubernetes -n ml adapters sync --dry-run
    """

    from loraplane.platform.adapters import sync_adapters
    from loraplane.serving.replicas import in_cluster

    settings, urls = _settings(), server_urls
    forward = (
        settings.registry == "kubernetes"
        and not urls
        and _state.server_url is None
        and not in_cluster(settings)
    )
    with contextlib.ExitStack() as stack:
        if forward:  # outside the cluster pod IPs are unreachable: one port-forward per Ready pod
            from loraplane.platform.portforward import vllm_admin

            settings = stack.enter_context(vllm_admin(settings, release=release))
            urls = list(settings.server_urls)
        report = asyncio.run(
            sync_adapters(settings, urls, release=release, prune_unknown=not keep_unknown, dry_run=dry_run)
        )
    if output == "json":
        out.print_json(json.dumps(report.to_json()))
    else:
        for r in report.replicas:
            verdict = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
            out.print(f"{_escape(r.url)}: {verdict}" + (f" ({_escape(r.error)})" if r.error else ""))
            for label, names in (("loaded", r.loaded), ("unloaded", r.unloaded)):
                for n in names:
                    out.print(f"  {label} {_escape(n)}")
            out.print(f"  unchanged: {len(r.unchanged)}")
            for kind, problems in (("skipped", r.skipped), ("failed", r.failed)):
                for n, why in problems.items():
                    out.print(f"  [red]{kind}[/] {_escape(n)}: {_escape(why)}")
    if not report.ok:
        raise typer.Exit(ExitCode.FAILED)


@adapters_app.command("merge")
@handled
def adapters_merge(
    source: str = typer.Argument(..., help="Adapter directory, or NAME@VERSION / NAME:ALIAS."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (must not exist)."),
    base_model: str | None = typer.Option(
        None, help="Base model directory or hub id (default: from the adapter's manifest.json)."
    ),
    dtype: str = typer.Option("auto", help="auto (the base checkpoint's), float32, bfloat16 or float16."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the base model's own code to run."
    ),
) -> None:
    """Merge an adapter into its base model and write a full safetensors model directory
    (config, weights, tokenizer, loraplane-merge.json) to serve without LoRA or export.

    \b
    Example:
      loraplane adapters merge support-bot@v3 --out ./support-bot-v3-merged
    """

    from loraplane.platform.adapters import merge_to_directory

    status = err.status(f"merging {source}") if err.is_terminal else contextlib.nullcontext()
    with status:
        merged = merge_to_directory(
            _settings(),
            source,
            out_dir,
            base_model=base_model,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    size = merged.weights_bytes / 2**20
    out.print(str(merged.path), highlight=False, soft_wrap=True)
    out.print(
        _escape(
            f"merged {source} into {merged.base_model}: {merged.dtype}, "
            f"{len(merged.weights_sha256)} weight file(s), {size:.1f} MiB, {merged.seconds:.1f}s"
        ),
        highlight=False,
    )


@adapters_app.command("export")
@handled
def adapters_export(
    source: str = typer.Argument(..., help="NAME@VERSION / NAME:ALIAS, or an adapter directory."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (must not exist)."),
    export_format: str = typer.Option("ollama", "--format", help="Export format: ollama."),
    base: str | None = typer.Option(
        None,
        "--base",
        help="The Modelfile's FROM: a base model directory or an Ollama model name (default: the base "
        "model directory in the adapter's manifest). With --merged: the model to merge into.",
    ),
    merged: bool = typer.Option(
        False, "--merged", help="Export the adapter merged into its base model (FROM ./model)."
    ),
    template: Path | None = typer.Option(
        None, "--template", help="An Ollama Go template to use instead of the translated chat template."
    ),
    stop: list[str] | None = typer.Option(None, "--stop", help="Another stop sequence (repeatable)."),
    dtype: str = typer.Option("auto", help="--merged: auto, float32, bfloat16 or float16."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="--merged: allow the base model's own code to run."
    ),
    output: str = _output_option(),
) -> None:
    """Export an adapter for Ollama: a Modelfile (FROM the base, ADAPTER, the chat template as
    Ollama's TEMPLATE, its stop markers) and the adapter's safetensors files, or with --merged the
    merged model. Refused (exit 2) when Ollama cannot take the adapter (base architecture, DoRA) or
    the chat template's family is not one it can be translated from.

    \b
    Examples:
      loraplane adapters export support-bot@v3 --format ollama --out ./support-bot-ollama
      ollama create support-bot -f ./support-bot-ollama/Modelfile
      loraplane adapters export support-bot@v3 --format ollama --merged --out ./support-bot-merged
    """

    from loraplane.platform.export_ollama import FORMATS, export_ollama

    if export_format not in FORMATS:
        raise InvalidInputError(f"--format {export_format!r}: use {' or '.join(FORMATS)}")
    busy = err.status(f"exporting {source}") if err.is_terminal and merged else contextlib.nullcontext()
    with busy:
        result = export_ollama(
            _settings(),
            source,
            out_dir,
            base=base,
            merged=merged,
            template_file=template,
            stops=stop,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    if output == "json":
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(str(result.modelfile), highlight=False, soft_wrap=True)
    out.print(
        _escape(
            f"{result.mode} export of {source}: FROM {result.base}, {result.family} chat template, "
            f"stop {', '.join(result.stops) or '(none)'}, {result.seconds:.1f}s"
        ),
        highlight=False,
        soft_wrap=True,
    )
    for note in result.notes:
        err.print(f"[yellow]note:[/] {_escape(note)}", highlight=False)
    out.print(f"next: ollama create NAME -f {result.modelfile}", highlight=False, soft_wrap=True)

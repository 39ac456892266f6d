"""The ``loraplane`` command: a thin layer over :mod:`loraplane.platform.adapters` and friends.

Heavy libraries (torch, transformers, trl, vLLM) are imported only inside the commands that need
them, so ``loraplane --help`` is instant.

Exit codes: 0 success; 1 failure (server down, training failed); 2 bad input (config, dataset,
adapter, unknown name); 3 refused (promotion gate, changed weights); 4 conflict (another command moved
the alias meanwhile: nothing changed, re-run); 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
import typer.core
from rich.console import Console, ConsoleDimensions

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.platform.helm_release import GPU_OPERATOR_REPO, GPU_OPERATOR_VERSION

T = TypeVar("T")


def _flag_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """A flag (``--force``, ``-v``) takes no value: show no value type for it in ``--help``.

    Typer 0.29's rich help labels every option with its Python type, flags included (``<bool>``),
    which reads as if ``--force`` wanted a value; its plain help already leaves flags bare.
    """
    if self.is_flag or self.count:
        return None
    return _typed_display(self, ctx)


_typed_display = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

app = typer.Typer(
    help="Fine-tune LLMs with LoRA and serve the adapters with vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
adapters_app = typer.Typer(
    help="Register, load, evaluate, promote, roll back, retire and merge adapter versions.",
    no_args_is_help=True,
)
demo_app = typer.Typer(help="The offline demo base model and data.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
evals_app = typer.Typer(
    help="Run eval suites against any OpenAI-compatible endpoint; check suite files.", no_args_is_help=True
)
app.add_typer(demo_app, name="demo")
app.add_typer(evals_app, name="evals")
data_app = typer.Typer(
    help="Training data: check it without training, push it onto the cluster's volume.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Base models: fetch them from the hub or object storage.", no_args_is_help=True)
app.add_typer(models_app, name="models")
train_app = typer.Typer(
    help="Training runs: a Job per run on the cluster (from the chart's template), or a local trainer "
    "process with the local registry.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")
volume_app = typer.Typer(
    help="The release's shared volume (models, datasets, adapters), through the Kubernetes API.",
    no_args_is_help=True,
)
app.add_typer(volume_app, name="volume")
pipeline_app = typer.Typer(
    help="Pipelines for a scheduler: train -> evaluate -> promote if the gate passes (Argo, Kubeflow).",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")


class _Console(Console):
    """Rich's console, except that output that is not a terminal (a pipe, a file, a test's capture)
    is not cut or wrapped at 80 columns: tables and lines keep their full width. ``COLUMNS``, when
    set, still sets the width."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and "COLUMNS" not in os.environ:
            return ConsoleDimensions(_UNCUT, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


_UNCUT = 1_000_000  # a table is as wide as its content; nothing pads a line to this
out = _Console()
err = _Console(stderr=True)


class _State:
    home: Path | None = None
    adapters_root: Path | None = None
    server_url: str | None = None
    registry: str | None = None
    namespace: str | None = None
    kubeconfig: Path | None = None
    context: str | None = None
    debug: bool = False


_state = _State()


def _print_version(value: bool) -> None:
    if value:
        from loraplane import __version__

        out.print(f"loraplane {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global(
    home: Path | None = typer.Option(
        None, envvar="LORAPLANE_HOME", help="State directory (default: ~/.loraplane)."
    ),
    adapters_root: Path | None = typer.Option(
        None, envvar="LORAPLANE_ADAPTERS_ROOT", help="Adapters root (default: HOME/adapters)."
    ),
    server_url: str | None = typer.Option(
        None, envvar="LORAPLANE_SERVER_URL", help="vLLM server (default: http://127.0.0.1:8000)."
    ),
    registry: str | None = typer.Option(
        None,
        envvar="LORAPLANE_REGISTRY",
        help="Registry backend: local (HOME/registry.json) or kubernetes (LoraAdapter objects).",
    ),
    namespace: str | None = typer.Option(
        None,
        "--namespace",
        "-n",
        envvar="LORAPLANE_NAMESPACE",
        help="Kubernetes namespace (default: default).",
    ),
    kubeconfig: Path | None = typer.Option(
        None, envvar="KUBECONFIG", help="Kubeconfig file (default: ~/.kube/config)."
    ),
    context: str | None = typer.Option(None, "--context", help="Kubeconfig context (default: current)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logs on stderr."),
    debug: bool = typer.Option(
        False, "--debug", envvar="LORAPLANE_DEBUG", help="Show the traceback of an unexpected error."
    ),
    version: bool = typer.Option(
        False, "--version", help="Print loraplane's version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    from loraplane.common.logs import configure_logging

    configure_logging(verbose)
    _state.home, _state.adapters_root, _state.server_url = home, adapters_root, server_url
    _state.registry, _state.namespace = registry, namespace
    _state.kubeconfig, _state.context = kubeconfig, context
    _state.debug = debug


def _output_choice(value: str) -> str:
    """``--output``: the command's human form (table or text) or json; anything else is a usage error."""
    if value not in ("table", "text", "json"):
        raise typer.BadParameter(f"{value!r}: use table (or text) or json")
    return value


def _settings() -> Any:
    from loraplane.platform.settings import Settings

    kwargs: dict[str, Any] = {"adapters_root": _state.adapters_root}
    if _state.home is not None:
        kwargs["home"] = _state.home
    if _state.server_url is not None:
        kwargs["server_url"] = _state.server_url
    if _state.registry is not None:
        if _state.registry not in ("local", "kubernetes"):
            raise InvalidInputError(f"--registry: got {_state.registry!r}; use 'local' or 'kubernetes'")
        kwargs["registry"] = _state.registry
    if _state.namespace is not None:
        kwargs["namespace"] = _state.namespace
    kwargs["kubeconfig"], kwargs["kube_context"] = _state.kubeconfig, _state.context
    return Settings(**kwargs)


@contextlib.contextmanager
def _served_settings(admin: bool = False) -> Iterator[Any]:
    """The settings; with the kubernetes registry and no --server-url, ``server_urls`` are
    port-forwards (through the Kubernetes API) to every Ready vLLM pod of the namespace, and the API
    key (unless LORAPLANE_API_KEY is set) the one the pods use, from their Secret. ``admin`` (a
    command that only changes what is served): no port-forward when the vLLM pods watch the registry
    themselves (``platform/convergence.py``): the command writes the registry and waits for them."""
    settings = _settings()
    if settings.registry != "kubernetes" or _state.server_url is not None:
        yield settings
        return
    if admin:
        from loraplane.platform.convergence import reconciling_replicas

        if reconciling_replicas(settings) is not None:
            yield settings
            return
    from loraplane.platform.portforward import vllm_admin

    with vllm_admin(settings) as forwarded:
        yield forwarded


def _served_by(settings: Any) -> str:
    """Which servers a command reached: the Ready vLLM pods that watch the registry, else URLs."""
    if _state.server_url is None and not settings.server_urls:
        from loraplane.platform.convergence import reconciling_replicas

        replicas = reconciling_replicas(settings)
        if replicas is not None:
            return f"{len(replicas.ready)} Ready vLLM pod(s): {', '.join(replicas.ready) or 'none'}"
    return ", ".join(settings.server_urls or [settings.server_url])


def _run(fn: Callable[[], T]) -> T:
    """Run a command body; a LoraplaneError becomes a clear message and its exit code, and anything
    else a one-line error (exit 1): a traceback only with --debug."""
    try:
        return fn()
    except LoraplaneError as exc:
        err.print("[red]error:[/] " + _escape(str(exc)), highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise  # a command's own exit code (e.g. evals run --check: 3)
    except ModuleNotFoundError as exc:
        from loraplane.common.extras import missing_extra

        needed = missing_extra(exc)
        if needed is None or _state.debug:
            raise
        err.print("[red]error:[/] " + _escape(str(needed)), highlight=False)
        raise typer.Exit(needed.exit_code) from None
    except Exception as exc:
        if _state.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(
            f"[red]error:[/] unexpected {type(exc).__name__}: {_escape(first)}\n"
            "  hint: run again with --debug for the traceback, and report it if it is a loraplane bug",
            highlight=False,
        )
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr when it is a terminal; otherwise nothing (logs stay quiet)."""
    if not err.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _print_report(report: Any) -> None:
    """One table per dataset (value and CI per model, difference to each baseline), then the gate."""
    from rich.table import Table

    from loraplane.evals.metrics import FIGURES

    roles = report.roles()
    for d in report.datasets:
        table = Table(title=f"{report.suite} / {d.name}: {d.n} examples via {report.endpoint}")
        present = [r for r in roles if r in d.runs]
        others = [r for r in present if r != "candidate"]
        table.add_column("metric")
        for role in present:
            table.add_column(f"{role}\n{report.models[role]}", justify="right")
        for role in others:
            table.add_column(f"Δ vs {role}", justify="right")
        for figure in d.figures:
            info = FIGURES[figure]
            row = [f"{figure} {'↑' if info.higher_is_better else '↓'}"]
            for role in present:
                e = d.runs[role].metrics.get(figure)
                text = "n/a" if e is None or e.value is None else f"{e.value:.3f}"
                if e is not None and e.ci_low is not None and e.ci_high is not None:
                    text += f" [{e.ci_low:.2f}, {e.ci_high:.2f}]"
                row.append(text)
            for role in others:
                c = next((c for c in d.comparisons if c.metric == figure and c.baseline == role), None)
                if c is None or c.delta.value is None:
                    row.append("n/a")
                    continue
                color = {"better": "green", "worse": "red"}.get(c.verdict, "white")
                verdict = "" if c.verdict == "n/a" else f" [{color}]{c.verdict}[/]"
                row.append(f"{c.delta.value:+.3f}{verdict}")
            table.add_row(*row)
        out.print(table)
        failed = {r: d.runs[r].failures for r in present if d.runs[r].failures}
        if failed:
            out.print("failed requests: " + ", ".join(f"{r} {n}/{d.n}" for r, n in failed.items()))
    if report.gate is not None:
        verdict = "[green]PASS[/]" if report.gate.passed else "[red]FAIL[/]"
        out.print(f"gate: {verdict}")
        for c in report.gate.checks:
            mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[dim]skip[/]"}[c.passed]
            out.print(f"  {mark} {c.rule}: {_escape(c.message)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --- adapters -----------------------------------------------------------------------------------


@adapters_app.command("list")
def adapters_list(
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """List adapters, their versions, states, aliases and latest eval.

    \b
    Example:
      loraplane adapters list -o json
    """

    def body() -> None:
        from rich.table import Table

        from loraplane.platform.registry import open_registry

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

    _run(body)


@adapters_app.command("register")
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

    def body() -> None:
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

    _run(body)


@adapters_app.command("load")
def adapters_load(ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS")) -> None:
    """Make the servers serve a registered version under its immutable served name. With the
    kubernetes registry and no --server-url: recorded in the registry, then every Ready vLLM pod
    that watches it must report it loaded (else by one port-forward per Ready pod).

    \b
    Example:
      loraplane adapters load support-bot@v3
    """

    def body() -> None:
        from loraplane.platform.adapters import load_adapter

        with _served_settings(admin=True) as settings:
            entry = asyncio.run(load_adapter(settings, ref))
            out.print(f"{entry.served_name} is served by {_served_by(settings)}")

    _run(body)


@adapters_app.command("eval")
def adapters_eval(
    ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS"),
    suite: Path | None = typer.Option(
        None, "--suite", "-s", help="Eval suite YAML (datasets, metrics, gate)."
    ),
    dataset: Path | None = typer.Option(
        None, "--dataset", "-d", help="Or one eval JSONL with the default metrics and gate."
    ),
    report_dir: Path | None = typer.Option(None, help="Where report files go (default: HOME/reports)."),
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """Evaluate a version, the adapter's current prod and the base model side by side through the live
    server; write JSON, Markdown and PNG reports and store the verdict of the suite's gate.

    \b
    Example:
      loraplane adapters eval support-bot@v3 --suite evals/support.yaml
    """

    def body() -> None:
        from loraplane.evals.report import SuiteReport
        from loraplane.platform.adapters import evaluate_adapter

        if (suite is None) == (dataset is None):
            raise InvalidInputError("give exactly one of --suite FILE or --dataset FILE")
        from loraplane.evals.suite import load_suite, suite_for_dataset

        source = load_suite(suite) if suite is not None else suite_for_dataset(dataset)  # type: ignore[arg-type]
        with _served_settings() as settings, _progress_bar("requests") as progress:
            record = asyncio.run(
                evaluate_adapter(settings, ref, source, report_dir=report_dir, on_progress=progress)
            )
        if output == "json":
            out.print_json(record.model_dump_json())
            return
        assert record.report_path is not None
        report = SuiteReport.model_validate_json(Path(record.report_path).read_bytes())
        _print_report(report)
        stem = Path(record.report_path).with_suffix("")
        out.print(f"report: {stem}.md, {stem}.png, {stem}.json")

    _run(body)


@adapters_app.command("promote")
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

    def body() -> None:
        from loraplane.platform.adapters import promote_adapter

        with _served_settings(admin=True) as settings:
            entry, previous = asyncio.run(
                promote_adapter(settings, ref, alias=alias, force=force, reason=reason)
            )
        was = f" (was {entry.name}@{previous})" if previous else ""
        out.print(f"{entry.name}:{alias} -> {entry.served_name}{was}")

    _run(body)


@adapters_app.command("show")
def adapters_show(
    name: str = typer.Argument(..., help="Adapter name."),
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """Show one adapter: its versions, aliases and the history of every change.

    Example: loraplane adapters show support-bot -o json
    """

    def body() -> None:
        from rich.table import Table

        from loraplane.platform.registry import open_registry
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

    _run(body)


@adapters_app.command("rollback")
def adapters_rollback(
    name: str = typer.Argument(..., help="Adapter name."),
    alias: str = typer.Option("prod", help="Alias to move back."),
    to: str | None = typer.Option(None, "--to", help="Version to roll back to (default: the previous one)."),
    reason: str | None = typer.Option(None, help="Why; recorded in the history."),
) -> None:
    """Point NAME:ALIAS back at the version it had before its last promotion.

    Example: loraplane adapters rollback support-bot --reason "v4 answers in French"
    """

    def body() -> None:
        from loraplane.platform.adapters import rollback_alias

        with _served_settings(admin=True) as settings:
            entry, replaced = asyncio.run(rollback_alias(settings, name, alias=alias, to=to, reason=reason))
        out.print(f"{name}:{alias} -> {entry.served_name} (was {name}@{replaced})")

    _run(body)


@adapters_app.command("unload")
def adapters_unload(ref: str = typer.Argument(..., help="NAME@VERSION")) -> None:
    """Stop serving a version (refused while an alias points at it, and for a retired version); it
    stays registered, and neither a restart nor sync serves it again until 'adapters load'.

    Example: loraplane adapters unload support-bot@v2
    """

    def body() -> None:
        from loraplane.platform.adapters import unload_adapter

        with _served_settings(admin=True) as settings:
            entry = asyncio.run(unload_adapter(settings, ref))
            out.print(f"{entry.served_name} is no longer served by {_served_by(settings)}")

    _run(body)


@adapters_app.command("canary")
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

    def body() -> None:
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

    _run(body)


@adapters_app.command("retire")
def adapters_retire(ref: str = typer.Argument(..., help="NAME@VERSION")) -> None:
    """Unload a version and mark it retired for good: retired is terminal, it can no longer be loaded,
    unloaded, evaluated, promoted or rolled back to (register the weights as a new version instead).

    Refused while an alias points at it. Example: loraplane adapters retire support-bot@v1
    """

    def body() -> None:
        from loraplane.platform.adapters import retire_adapter

        with _served_settings(admin=True) as settings:
            entry, changed = asyncio.run(retire_adapter(settings, ref))
        out.print(
            f"{entry.ref} is retired" if changed else f"{entry.ref} was already retired: nothing changed"
        )

    _run(body)


@adapters_app.command("sync")
def adapters_sync(
    server_urls: list[str] | None = typer.Option(
        None, "--server-url", help="A vLLM replica; repeat for each (default: see below)."
    ),
    release: str = typer.Option("platform", help="Helm release whose vLLM pods to sync (Kubernetes)."),
    keep_unknown: bool = typer.Option(
        False, "--keep-unknown", help="Leave adapters the registry does not know loaded."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would change; change nothing."),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
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

    def body() -> None:
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
                sync_adapters(
                    settings, urls, release=release, prune_unknown=not keep_unknown, dry_run=dry_run
                )
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
            raise typer.Exit(1)

    _run(body)


@adapters_app.command("merge")
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

    def body() -> None:
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

    _run(body)


@adapters_app.command("export")
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
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
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

    def body() -> None:
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

    _run(body)


# --- evals ----------------------------------------------------------------------------------------


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
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """Run a suite against an endpoint (vLLM, the gateway, or another provider); nothing is registered.

    \b
    Example:
      loraplane evals run suite.yaml -e http://127.0.0.1:8000/v1 -m support-bot@v3 --base my-base
    """

    def body() -> None:
        import os
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
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
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


# --- train ----------------------------------------------------------------------------------------


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
def train_submit(
    config: Path = typer.Argument(..., help="Training config (YAML); on a cluster, paths are on its volume."),
    overrides: list[str] | None = typer.Argument(None, help="section.key=value overrides."),
    release: str = typer.Option("platform", help="Helm release whose training template to use."),
    wait: bool = typer.Option(
        False, "--wait", help="Cluster: wait for the Job to finish, then register what it published."
    ),
    timeout: float = typer.Option(24 * 3600, help="Longest --wait in seconds."),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
) -> None:
    """Train an adapter. With the kubernetes registry: validate the config and start a Job from the
    release's template (--wait: until it ends, then register the adapter). With the local registry:
    run the trainer here, show its progress, and register the adapter it publishes.

    \b
    Examples:
      loraplane --registry kubernetes -n ml train submit train.yaml training.epochs=3 --wait
      loraplane train submit train.yaml        # local: trains on this machine
    """

    def body() -> None:
        settings = _settings()
        if settings.registry != "kubernetes":
            from loraplane.platform.training_local import train_locally

            local = train_locally(settings, config, overrides or [])
            _print_registration(local.adapter, local.registered, output)
            return
        from loraplane.platform.training_k8s import submit_training, wait_for_training

        run = submit_training(settings, config, overrides or [], release=release)
        result: dict[str, Any] = {"job": run.job, "namespace": run.namespace, "adapter": run.adapter}
        if not wait:
            if output == "json":
                out.print_json(json.dumps(result))
                return
            out.print(f"submitted {run.job} (adapter {run.adapter}) in namespace {run.namespace}")
            follow_cmd = f"loraplane --registry kubernetes -n {run.namespace} train logs {run.job} -f"
            out.print(f"follow it: {follow_cmd}")
            return
        if output != "json":
            err.print(f"submitted {run.job}; waiting for it to finish", highlight=False)
        final = wait_for_training(settings, run.job, timeout=timeout)
        result["state"] = final.state
        if final.state != "Succeeded":
            raise LoraplaneError(
                f"training Job {run.job} failed: {final.reason}: {final.message}",
                hint=f"see its log: loraplane --registry kubernetes -n {run.namespace} train logs {run.job}",
            )
        entry, created = _register_run(settings, run.job)
        result["registered"] = {"ref": entry.ref, "path": entry.path, "new": created}
        if output == "json":
            out.print_json(json.dumps(result))
            return
        out.print(_registered_line(entry, created), highlight=False, soft_wrap=True)

    _run(body)


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
def train_status(
    job: str = typer.Argument(..., help="Job name printed by train submit."),
    register: bool = typer.Option(
        True, "--register/--no-register", help="Register the published adapter when the run succeeded."
    ),
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """Show a run: running, succeeded or failed (with the reason), and each pod's exit code. A
    succeeded run's adapter is registered (once; later calls say it already is).

    Example: loraplane --registry kubernetes -n ml train status train-support-bot-x7k2p
    """

    def body() -> None:
        from rich.table import Table

        from loraplane.platform.training_k8s import training_status

        settings = _cluster_settings()
        status = training_status(settings, job)
        registered: dict[str, Any] | None = None
        manifest: dict[str, Any] | None = None
        if register and status.state == "Succeeded":
            try:
                entry, created = _register_run(settings, job)
                registered = {"ref": entry.ref, "path": entry.path, "new": created}
                manifest = entry.manifest
            except LoraplaneError as exc:  # the status stands; registering is retried by the next call
                registered = {"error": str(exc)}
                err.print(f"[yellow]warning:[/] not registered: {_escape(str(exc))}", highlight=False)
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

    _run(body)


@train_app.command("register")
def train_register(
    job: str = typer.Argument(..., help="Job name of a succeeded run."),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
) -> None:
    """Register the adapter a succeeded run published (idempotent: a second call changes nothing).

    Example: loraplane --registry kubernetes -n ml train register train-support-bot-x7k2p
    """

    def body() -> None:
        entry, created = _register_run(_cluster_settings(), job)
        _print_registration(entry, created, output)

    _run(body)


@train_app.command("logs")
def train_logs(
    job: str = typer.Argument(..., help="Job name printed by train submit."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the trainer exits."),
) -> None:
    """Print the trainer's log of a run (its newest pod), through the Kubernetes API.

    Example: loraplane --registry kubernetes -n ml train logs train-support-bot-x7k2p -f
    """

    def body() -> None:
        import sys

        from loraplane.platform.training_k8s import training_logs

        for line in training_logs(_cluster_settings(), job, follow=follow):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    _run(body)


@train_app.command("cancel")
def train_cancel(job: str = typer.Argument(..., help="Job name printed by train submit.")) -> None:
    """Delete a run's Job; its pod gets SIGTERM, saves a checkpoint and stops.

    Example: loraplane --registry kubernetes -n ml train cancel train-support-bot-x7k2p
    """

    def body() -> None:
        from loraplane.platform.training_k8s import cancel_training

        cancel_training(_cluster_settings(), job)
        out.print(f"cancelled {job}")

    _run(body)


# --- the platform's Helm release --------------------------------------------------------------------


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
    timeout: str,
) -> Any:
    from loraplane.common.errors import LoraplaneError
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
    from loraplane.common.errors import LoraplaneError
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
def install(
    values: list[Path] | None = typer.Option(None, "--values", "-f", help=_VALUES_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    release: str = _release_option(),
    chart: Path | None = typer.Option(None, help="Chart directory (default: the loraplane chart)."),
    wait: bool = typer.Option(False, "--wait", help=_WAIT_HELP),
    timeout: str = typer.Option("5m", help="Longest wait for helm (Go duration: 90s, 10m)."),
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
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
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

    def body() -> None:
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

    _run(body)


@app.command()
def upgrade(
    values: list[Path] | None = typer.Option(None, "--values", "-f", help=_VALUES_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    release: str = _release_option(),
    chart: Path | None = typer.Option(None, help="Chart directory (default: the loraplane chart)."),
    wait: bool = typer.Option(False, "--wait", help=_WAIT_HELP),
    timeout: str = typer.Option("5m", help="Longest wait for helm (Go duration: 90s, 10m)."),
    gpu_mode: str | None = _gpu_mode_option(),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
) -> None:
    """Upgrade the installed release with new values or a new chart (values not given reset to the
    chart's defaults, as `helm upgrade` does: pass --gpu-mode again, or keep it in a values file).

    \b
    Example:
      loraplane -n ml upgrade -f my-values.yaml --set serving.maxLoras=8 --wait
    """

    def body() -> None:
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

    _run(body)


@app.command()
def uninstall(
    release: str = _release_option(),
    wait: bool = typer.Option(False, "--wait", help="Wait until the release's objects are gone."),
    timeout: str = typer.Option("5m", help="Longest wait for helm (Go duration)."),
) -> None:
    """Remove the release. The data volume (models, datasets, adapters) and the registry's
    LoraAdapter objects are kept.

    \b
    Example:
      loraplane -n ml uninstall --wait
    """

    def body() -> None:
        from loraplane.platform.helm_release import uninstall as helm_uninstall

        settings = _settings()
        helm_uninstall(settings, release, wait=wait, timeout=timeout)
        out.print(f"uninstalled {release} from namespace {settings.namespace}", highlight=False)

    _run(body)


@app.command()
def status(
    release: str = _release_option(),
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """Show what runs in the namespace: the release, vLLM replicas ready/desired, the adapters vLLM
    has loaded (through a port-forward) and the registry's aliases.

    \b
    Example:
      loraplane -n ml status -o json
    """

    def body() -> None:
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

    _run(body)


# --- data -----------------------------------------------------------------------------------------


@data_app.command("validate")
def data_validate(
    file: Path | None = typer.Argument(None, help="Training data: JSONL (one example per line) or Parquet."),
    base_model: str = typer.Option(
        ..., "--base-model", "-m", help="Base model directory or hub id: its tokenizer and chat template."
    ),
    hub: str | None = typer.Option(None, help="Instead of FILE: a `datasets` hub id or local directory."),
    split: str | None = typer.Option(None, help="Split of --hub (default: train)."),
    eval_file: Path | None = typer.Option(None, help="Held-out file in the same format."),
    eval_split: str | None = typer.Option(None, help="Held-out split of --hub."),
    eval_fraction: float | None = typer.Option(None, help="Or hold out this share of the rows (seeded)."),
    chat_template: Path | None = typer.Option(
        None, help="Jinja chat template file (for a base model without one, or to replace its own)."
    ),
    revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the base model's own tokenizer code."
    ),
    max_seq_length: int | None = typer.Option(None, help="Longest row in tokens (default: 1024)."),
    data_format: str | None = typer.Option(
        None,
        "--format",
        help="auto (default), chat, prompt_completion or alpaca; with --method dpo: auto, preference "
        "(prompt/chosen/rejected) or openai_preference.",
    ),
    method: str | None = typer.Option(
        None,
        "--method",
        help="sft (conversations) or dpo (preference pairs), as the run's `method`; default: dpo for a "
        "preference --format, else sft.",
    ),
    min_examples: int | None = typer.Option(None, help="Fewest usable training rows (default: 10)."),
    max_overlength_share: float | None = typer.Option(
        None, help="Share of over-length rows that may be dropped (default: 0)."
    ),
    all_tokens: bool = typer.Option(
        False, "--all-tokens", help="Train on every token, not only the assistant's replies."
    ),
    seed: int | None = typer.Option(None, help="Seed of the --eval-fraction hold-out (default: 0)."),
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
) -> None:
    """Run the trainer's data checks on a dataset without training: a report of every problem by class
    with line numbers, token lengths and tokens per epoch. Exits 2 when the data is not usable; writes
    nothing.

    \b
    Example:
      loraplane data validate train.jsonl -m ./base-model --max-seq-length 2048
    """

    def body() -> None:
        import json
        import sys

        from pydantic import BaseModel, ValidationError

        from loraplane.common.errors import format_validation_error
        from loraplane.common.jsonl import DatasetError
        from loraplane.trainer.config import BaseModelSpec, DatasetSpec, TrainingSpec
        from loraplane.trainer.data import load_tokenizer, validate_dataset

        if output not in ("table", "json"):
            raise InvalidInputError(f"--output {output!r}: use table or json")
        preference_format = data_format in ("preference", "openai_preference")
        chosen_method = method or ("dpo" if preference_format else "sft")
        if chosen_method not in ("sft", "dpo"):
            raise InvalidInputError(f"--method {method!r}: use sft or dpo")
        if chosen_method == "sft" and preference_format:
            raise InvalidInputError(f"--format {data_format}: preference data is checked with --method dpo")
        if chosen_method == "dpo" and data_format not in (None, "auto", "preference", "openai_preference"):
            raise InvalidInputError(
                f"--format {data_format}: --method dpo reads preference pairs "
                "(auto, preference, openai_preference)"
            )

        def given(**values: Any) -> dict[str, Any]:
            return {k: v for k, v in values.items() if v is not None}

        def build(model: type[BaseModel], section: str, values: dict[str, Any]) -> Any:
            try:
                return model.model_validate(values)
            except ValidationError as exc:
                raise format_validation_error(exc, source=f"the {section} options") from None

        dataset = build(
            DatasetSpec,
            "dataset",
            given(
                path=file,
                hub=hub,
                split=split,
                eval_path=eval_file,
                eval_split=eval_split,
                eval_fraction=eval_fraction,
                format=data_format,
                min_examples=min_examples,
                max_overlength_share=max_overlength_share,
            ),
        )
        model_spec = build(
            BaseModelSpec,
            "base model",
            given(
                path=base_model,
                revision=revision,
                trust_remote_code=trust_remote_code,
                chat_template=chat_template,
            ),
        )
        training = build(
            TrainingSpec,
            "training",
            given(max_seq_length=max_seq_length, seed=seed, assistant_only_loss=not all_tokens),
        )
        prepared = validate_dataset(
            dataset,
            load_tokenizer(model_spec),
            max_seq_length=training.max_seq_length,
            assistant_only_loss=training.assistant_only_loss,
            seed=training.seed,
            method=chosen_method,
        )
        if output == "json":
            sys.stdout.write(json.dumps(prepared.to_dict(), indent=2) + "\n")
        else:
            sys.stdout.write(prepared.to_text() + "\n")
        sys.stdout.flush()
        reasons = prepared.failures()
        if reasons:
            raise DatasetError(
                "the dataset is not usable for training:\n" + "\n".join(f"  - {r}" for r in reasons),
                hint="fix the rows the report lists, or change the limits (--max-seq-length, "
                "--max-overlength-share, --min-examples)",
            )

    _run(body)


@data_app.command("push")
def data_push(
    file: Path = typer.Argument(..., help="Training data: JSONL (one example per line) or Parquet."),
    base_model: str = typer.Option(
        ..., "--base-model", "-m", help="Base model directory or hub id: its tokenizer and chat template."
    ),
    name: str | None = typer.Option(None, help="Dataset name (default: from the file name)."),
    release: str = _release_option(),
    max_seq_length: int = typer.Option(1024, help="Longest row in tokens, as in the run's config."),
    data_format: str | None = typer.Option(
        None, "--format", help="auto (default), chat, prompt_completion or alpaca."
    ),
    revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    chat_template: Path | None = typer.Option(
        None, help="Jinja chat template file (as in the run's config)."
    ),
    timeout: float = typer.Option(1800.0, help="Seconds the upload may take."),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
) -> None:
    """Check FILE with the trainer's own checks, then put it on the release's shared volume at
    datasets/NAME/sha256-DIGEST.jsonl: the path names its content, so a run's config (and the
    adapter's manifest) says exactly what it trained on. Bad data exits 2 and uploads nothing; the same
    content pushed again is found there. The newest push of NAME is recorded (a ConfigMap
    loraplane-dataset-NAME): `dataset: {pushed: NAME}` in a run's config is replaced by its path when
    `train submit` creates the Job.

    \b
    Example:
      loraplane -n ml data push train.jsonl -m ./base-model --name support
      # then in train.yaml: dataset: {pushed: support}  (train submit names the exact file)
    """

    def body() -> None:
        from loraplane.platform.data_push import push_dataset

        with _progress_bar(f"uploading {file.name}") as progress:
            result = push_dataset(
                _settings(),
                file,
                base_model=base_model,
                name=name,
                release=release,
                max_seq_length=max_seq_length,
                data_format=data_format,
                revision=revision,
                chat_template=chat_template,
                timeout=timeout,
                on_progress=progress,
            )
        if output == "json":
            out.print_json(json.dumps(result.to_dict()))
            return
        verb = "pushed" if result.uploaded else "already on the volume:"
        out.print(f"{verb} {file} ({result.rows} usable rows) as {result.name}", highlight=False)
        out.print(f"  path:   {result.path}\n  sha256: {result.sha256}", highlight=False)
        out.print(
            f"  in train.yaml: dataset: {{pushed: {result.name}}}  "
            f"(the newest push; or {{path: {result.path}}})",
            highlight=False,
        )

    _run(body)


@models_app.command("pull")
def models_pull(
    model: str = typer.Argument(..., help="hf://ORG/NAME@REVISION or s3://BUCKET/PREFIX."),
    release: str = _release_option(),
    local: bool = typer.Option(
        False, "--local", help="Fetch onto this machine ($LORAPLANE_MODELS_ROOT or ~/.loraplane/models)."
    ),
    hf_token_secret: str | None = typer.Option(
        None, help="Kubernetes Secret with a hub token (key: --hf-token-key), for gated or private models."
    ),
    hf_token_key: str = typer.Option("token", help="Key of the token in --hf-token-secret."),
    s3_secret: str | None = typer.Option(
        None, help="Kubernetes Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, for s3:// models."
    ),
    s3_endpoint: str | None = typer.Option(
        None, help="S3 API endpoint for storage other than AWS (MinIO, R2)."
    ),
    hf_endpoint: str | None = typer.Option(
        None, help="Hugging Face hub endpoint (a mirror; default: HF_ENDPOINT here, else huggingface.co)."
    ),
    timeout: float = typer.Option(
        6 * 3600.0, help="Seconds the fetch may take (running again keeps the files already downloaded)."
    ),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
) -> None:
    """Fetch a base model once onto the release's shared volume, into models/NAME@REVISION/ (the
    directory an hf:// serving.model or base_model.path resolves to): staged, resumable, renamed into
    place when whole, with progress. A wrong id, a missing token or a denied bucket exits 2 naming the
    value to fix. Tokens come from Kubernetes Secrets you name, never from the command line.

    \b
    Examples:
      loraplane -n ml models pull hf://Qwen/Qwen2.5-0.5B-Instruct@main
      loraplane -n ml models pull hf://meta-llama/Llama-3.1-8B-Instruct --hf-token-secret hf-token
      loraplane models pull s3://models/llama-8b --local
    """

    def body() -> None:
        from loraplane.platform.models_pull import pull_local, pull_to_volume
        from loraplane.platform.volume import PodSecrets

        def say(line: str) -> None:
            if output != "json":
                err.print(line, highlight=False)

        settings = _settings()
        if local or settings.registry != "kubernetes":
            result = pull_local(model, say=say)
        else:
            secrets = PodSecrets(hf_token_secret, hf_token_key, s3_secret, s3_endpoint)
            endpoint = hf_endpoint or os.environ.get("HF_ENDPOINT")
            result = pull_to_volume(
                settings,
                model,
                release=release,
                secrets=secrets,
                timeout=timeout,
                say=say,
                hf_endpoint=endpoint,
            )
        if output == "json":
            out.print_json(json.dumps(result.to_dict()))
            return
        verb = "fetched" if result.fetched else "already there:"
        out.print(
            f"{verb} {result.source} at {result.path} ({result.files} files, {result.bytes} bytes)",
            highlight=False,
        )
        out.print(
            f"  serving.model / base_model.path: {result.source}  (or the directory itself)", highlight=False
        )

    _run(body)


# --- the shared volume ----------------------------------------------------------------------------


@volume_app.command("put")
def volume_put(
    local: Path = typer.Argument(..., help="A local file or directory (a base model, a dataset)."),
    dest: str = typer.Argument(..., help="Where it goes on the volume, relative to its root: models/base."),
    release: str = _release_option(),
    replace: bool = typer.Option(False, "--replace", help="Swap an existing DEST for the upload."),
    timeout: float = typer.Option(1800.0, help="Seconds the upload may take."),
    output: str = typer.Option("text", "--output", "-o", help="text or json", callback=_output_choice),
) -> None:
    """Copy a file or directory onto the release's shared volume (where vLLM and the trainer read).

    A short-lived pod (Pod Security restricted) mounts the volume; the upload streams through
    `kubectl exec`, lands in a staging directory, is checked (sha256) and renamed into place: a broken
    upload leaves nothing at DEST. Pods see it under the volume's mount path (/data/DEST).

    \b
    Examples:
      loraplane demo build-model ./demo-model && loraplane -n ml volume put ./demo-model models/base
      loraplane -n ml volume put ./train.jsonl datasets/support/train.jsonl
    """

    def body() -> None:
        from loraplane.platform.volume import put

        with _progress_bar(f"uploading {local.name}") as progress:
            result = put(
                _settings(),
                local,
                dest,
                release=release,
                replace=replace,
                timeout=timeout,
                on_progress=progress,
            )
        if output == "json":
            out.print_json(json.dumps(result.to_dict()))
            return
        out.print(
            f"put {local} at {result.mount_path}/{result.path}: {result.files} file(s), {result.bytes} bytes "
            f"in {result.seconds:.1f}s (sha256 {result.sha256[:12]})",
            highlight=False,
        )

    _run(body)


# --- demo and quickstart ------------------------------------------------------------------------


@demo_app.command("build-model")
def demo_build_model(
    directory: Path = typer.Argument(..., help="Output directory (must not exist)."),
) -> None:
    """Write the deterministic tiny Llama demo model and its tokenizer (no download).

    Example: loraplane demo build-model ./demo-model
    """

    def body() -> None:
        from loraplane.trainer.demo_model import build_demo_model

        if directory.exists():
            raise LoraplaneError(f"{directory} already exists", hint="give a new directory")
        build_demo_model(directory)
        out.print(f"demo base model written to {directory}")

    _run(body)


@demo_app.command("write-data")
def demo_write_data(directory: Path = typer.Argument(..., help="Output directory.")) -> None:
    """Write the two demo tasks' training (chat JSONL) and eval (prompt + expected) files.

    Example: loraplane demo write-data ./demo-data
    """

    def body() -> None:
        from loraplane.trainer.demo_tasks import TASKS, write_task_files

        for task in TASKS.values():
            train, ev = write_task_files(task, directory)
            out.print(f"{task.name}: {train} {ev}")

    _run(body)


@app.command()
def quickstart(
    workdir: Path = typer.Option(
        Path("quickstart-out"), help="Working directory (cleared if an earlier run made it)."
    ),
    port: int | None = typer.Option(None, help="vLLM port (default: a free one)."),
    output: str = typer.Option("table", "--output", "-o", help="table or json", callback=_output_choice),
    keep_serving: bool = typer.Option(
        False, "--keep-serving", help="At the end, serve the adapters (vLLM + gateway) until Ctrl-C."
    ),
    gateway_port: int = typer.Option(8080, help="The gateway's port with --keep-serving."),
) -> None:
    """Train two adapters, serve them with vLLM, evaluate, promote the winner, and query it.

    With --keep-serving it then runs what `loraplane serve` runs on the quickstart's registry, and
    prints the gateway's URL and key for any OpenAI client.

    \b
    Example:
      loraplane quickstart --workdir /tmp/lp-quickstart
      loraplane quickstart --keep-serving   # then query NAME:prod through the printed URL
    """

    def body() -> None:
        from loraplane.platform.quickstart import QuickstartOptions, run_quickstart, summary_table

        result = run_quickstart(QuickstartOptions(workdir=workdir, port=port), console=err)
        if output == "json":
            out.print_json(
                json.dumps(
                    {
                        "winner": result.winner,
                        "promoted": result.promoted,
                        "question": result.question,
                        "answer": result.answer,
                        "seconds": result.seconds,
                        "timings": result.timings,
                        "evals": {k: v.model_dump() for k, v in result.evals.items()},
                    }
                )
            )
        else:
            out.print(summary_table(result))
            out.print(f"[bold]{result.winner}:prod[/] -> {result.promoted}")
            out.print(f"Q: {result.question}\nA: {result.answer}")
        if keep_serving:
            from loraplane.platform.quickstart import keep_serving_options
            from loraplane.platform.serve_local import serve_forever

            settings, opts = keep_serving_options(result.workdir, gateway_port=gateway_port)
            serve_forever(settings, opts, on_phase=_serve_phase, on_ready=_serve_ready)

    _run(body)


# --- serve (local mode) ---------------------------------------------------------------------------


def _serve_phase(phase: str) -> None:
    err.print(
        {
            "starting": "starting vLLM (a minute or two on CPU) ...",
            "loading": "vLLM is up; loading the registry's adapters ...",
            "ready": "adapters loaded",
        }.get(phase, phase)
    )


def _serve_ready(ep: Any) -> None:
    """What users need once ``loraplane serve`` is up: the URL, the key, how to try it."""
    failed = "".join(f"\n  [yellow]not serving[/] {n}: {_escape(w)}" for n, w in ep.state.failed.items())
    out.print(
        f"[bold green]serving[/] {len(ep.state.loaded)} adapter version(s) on {ep.base_model}{failed}\n"
        f"  URL:     {ep.url}/v1\n  API key: {ep.api_key}\n"
        f"  try:     curl {ep.url}/v1/models -H 'Authorization: Bearer {ep.api_key}'\n"
        f"  admin:   LORAPLANE_HOME={ep.home} LORAPLANE_SERVER_URL={ep.vllm_url} loraplane adapters ...\n"
        "Ctrl-C stops both.",
        highlight=False,
    )


@app.command()
def serve(
    model: str = typer.Option(
        ..., "--model", "-m", help="Base model: a directory, or a hub id in the HF cache."
    ),
    served_model_name: str = typer.Option("base", help="Name clients use for the base model."),
    host: str = typer.Option("127.0.0.1", help="Where the gateway listens (vLLM stays on 127.0.0.1)."),
    port: int = typer.Option(8080, help="The gateway's port: the URL users call."),
    vllm_port: int | None = typer.Option(None, help="vLLM's port (default: the port of --server-url, 8000)."),
    max_loras: int = typer.Option(4, help="Adapters in one batch (vLLM --max-loras)."),
    max_lora_rank: int = typer.Option(16, help="Largest adapter rank served (vLLM --max-lora-rank)."),
    max_model_len: int | None = typer.Option(
        None, help="Context length (default: the model's, at most 2048)."
    ),
    max_num_seqs: int = typer.Option(16, help="Sequences the engine runs at once (vLLM --max-num-seqs)."),
    kv_cache_gib: int = typer.Option(
        1, help="KV cache in whole GiB (CPU backend); 1 fits beside other work."
    ),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    startup_timeout: float = typer.Option(900.0, help="Seconds vLLM may take to become ready."),
) -> None:
    """Serve the local registry: vLLM and the OpenAI-compatible gateway, until Ctrl-C.

    vLLM loads every servable registered adapter once it is up (a damaged one is skipped with its
    reason, never stopping the server); the gateway resolves aliases (NAME:prod) and checks client keys.
    Prints the URL and the key to give any OpenAI client. Logs: HOME/logs/{vllm,gateway}.log.

    \b
    Example:
      loraplane serve --model ./base-model --port 8080
      # then: OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=KEY).chat.completions.create(
      #           model="NAME:prod", messages=[...])
    """

    def body() -> None:
        from urllib.parse import urlparse

        from pydantic import ValidationError

        from loraplane.common.errors import format_validation_error
        from loraplane.platform.serve_local import ServeOptions, serve_forever

        settings = _settings()
        try:
            opts = ServeOptions(
                model=model, served_model_name=served_model_name, host=host, port=port,
                vllm_port=vllm_port or urlparse(settings.server_url).port or 8000,
                max_loras=max_loras, max_lora_rank=max_lora_rank, max_model_len=max_model_len,
                max_num_seqs=max_num_seqs, kv_cache_gib=kv_cache_gib, dtype=dtype,
                startup_timeout=startup_timeout,
            )  # fmt: skip
        except ValidationError as exc:
            raise format_validation_error(exc, source="loraplane serve") from None

        serve_forever(settings, opts, on_phase=_serve_phase, on_ready=_serve_ready)

    _run(body)


@pipeline_app.command("export")
def pipeline_export(
    train_config: Path = typer.Argument(..., help="Training config (YAML), as `train submit` takes it."),
    suite: Path = typer.Argument(..., help="Evaluation suite (YAML), as `adapters eval --suite` takes it."),
    fmt: str = typer.Option(..., "--format", help="argo (Workflow YAML) or kfp (a kfp DSL Python file)."),
    release: str = _release_option(),
    image: str | None = typer.Option(
        None, help="Image of the steps (default: the loraplane trainer image of this version)."
    ),
    service_account: str = typer.Option("loraplane-pipeline", help="ServiceAccount of the steps' pods."),
    alias: str = typer.Option("prod", help="Alias the promote step moves."),
    vllm_url: str | None = typer.Option(
        None,
        help="The release's vLLM Service the evaluate step queries (default: http://RELEASE-loraplane-vllm.NS.svc:8000).",
    ),
    api_key_secret: str | None = typer.Option(
        None,
        help="NAME:KEY of vLLM's API key Secret (default: RELEASE-loraplane-vllm-key:api-key, the chart's).",
    ),
    out: Path | None = typer.Option(None, "--out", "-O", help="Write here (default: stdout)."),
) -> None:
    """Write a pipeline that trains TRAIN_CONFIG with the release's template, evaluates the new version
    with SUITE against the live server and promotes it only if the suite's gate passes (the scheduler's
    condition on the promote step). Each step runs this CLI in the loraplane image, in namespace -n.
    argo: the steps' ServiceAccount, Role and RoleBinding, then the Workflow (`kubectl create -f`).
    kfp: a Python file with the kfp DSL; `python pipeline.py pipeline.yaml` compiles it (pip install kfp).

    \b
    Examples:
      loraplane -n ml pipeline export train.yaml suite.yaml --format argo | kubectl create -f -
      loraplane -n ml pipeline export train.yaml suite.yaml --format kfp -O pipeline.py
    """

    def body() -> None:
        from loraplane.platform.pipeline_export import FORMATS, export, load_spec

        if fmt not in FORMATS:
            raise InvalidInputError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        spec = load_spec(
            train_config,
            suite,
            namespace=_settings().namespace,
            release=release,
            image=image,
            service_account=service_account,
            alias=alias,
            vllm_url=vllm_url,
            api_key_secret=api_key_secret,
        )
        text = export(spec, fmt, filename=out.name if out is not None else "pipeline.py")
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text)
            err.print(f"wrote {out} ({fmt})", highlight=False)

    _run(body)


def main() -> None:
    app(prog_name="loraplane")


if __name__ == "__main__":
    main()

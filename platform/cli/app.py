"""The ``loraplane`` command's root: the app, its sub-apps, global options and the helpers every
command shares (settings from the options, error handling, output). A thin layer over
:mod:`loraplane.platform.adapters` and friends.

Heavy libraries (torch, transformers, trl, vLLM) are imported only inside the commands that need
them, so ``loraplane --help`` is instant.

Exit codes: 0 success; 1 failure (server down, training failed); 2 bad input (config, dataset,
adapter, unknown name); 3 refused (promotion gate, changed weights); 4 conflict (another command moved
the alias meanwhile: nothing changed, re-run); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
import typer.core
from rich.console import Console, ConsoleDimensions

from loraplane.common.errors import ExitCode, InvalidInputError, LoraplaneError

T = TypeVar("T")
P = ParamSpec("P")


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


def _about(setting: str) -> str:
    """A global option's help: the description of the setting it sets (common/settings.py)."""
    from loraplane.common.settings import Settings

    return Settings.model_fields[setting].description or setting


@app.callback()
def _global(
    home: Path | None = typer.Option(None, envvar="LORAPLANE_HOME", help=_about("home")),
    adapters_root: Path | None = typer.Option(
        None, envvar="LORAPLANE_ADAPTERS_ROOT", help=_about("adapters_root")
    ),
    server_url: str | None = typer.Option(None, envvar="LORAPLANE_SERVER_URL", help=_about("server_url")),
    registry: str | None = typer.Option(
        None,
        envvar="LORAPLANE_REGISTRY",
        help=_about("registry"),
    ),
    namespace: str | None = typer.Option(
        None,
        "--namespace",
        "-n",
        envvar="LORAPLANE_NAMESPACE",
        help=_about("namespace"),
    ),
    kubeconfig: Path | None = typer.Option(None, envvar="KUBECONFIG", help=_about("kubeconfig")),
    context: str | None = typer.Option(None, "--context", help=_about("kube_context")),
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


class OutputFormat(StrEnum):
    """``--output`` of every command: ``text`` for people (tables where the output is tabular),
    ``json`` for programs. ``table`` is accepted as another name for ``text``."""

    text = "text"
    json = "json"


def _output_choice(value: str) -> str:
    """``--output``: text (or table) or json; anything else is a usage error."""
    if value == "table":
        return OutputFormat.text.value
    if value not in {f.value for f in OutputFormat}:
        raise typer.BadParameter(f"{value!r}: use text (or table) or json")
    return value


def _output_option() -> Any:
    return typer.Option(
        OutputFormat.text.value,
        "--output",
        "-o",
        help="text (tables where the output is tabular) or json.",
        callback=_output_choice,
    )


def _duration(value: str) -> float:
    from loraplane.common.durations import parse_duration

    try:
        return parse_duration(value)
    except LoraplaneError as exc:
        raise typer.BadParameter(str(exc)) from None


def _duration_option(default: str, what: str, flag: str = "--timeout") -> Any:
    """A duration option: seconds (``90``) or a Go duration (``90s``, ``10m``, ``1h30m``), as seconds."""
    return typer.Option(
        default,
        flag,
        help=f"{what} Seconds or a duration: 90, 90s, 10m, 1h.",
        parser=_duration,
        metavar="DURATION",
    )


def _settings() -> Any:
    from loraplane.common.settings import Settings

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
        raise typer.Exit(ExitCode.INTERRUPTED) from None
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
        raise typer.Exit(ExitCode.FAILED) from None


def handled(command: Callable[P, None]) -> Callable[P, None]:
    """A command whose errors :func:`_run` turns into a message and an exit code (put it under
    ``@app.command``; typer reads the wrapped function's signature)."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        _run(lambda: command(*args, **kwargs))

    return run


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

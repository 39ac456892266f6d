"""The ``loraplane`` command: a thin layer over :mod:`loraplane.platform.adapters` and friends.

Heavy libraries (torch, transformers, trl, vLLM) are imported only inside the commands that need
them, so ``loraplane --help`` is instant.

Exit codes: 0 success; 1 failure (server down, training failed); 2 bad input (config, dataset,
adapter, unknown name); 3 refused (promotion gate, changed weights); 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from loraplane.common.errors import LoraplaneError

T = TypeVar("T")

app = typer.Typer(
    help="Fine-tune LLMs with LoRA and serve the adapters with vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
adapters_app = typer.Typer(
    help="Register, load, evaluate and promote adapter versions.", no_args_is_help=True
)
demo_app = typer.Typer(help="The offline demo base model and data.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(demo_app, name="demo")

out = Console()
err = Console(stderr=True)


class _State:
    home: Path | None = None
    adapters_root: Path | None = None
    server_url: str | None = None


_state = _State()


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
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logs on stderr."),
) -> None:
    from loraplane.common.logs import configure_logging

    configure_logging(verbose)
    _state.home, _state.adapters_root, _state.server_url = home, adapters_root, server_url


def _settings() -> Any:
    from loraplane.platform.settings import Settings

    kwargs: dict[str, Any] = {"adapters_root": _state.adapters_root}
    if _state.home is not None:
        kwargs["home"] = _state.home
    if _state.server_url is not None:
        kwargs["server_url"] = _state.server_url
    return Settings(**kwargs)


def _run(fn: Callable[[], T]) -> T:
    """Run a command body; a LoraplaneError becomes a clear message and its exit code."""
    try:
        return fn()
    except LoraplaneError as exc:
        err.print("[red]error:[/] " + _escape(str(exc)), highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --- adapters -----------------------------------------------------------------------------------


@adapters_app.command("list")
def adapters_list(output: str = typer.Option("table", "--output", "-o", help="table or json")) -> None:
    """List adapters, their versions, states, aliases and latest eval."""

    def body() -> None:
        from rich.table import Table

        from loraplane.platform.registry import LocalRegistry

        state = LocalRegistry(_settings().home).read()
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
                summary = (
                    (
                        f"{ev.metric} {ev.candidate[ev.metric]:.2f} vs {ev.baseline[ev.metric]:.2f} "
                        f"({'pass' if ev.passed else 'fail'})"
                    )
                    if ev
                    else ""
                )
                table.add_row(adapter.name, v.version, v.served_name, v.state, aliases, summary)
        out.print(table)

    _run(body)


@adapters_app.command("register")
def adapters_register(
    path: Path = typer.Argument(..., help="Adapter directory under the adapters root."),
    name: str | None = typer.Option(None, help="Adapter name (default: from manifest.json)."),
    version: str | None = typer.Option(None, help="Version, e.g. v3 (default: from manifest.json)."),
) -> None:
    """Check an adapter directory (safetensors, under the root, rank) and record it."""

    def body() -> None:
        from loraplane.platform.adapters import register_adapter

        entry = register_adapter(_settings(), path, name=name, version=version)
        out.print(f"registered {entry.served_name} ({entry.path})")

    _run(body)


@adapters_app.command("load")
def adapters_load(ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS")) -> None:
    """Make the server serve a registered version under its immutable served name."""

    def body() -> None:
        from loraplane.platform.adapters import load_adapter

        entry = asyncio.run(load_adapter(_settings(), ref))
        out.print(f"{entry.served_name} is served by {_settings().server_url}")

    _run(body)


@adapters_app.command("eval")
def adapters_eval(
    ref: str = typer.Argument(..., help="NAME@VERSION or NAME:ALIAS"),
    dataset: Path = typer.Option(
        ..., "--dataset", "-d", help="Eval JSONL: prompt or messages, and expected."
    ),
    baseline: str | None = typer.Option(
        None, help="Compare with this adapter ref (default: the base model)."
    ),
    output: str = typer.Option("table", "--output", "-o", help="table or json"),
) -> None:
    """Evaluate a version and a baseline side by side through the live server; store the result."""

    def body() -> None:
        from loraplane.platform.adapters import evaluate_adapter

        settings = _settings()
        record = asyncio.run(
            evaluate_adapter(settings, ref, dataset, baseline=baseline, report_dir=settings.home / "reports")
        )
        if output == "json":
            out.print_json(record.model_dump_json())
            return
        from rich.table import Table

        table = Table(title=f"{Path(record.dataset).name} via {record.endpoint}")
        for col in ("model", *record.candidate):
            table.add_column(col)
        for model, scores in (
            (record.candidate_model, record.candidate),
            (record.baseline_model, record.baseline),
        ):
            table.add_row(model, *(f"{v:.3f}" for v in scores.values()))
        out.print(table)
        out.print(f"gate ({record.metric} above baseline): {'pass' if record.passed else 'FAIL'}")

    _run(body)


@adapters_app.command("promote")
def adapters_promote(
    ref: str = typer.Argument(..., help="NAME@VERSION"),
    alias: str = typer.Option("prod", help="Alias to point at this version."),
    force: bool = typer.Option(False, help="Override a failed or missing evaluation (needs --reason)."),
    reason: str | None = typer.Option(None, help="Why; recorded in the history."),
) -> None:
    """Point NAME:ALIAS at a version that passed its evaluation and is loaded on the server."""

    def body() -> None:
        from loraplane.platform.adapters import promote_adapter

        entry, previous = asyncio.run(
            promote_adapter(_settings(), ref, alias=alias, force=force, reason=reason)
        )
        was = f" (was {entry.name}@{previous})" if previous else ""
        out.print(f"{entry.name}:{alias} -> {entry.served_name}{was}")

    _run(body)


# --- demo and quickstart ------------------------------------------------------------------------


@demo_app.command("build-model")
def demo_build_model(
    directory: Path = typer.Argument(..., help="Output directory (must not exist)."),
) -> None:
    """Write the deterministic tiny Llama demo model and its tokenizer (no download)."""

    def body() -> None:
        from loraplane.trainer.demo_model import build_demo_model

        if directory.exists():
            raise LoraplaneError(f"{directory} already exists", hint="give a new directory")
        build_demo_model(directory)
        out.print(f"demo base model written to {directory}")

    _run(body)


@demo_app.command("write-data")
def demo_write_data(directory: Path = typer.Argument(..., help="Output directory.")) -> None:
    """Write the two demo tasks' training (chat JSONL) and eval (prompt + expected) files."""

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
    output: str = typer.Option("table", "--output", "-o", help="table or json"),
) -> None:
    """Train two adapters, serve them with vLLM, evaluate, promote the winner, and query it."""

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
            return
        out.print(summary_table(result))
        out.print(f"[bold]{result.winner}:prod[/] -> {result.promoted}")
        out.print(f"Q: {result.question}\nA: {result.answer}")

    _run(body)


def main() -> None:
    app(prog_name="loraplane")


if __name__ == "__main__":
    main()

"""``loraplane demo|quickstart|serve``: the demo model and data, and the one-machine loop."""

from __future__ import annotations

import json
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
    demo_app,
    err,
    handled,
    out,
)
from loraplane.serving.capacity import DEFAULT_CPU_LORAS


@demo_app.command("build-model")
@handled
def demo_build_model(
    directory: Path = typer.Argument(..., help="Output directory (must not exist)."),
) -> None:
    """Write the deterministic tiny Llama demo model and its tokenizer (no download).

    Example: loraplane demo build-model ./demo-model
    """

    from loraplane.trainer.demo_model import build_demo_model

    if directory.exists():
        raise LoraplaneError(f"{directory} already exists", hint="give a new directory")
    build_demo_model(directory)
    out.print(f"demo base model written to {directory}")


@demo_app.command("write-data")
@handled
def demo_write_data(directory: Path = typer.Argument(..., help="Output directory.")) -> None:
    """Write the two demo tasks' training (chat JSONL) and eval (prompt + expected) files.

    Example: loraplane demo write-data ./demo-data
    """

    from loraplane.trainer.demo_tasks import TASKS, write_task_files

    for task in TASKS.values():
        train, ev = write_task_files(task, directory)
        out.print(f"{task.name}: {train} {ev}")


@app.command()
@handled
def quickstart(
    workdir: Path = typer.Option(
        Path("quickstart-out"), help="Working directory (cleared if an earlier run made it)."
    ),
    port: int | None = typer.Option(None, help="vLLM port (default: a free one)."),
    output: str = _output_option(),
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
@handled
def serve(
    model: str = typer.Option(
        ..., "--model", "-m", help="Base model: a directory, or a hub id in the HF cache."
    ),
    served_model_name: str = typer.Option("base", help="Name clients use for the base model."),
    host: str = typer.Option("127.0.0.1", help="Where the gateway listens (vLLM stays on 127.0.0.1)."),
    port: int = typer.Option(8080, help="The gateway's port: the URL users call."),
    vllm_port: int | None = typer.Option(None, help="vLLM's port (default: the port of --server-url, 8000)."),
    max_loras: int = typer.Option(4, help="Adapters in one batch (vLLM --max-loras)."),
    max_cpu_loras: int | None = typer.Option(
        None,
        help="Adapters the server holds at most (vLLM --max-cpu-loras): loads beyond it are refused, never "
        f"evicted (default: {DEFAULT_CPU_LORAS}, or --max-loras when larger).",
    ),
    max_lora_rank: int = typer.Option(16, help="Largest adapter rank served (vLLM --max-lora-rank)."),
    max_model_len: int | None = typer.Option(
        None, help="Context length (default: the model's, at most 2048)."
    ),
    max_num_seqs: int = typer.Option(16, help="Sequences the engine runs at once (vLLM --max-num-seqs)."),
    kv_cache_gib: int = typer.Option(
        1, help="KV cache in whole GiB (CPU backend); 1 fits beside other work."
    ),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    startup_timeout: float = _duration_option(
        "15m", "Longest vLLM may take to become ready.", "--startup-timeout"
    ),
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

    from urllib.parse import urlparse

    from pydantic import ValidationError

    from loraplane.common.errors import format_validation_error
    from loraplane.platform.serve_local import ServeOptions, serve_forever

    settings = _settings()
    try:
        opts = ServeOptions(
            model=model, served_model_name=served_model_name, host=host, port=port,
            vllm_port=vllm_port or urlparse(settings.server_url).port or 8000,
            max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, kv_cache_gib=kv_cache_gib, dtype=dtype,
            startup_timeout=startup_timeout,
        )  # fmt: skip
    except ValidationError as exc:
        raise format_validation_error(exc, source="loraplane serve") from None

    serve_forever(settings, opts, on_phase=_serve_phase, on_ready=_serve_ready)

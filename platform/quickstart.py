"""``loraplane quickstart``: the whole loop on one machine, for real.

Build the demo base model, write two task datasets, train one adapter per task in a trainer
process, serve them with a local vLLM server, register both, evaluate each against the base model on
its own task through the live endpoint, promote the winner to ``prod``, and ask it one question
through the official ``openai`` client. Every process it starts is stopped when it ends, fails or
is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.evals.suite import suite_for_dataset
from loraplane.platform.adapters import evaluate_adapter, promote_adapter, register_adapter
from loraplane.registry.backends import open_registry
from loraplane.registry.model import EvalRecord
from loraplane.serving.launcher import VLLMServer, VLLMServerConfig

if TYPE_CHECKING:
    from loraplane.platform.serve_local import ServeOptions

MARKER = ".loraplane-quickstart"
BASE_NAME = "demo-base"


@dataclass
class QuickstartOptions:
    workdir: Path
    port: int | None = None
    epochs: float = 6.0
    learning_rate: float = 1e-2
    server_timeout: float = 600.0


@dataclass
class QuickstartResult:
    workdir: Path
    evals: dict[str, EvalRecord]
    winner: str
    promoted: str
    answer: str
    question: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_workdir(workdir: Path) -> None:
    """Use an empty or missing directory, or one an earlier quickstart made (it is cleared)."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise LoraplaneError(
                f"{workdir} exists and is not empty",
                hint="choose another --workdir; quickstart only clears directories it made",
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by loraplane quickstart; cleared by the next one\n")


class TrainerProcess:
    """``python -m loraplane.trainer`` as a child process, reporting progress from its JSON logs."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    def run(self, on_step: Callable[[int, int], None]) -> dict[str, str]:
        env = {**os.environ, "LORAPLANE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplane.trainer", "--config", str(self.config_path), "-v"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stderr is not None and self.proc.stdout is not None
        with self.log_path.open("w") as log_file:
            for line in self.proc.stderr:
                log_file.write(line)
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(line)
                    if event.get("msg") == "train progress":
                        on_step(int(event["step"]), int(event["max_steps"]))
        out = self.proc.stdout.read()
        code = self.proc.wait()
        if code != 0:
            tail = "\n".join(self.log_path.read_text().splitlines()[-15:])
            raise LoraplaneError(
                f"training with {self.config_path} failed (exit {code})", hint=f"log: {self.log_path}\n{tail}"
            )
        result: dict[str, str] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def demo_trainer_config(
    task: str,
    model_dir: Path,
    train_path: Path,
    adapters: Path,
    *,
    epochs: float = 6.0,
    learning_rate: float = 1e-2,
) -> dict[str, object]:
    """The training config (as YAML data) the quickstart and the tests use for a demo task."""
    return {
        "base_model": {"path": str(model_dir)},
        "dataset": {"path": str(train_path)},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "training": {
            "learning_rate": learning_rate,
            "epochs": epochs,
            "batch_size": 8,
            "max_seq_length": 128,
            "logging_steps": 5,
            "seed": 0,
        },
        "output": {"adapters_root": str(adapters), "name": task},
    }


def demo_server_config(model_dir: Path, port: int, api_key: str) -> VLLMServerConfig:
    """A vLLM CPU server for the demo model: two adapter slots, rank 8, 1 GiB of KV cache, loopback."""
    return VLLMServerConfig(
        model=str(model_dir),
        served_model_name=BASE_NAME,
        port=port,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=256,
        dtype="float32",  # bf16 works too, but float32 keeps CPU results close to the trainer's
        kv_cache_gib=1,
        api_key=api_key,
    )


def keep_serving_options(workdir: Path, *, gateway_port: int = 8080) -> tuple[Settings, ServeOptions]:
    """What ``quickstart --keep-serving`` serves at the end: the quickstart's registry, on the server
    settings the demo was trained and evaluated with (``demo_server_config``)."""
    from loraplane.platform.serve_local import ServeOptions

    work = workdir.resolve()
    demo = demo_server_config(work / "base-model", free_port(), api_key="")
    settings = Settings(home=work / "state", adapters_root=work / "adapters")
    opts = ServeOptions(
        model=demo.model,
        served_model_name=demo.served_model_name,
        port=gateway_port,
        vllm_port=demo.port,
        max_loras=demo.max_loras,
        max_lora_rank=demo.max_lora_rank,
        max_model_len=demo.max_model_len,
        dtype=demo.dtype,
        kv_cache_gib=demo.kv_cache_gib or 1,
    )
    return settings, opts


def run_quickstart(opts: QuickstartOptions, console: Console | None = None) -> QuickstartResult:
    from loraplane.trainer.demo_model import build_demo_model
    from loraplane.trainer.demo_tasks import TASKS, write_task_files

    console = console or Console(stderr=True)
    started = time.monotonic()
    timings: dict[str, float] = {}
    work = opts.workdir.resolve()
    prepare_workdir(work)
    api_key = secrets.token_urlsafe(24)
    port = opts.port or free_port()
    settings = Settings(
        home=work / "state",
        adapters_root=work / "adapters",
        server_url=f"http://127.0.0.1:{port}",
        api_key=api_key,
        max_lora_rank=8,
    )
    server: VLLMServer | None = None
    trainer: TrainerProcess | None = None

    def step(label: str) -> Callable[[], None]:
        t0 = time.monotonic()
        console.print(f"[bold cyan]>[/] {label}")

        def done() -> None:
            timings[label] = round(time.monotonic() - t0, 1)
            console.print(f"  [green]done[/] in {timings[label]:.1f}s")

        return done

    try:
        done = step("Building the demo base model (tiny Llama + locally trained tokenizer)")
        model_dir = build_demo_model(work / "base-model")
        done()

        done = step("Starting vLLM (CPU) in the background; it loads while the adapters train")
        server = VLLMServer(
            demo_server_config(model_dir, port, api_key),
            log_path=work / "logs" / "vllm.log",
        )
        server.start()
        done()

        eval_sets: dict[str, Path] = {}
        published: dict[str, Path] = {}
        (work / "configs").mkdir()
        for task in TASKS.values():
            train_path, eval_path = write_task_files(task, work / "data")
            eval_sets[task.name] = eval_path
            config_path = work / "configs" / f"{task.name}.yaml"
            config_path.write_text(
                yaml.safe_dump(
                    demo_trainer_config(
                        task.name,
                        model_dir,
                        train_path,
                        work / "adapters",
                        epochs=opts.epochs,
                        learning_rate=opts.learning_rate,
                    )
                )
            )
            done = step(f"Training adapter '{task.name}': {task.description}")
            with _progress(console) as progress:
                bar = progress.add_task("steps", total=None)
                trainer = TrainerProcess(config_path, work / "logs" / f"train-{task.name}.log")
                result = trainer.run(_updater(progress, bar))
                trainer = None
            published[task.name] = Path(result["adapter"])
            done()

        done = step(f"Waiting for vLLM to be ready at {server.url}")
        server.wait_ready(timeout=opts.server_timeout)
        done()

        done = step("Registering both adapters (preflight: safetensors, under the adapters root, rank)")
        for path in published.values():
            register_adapter(settings, path)
        done()

        evals: dict[str, EvalRecord] = {}
        state = open_registry(settings).read()
        for task_name in published:
            ref = state.resolve(task_name).ref
            done = step(
                f"Evaluating {ref} against the base model on the '{task_name}' eval set (live endpoint)"
            )
            with _progress(console) as progress:
                bar = progress.add_task("requests", total=None)
                evals[task_name] = asyncio.run(
                    evaluate_adapter(
                        settings,
                        ref,
                        # perplexity too: the quickstart's server serves nothing but this eval
                        suite_for_dataset(eval_sets[task_name], perplexity=True),
                        report_dir=work / "reports",
                        on_progress=_updater(progress, bar),
                    )
                )
            done()

        passed = {t: e for t, e in evals.items() if e.passed}
        if not passed:
            raise LoraplaneError(
                "no adapter beat the base model; nothing to promote",
                hint=f"see the eval reports in {work / 'reports'}",
            )
        winner = max(passed, key=lambda t: _gain(passed[t]))
        done = step(f"Promoting the winner '{winner}' to the alias 'prod'")
        promoted, _ = asyncio.run(promote_adapter(settings, winner, alias="prod"))
        done()

        done = step(f"Asking '{winner}:prod' one question through the openai client")
        from openai import OpenAI

        served = open_registry(settings).read().resolve(f"{winner}:prod").served_name
        from loraplane.evals.dataset import load_eval_set

        example = load_eval_set(eval_sets[winner])[0]
        client = OpenAI(base_url=f"{settings.server_url}/v1", api_key=api_key)
        reply = client.chat.completions.create(
            model=served,
            messages=example.as_chat(),  # type: ignore[arg-type]
            temperature=0,
            max_tokens=16,
        )
        answer = reply.choices[0].message.content or ""
        question = example.messages[-1][1]
        done()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process quickstart started[/]")
        raise
    finally:
        if trainer is not None:
            trainer.kill()
        if server is not None:
            server.stop()

    return QuickstartResult(
        workdir=work,
        evals=evals,
        winner=winner,
        promoted=promoted.served_name,
        answer=answer,
        question=question,
        seconds=time.monotonic() - started,
        timings=timings,
    )


def _gain(record: EvalRecord) -> float:
    """Exact-match gain over the base model on the record's eval set."""
    return (record.first("exact_match") or 0.0) - (record.first("exact_match", role="base") or 0.0)


def _updater(progress: Progress, task_id: TaskID) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        progress.update(task_id, completed=done, total=total)

    return update


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    with Progress(
        SpinnerColumn(),
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield progress


def summary_table(result: QuickstartResult) -> Table:
    table = Table(title=f"loraplane quickstart: {result.seconds:.0f}s, workdir {result.workdir}")
    for col in (
        "adapter",
        "task",
        "base EM",
        "adapter EM",
        "delta",
        "base ppl",
        "adapter ppl",
        "gate",
        "alias",
    ):
        table.add_column(col, justify="left" if col in ("adapter", "task", "gate", "alias") else "right")

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    for task, record in result.evals.items():
        table.add_row(
            record.candidate_model,
            task,
            fmt(record.first("exact_match", role="base")),
            fmt(record.first("exact_match")),
            fmt(_gain(record), "+.2f"),
            fmt(record.first("perplexity", role="base"), ".1f"),
            fmt(record.first("perplexity"), ".2f"),
            "[green]pass[/]" if record.passed else "[red]fail[/]",
            "prod" if task == result.winner else "",
        )
    return table

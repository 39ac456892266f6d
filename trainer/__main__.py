"""``python -m loraplane.trainer --config FILE [key=value ...]``: train and publish one adapter.

The same command runs on a laptop, in a single-GPU pod and under ``torchrun`` (DDP/FSDP, one or many
nodes): distribution comes from torchrun's environment variables. On a terminal it shows a progress
bar; otherwise (a pod's log) it writes one JSON line per logging step to stderr. The last line on
stdout is the result as JSON. Exit codes: see ``loraplane.trainer.exit_codes``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraplane.common.errors import LoraplaneError
from loraplane.common.logs import configure_logging
from loraplane.trainer.exit_codes import FAILED, SUCCESS


def _progress_bar() -> tuple[Callable[[dict[str, float]], None], Callable[[], None]]:
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar: Any = None

    def update(event: dict[str, float]) -> None:
        nonlocal bar
        step, total = int(event["step"]), int(event["max_steps"])
        if bar is None:
            bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="training")
        bar.update(step - bar.n)
        shown = {k: f"{event[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate") if k in event}
        if shown:
            bar.set_postfix(shown, refresh=False)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _with_metrics(
    port: int | None, on_log: Callable[[dict[str, float]], None] | None, close: Callable[[], None]
) -> tuple[Callable[[dict[str, float]], None] | None, Callable[[], None]]:
    """``on_log`` and ``close`` extended with the training metrics' server, when a port is set."""
    from loraplane.trainer.metrics import TrainingMetrics, metrics_port_from_env

    port = metrics_port_from_env() if port is None else port
    if not port:
        return on_log, close
    metrics = TrainingMetrics()
    try:
        metrics.serve(port)
    except OSError as exc:  # the port is taken: train without the metrics rather than not at all
        logging.getLogger("loraplane.trainer").warning(
            "training metrics not served on port %d: %s", port, exc
        )
        return on_log, close

    def both(event: dict[str, float]) -> None:
        metrics(event)
        if on_log is not None:
            on_log(event)

    def close_both() -> None:
        close()
        metrics.close()

    return both, close_both


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplane.trainer", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.epochs=3")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve loss, learning rate and throughput as Prometheus metrics on this port while training "
        "(rank 0; default: $LORAPLANE_TRAINER_METRICS_PORT, else off)",
    )
    args = parser.parse_args(argv)
    interactive = sys.stderr.isatty()
    if not interactive:
        # A pod's log: machine-readable lines, and at least the per-step progress ones.
        os.environ.setdefault("LORAPLANE_LOG_FORMAT", "json")
    configure_logging(args.verbose if interactive else max(args.verbose, 1))
    rank = int(os.environ.get("RANK", "0"))
    on_log, close = _progress_bar() if interactive and rank == 0 else (None, lambda: None)
    if rank == 0:
        on_log, close = _with_metrics(args.metrics_port, on_log, close)
    from loraplane.trainer.config import load_config

    try:
        config = load_config(args.config, args.overrides)
        from loraplane.trainer.train import train_and_publish

        result = train_and_publish(config, on_log=on_log)
    except LoraplaneError as exc:
        close()
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    except KeyboardInterrupt:
        close()
        print("interrupted: nothing was published", file=sys.stderr)  # noqa: T201
        return 130
    except Exception as exc:  # a crash a retry may fix (OOM, lost device): traceback, exit 1
        close()
        traceback.print_exc()
        print(f"error: training crashed: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return FAILED
    close()
    if rank == 0:
        print(  # noqa: T201
            json.dumps(
                {
                    "adapter": str(result.path),
                    "name": result.name,
                    "version": result.version,
                    "already_published": result.already_published,
                }
            )
        )
    return SUCCESS


if __name__ == "__main__":
    sys.exit(main())

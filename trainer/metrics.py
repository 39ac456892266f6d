"""Training curves for people who do not open files: Prometheus metrics of a running trainer, and the
loss curve of a published adapter read back from its ``metrics.jsonl``.

While a run trains, ``python -m loraplane.trainer --metrics-port PORT`` (or
``LORAPLANE_TRAINER_METRICS_PORT``) serves, on rank 0, at each logging step:

- ``loraplane_trainer_loss``, ``loraplane_trainer_eval_loss``, ``loraplane_trainer_learning_rate``,
  ``loraplane_trainer_grad_norm``, ``loraplane_trainer_epoch``;
- ``loraplane_trainer_step`` and ``loraplane_trainer_max_steps`` (progress);
- ``loraplane_trainer_tokens_seen`` (trained, non-padding tokens so far) and
  ``loraplane_trainer_tokens_per_second`` (between the last two logging steps).

Once published, :func:`loss_curve` reads the same curve from ``<adapter>/metrics.jsonl``: what
``loraplane adapters show`` prints next to each version. While a run goes on in a cluster,
:func:`last_progress` reads the latest step from its pod's log: what ``loraplane train status`` prints.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.common.metrics_endpoint import MetricsEndpoint

METRICS_PORT_ENV = "LORAPLANE_TRAINER_METRICS_PORT"

# event key (the trainer's log) -> (metric, help)
_GAUGES = {
    "loss": (
        "loraplane_trainer_loss",
        "Training loss at the last logging step (mean NLL per trained token).",
    ),
    "eval_loss": ("loraplane_trainer_eval_loss", "Held-out loss at the last evaluation."),
    "learning_rate": ("loraplane_trainer_learning_rate", "Learning rate at the last logging step."),
    "grad_norm": ("loraplane_trainer_grad_norm", "Gradient norm at the last logging step."),
    "epoch": ("loraplane_trainer_epoch", "Epochs done (fractional)."),
    "step": ("loraplane_trainer_step", "Optimizer steps done."),
    "max_steps": ("loraplane_trainer_max_steps", "Optimizer steps the run will take."),
    "num_input_tokens_seen": ("loraplane_trainer_tokens_seen", "Trained (non-padding) tokens so far."),
}


class TrainingMetrics(MetricsEndpoint):
    """A progress sink (``ProgressReporter``'s ``on_log``) that keeps the last values as gauges."""

    def __init__(self) -> None:
        from prometheus_client import Gauge  # here: `adapters show` reads loss curves from this module

        super().__init__()
        self.gauges = {key: Gauge(name, doc, registry=self.registry) for key, (name, doc) in _GAUGES.items()}
        self.tokens_per_second = Gauge(
            "loraplane_trainer_tokens_per_second",
            "Trained tokens per second between the last two logging steps.",
            registry=self.registry,
        )
        self._last: tuple[float, float] | None = None  # (monotonic time, tokens seen)

    def __call__(self, event: dict[str, float]) -> None:
        for key, value in event.items():
            if key in self.gauges:
                self.gauges[key].set(value)
        tokens = event.get("num_input_tokens_seen")
        if tokens is not None:
            now = time.monotonic()
            if self._last is not None and now > self._last[0] and tokens >= self._last[1]:
                self.tokens_per_second.set((tokens - self._last[1]) / (now - self._last[0]))
            self._last = (now, tokens)


def metrics_port_from_env(environ: dict[str, str] | None = None) -> int:
    """``LORAPLANE_TRAINER_METRICS_PORT`` as a port (0 when unset or empty)."""
    raw = (os.environ if environ is None else environ).get(METRICS_PORT_ENV, "").strip()
    return int(raw) if raw else 0


@dataclass
class LossCurve:
    """A published run's curve: (step, loss) per logging step, and (step, eval loss) per evaluation."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    plot: str | None = None  # loss.png next to it, when there

    def summary(self) -> str:
        """``8.02 -> 1.09 (min 1.05) over 34 steps; eval 1.31``; "" when there is no curve."""
        if not self.train:
            return ""
        first, last = self.train[0][1], self.train[-1][1]
        low = min(loss for _, loss in self.train)
        text = f"{first:.3g} -> {last:.3g} (min {low:.3g}) over {self.train[-1][0]} steps"
        if self.eval:
            text += f"; eval {self.eval[-1][1]:.3g}"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "train": [[s, v] for s, v in self.train],
            "eval": [[s, v] for s, v in self.eval],
            "plot": self.plot,
        }


def loss_curve(adapter_dir: Path | str) -> LossCurve:
    """The loss curve in ``adapter_dir/metrics.jsonl`` (an empty curve when the file is missing or bad)."""
    directory = Path(adapter_dir)
    curve = LossCurve()
    plot = directory / "loss.png"
    curve.plot = str(plot) if plot.is_file() else None
    try:
        lines = (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return curve
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int | float):
            continue
        step = int(entry["step"])
        for key, into in (("loss", curve.train), ("eval_loss", curve.eval)):
            value = entry.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                into.append((step, float(value)))
    return curve


PROGRESS_MESSAGE = "train progress"  # ProgressReporter's log line (JSON in a pod: LORAPLANE_LOG_FORMAT=json)


def last_progress(lines: Iterable[str]) -> dict[str, float] | None:
    """The last ``train progress`` event in a trainer's JSON log lines (step, max_steps, loss, ...)."""
    found: dict[str, float] | None = None
    for line in lines:
        if PROGRESS_MESSAGE not in line or not line.lstrip().startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("msg") != PROGRESS_MESSAGE:
            continue
        event = {
            k: float(v) for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if "step" in event:
            found = event
    return found


def progress_summary(event: dict[str, float]) -> str:
    """``step 30/60, loss 1.23, learning rate 0.005, epoch 3``."""
    parts = [f"step {event['step']:.0f}/{event.get('max_steps', 0):.0f}"]
    for key, label in (("loss", "loss"), ("eval_loss", "eval loss"), ("learning_rate", "learning rate")):
        if key in event:
            parts.append(f"{label} {event[key]:.4g}")
    if "epoch" in event:
        parts.append(f"epoch {event['epoch']:.3g}")
    return ", ".join(parts)

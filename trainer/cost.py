"""What a training run cost: device time (GPU-seconds), tokens trained and throughput.

The numbers are taken from the launcher's view of the run: ``devices`` is the number of processes
torchrun started (``WORLD_SIZE``; 1 for a plain process), each driving one device, and the wall time is
the time the trainer spent in ``Trainer.train`` (model and data loading before it, evaluation and
publishing after it, are not counted). ``device_seconds`` is their product; ``gpu_seconds`` the same
when the devices are GPUs (``cuda``), else 0: a CPU run costs no GPU time.

A run stopped by SIGTERM (preemption) and resumed counts every attempt: each checkpoint carries the
training seconds up to its step (``loraplane-cost.json``, written by
:class:`loraplane.trainer.callbacks.TrainingClock`), and the attempt that resumes from it adds its own.
Work done after the last checkpoint of a killed attempt is done again by the next one, and is not
counted (its time is not known once the process is gone).

The record goes into the adapter's ``manifest.json`` as ``cost``; ``loraplane adapters show`` and
``loraplane train status`` print :func:`cost_summary` of it. This module imports no torch or
transformers: the CLI reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COST_FILE = "loraplane-cost.json"  # in each checkpoint directory: training seconds up to that step


def read_checkpoint_cost(checkpoint: Path) -> tuple[float, int]:
    """(training seconds, attempts) recorded in a checkpoint; (0, 0) when it has no record (a
    checkpoint written before loraplane recorded it, or a record a crash left unreadable)."""
    try:
        data = json.loads((checkpoint / COST_FILE).read_text(encoding="utf-8"))
        return float(data["train_seconds"]), int(data["attempts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, 0


def write_checkpoint_cost(checkpoint: Path, *, train_seconds: float, attempts: int) -> None:
    from loraplane.common.files import atomic_write_text

    record = {"train_seconds": round(train_seconds, 3), "attempts": attempts}
    atomic_write_text(checkpoint / COST_FILE, json.dumps(record) + "\n")


def cost_record(
    *,
    devices: int,
    accelerator: str,
    train_seconds: float,
    attempt_seconds: float,
    attempts: int,
    tokens_trained: int,
    attempt_tokens: int,
) -> dict[str, Any]:
    """The manifest's ``cost``. ``train_seconds``/``attempts`` cover the whole run (every attempt);
    ``attempt_seconds``/``attempt_tokens`` the last attempt alone, which measures the throughput."""
    devices = max(1, int(devices))
    device_seconds = devices * train_seconds
    return {
        "devices": devices,
        "accelerator": accelerator,
        "train_seconds": round(train_seconds, 2),
        "device_seconds": round(device_seconds, 2),
        "gpu_seconds": round(device_seconds, 2) if accelerator == "cuda" else 0.0,
        "gpu_hours": round(device_seconds / 3600, 4) if accelerator == "cuda" else 0.0,
        "attempts": attempts,
        "tokens_trained": int(tokens_trained),
        "tokens_per_second": round(attempt_tokens / attempt_seconds, 1) if attempt_seconds > 0 else 0.0,
        "tokens_per_device_second": (
            round(attempt_tokens / (devices * attempt_seconds), 1) if attempt_seconds > 0 else 0.0
        ),
    }


def manifest_cost(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """A manifest's cost record; for a manifest published before it was recorded, what its metrics
    say (training seconds, tokens, tokens/s; device count unknown). None when neither is there."""
    if not isinstance(manifest, dict):
        return None
    cost = manifest.get("cost")
    if isinstance(cost, dict):
        return cost
    metrics = manifest.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("train_seconds"), int | float):
        return {
            "train_seconds": float(metrics["train_seconds"]),
            "tokens_trained": int(metrics.get("tokens_seen") or 0),
            "tokens_per_second": float(metrics.get("tokens_per_second") or 0.0),
        }
    return None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _count(n: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:.0f}"


def cost_summary(cost: dict[str, Any] | None) -> str:
    """``4 cuda x 1h02m00s = 4.13 GPU-hours (14880 GPU-seconds); 12.3M tokens at 3.3k tokens/s``;
    "" when there is no record."""
    if not cost:
        return ""
    seconds = float(cost.get("train_seconds") or 0.0)
    parts = []
    if "devices" in cost:
        devices, accelerator = int(cost["devices"]), str(cost.get("accelerator") or "device")
        time = f"{devices} {accelerator} x {_duration(seconds)}"
        if accelerator == "cuda":
            gpu_seconds = float(cost.get("gpu_seconds") or 0.0)
            time += f" = {gpu_seconds / 3600:.3g} GPU-hours ({gpu_seconds:.0f} GPU-seconds)"
        else:
            time += f" = {float(cost.get('device_seconds') or 0.0):.1f} device-seconds (no GPU)"
        attempts = int(cost.get("attempts") or 1)
        if attempts > 1:
            time += f" over {attempts} attempts"
        parts.append(time)
    else:
        parts.append(f"{_duration(seconds)} training (device count not recorded)")
    tokens = float(cost.get("tokens_trained") or 0)
    rate = float(cost.get("tokens_per_second") or 0.0)
    parts.append(f"{_count(tokens)} tokens at {_count(rate)} tokens/s")
    return "; ".join(parts)

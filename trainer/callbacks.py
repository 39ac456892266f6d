"""Trainer callbacks: progress reporting and SIGTERM (preemption) handling."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("loraplane.trainer")

ProgressCallback = Callable[[dict[str, float]], None]


class ProgressReporter(TrainerCallback):  # type: ignore[misc]
    """One structured log line per logging step (``train progress``), and the same event to ``on_log``."""

    def __init__(self, on_log: ProgressCallback | None, *, is_main: bool) -> None:
        self.sink = on_log
        self.is_main = is_main
        self.tokens_at_start = 0  # a resumed run starts with the count restored from its checkpoint

    def _emit(self, state: Any, logs: dict[str, Any]) -> None:
        if not self.is_main:
            return
        event = {"step": float(state.global_step), "max_steps": float(state.max_steps)}
        event.update({k: float(v) for k, v in logs.items() if isinstance(v, int | float)})
        log.info("train progress", extra=event)
        if self.sink is not None:
            self.sink(event)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.tokens_at_start = int(state.num_input_tokens_seen)
        self._emit(state, {})  # announces max_steps (and the resumed step) before the first step

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if logs:
            self._emit(state, logs)


class PreemptionHandler(TrainerCallback):  # type: ignore[misc]
    """On SIGTERM, finish the current optimizer step, save a checkpoint and stop.

    Kubernetes sends SIGTERM on preemption, eviction and node drain, then SIGKILL after the pod's
    ``terminationGracePeriodSeconds``; one step plus one adapter-sized checkpoint must fit in it. Under
    torchrun every rank gets the signal, but not necessarily at the same step: the flag is all-reduced
    so that all ranks save the same step together (a save is a collective operation).
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.stopped_at: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested.is_set():
            log.warning("SIGTERM: saving a checkpoint after the current step, then stopping")
        self.requested.set()

    def _agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.requested.is_set()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return flag

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if self.stopped_at is None and self._agreed():
            self.stopped_at = int(state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control


class TrainingClock(TrainerCallback):  # type: ignore[misc]
    """The training wall time of a run across its attempts (``loraplane.trainer.cost``).

    ``seconds_before``/``attempts_before`` come from the checkpoint the run resumes from; each
    checkpoint this attempt saves records the total so far, on the main process."""

    def __init__(self, *, is_main: bool, seconds_before: float = 0.0, attempts_before: int = 0) -> None:
        self.is_main = is_main
        self.seconds_before = seconds_before
        self.attempts = attempts_before + 1
        self._started: float | None = None

    @property
    def attempt_seconds(self) -> float:
        return 0.0 if self._started is None else time.monotonic() - self._started

    @property
    def total_seconds(self) -> float:
        return self.seconds_before + self.attempt_seconds

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._started = time.monotonic()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.is_main:
            return
        from pathlib import Path

        from loraplane.trainer.cost import write_checkpoint_cost

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():  # best effort: a missing record only undercounts a resumed run
            try:
                write_checkpoint_cost(checkpoint, train_seconds=self.total_seconds, attempts=self.attempts)
            except OSError as exc:
                log.warning("cannot record the training time in the checkpoint", extra={"error": str(exc)})

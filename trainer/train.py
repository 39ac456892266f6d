"""One training job: check everything cheap, train (resuming if a checkpoint exists), publish atomically.

Order of work, so that a bad input costs seconds and not GPU hours:

1. the configuration (already validated), the MLflow tracking server it names (one quick request,
   ``loraplane.trainer.tracking``), the hardware it asks for (QLoRA and FSDP need CUDA);
2. the tokenizer and every data row (``loraplane.trainer.data``): any structural error stops here;
3. the run directory: a new run, a resumable one (same base model, LoRA shape and dataset), or a
   refusal when its checkpoints belong to a different job;
4. the model, training, and publishing of ``<adapters_root>/<name>/<version>/`` through a staging
   directory renamed in one step: the adapters root holds either nothing or a complete adapter.

Under ``torchrun`` every rank runs this function; the global rank 0 alone writes the run state,
checkpoint markers, deletes old checkpoints, publishes and reports progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import staged_directory
from loraplane.trainer.checkpoints import (
    RUN_FILE,
    Checkpoint,
    ResumeRefusedError,
    RunState,
    check_resumable,
    clear_checkpoints,
    fingerprint_for,
    new_run,
    scan,
    set_partial_aside,
)
from loraplane.trainer.config import TrainJobConfig
from loraplane.trainer.data import PreparedData, load_tokenizer, prepare_datasets
from loraplane.trainer.exit_codes import DoNotRetryError, PreemptedError
from loraplane.trainer.tracking import TENSORBOARD_DIR

log = logging.getLogger("loraplane.trainer")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")


@dataclass(frozen=True)
class PublishedAdapter:
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    already_published: bool = False


@dataclass(frozen=True)
class _Plan:
    run: RunState
    resume_from: Checkpoint | None
    published: PublishedAdapter | None  # the same job already finished: nothing to do


def next_version(adapters_root: Path, name: str) -> str:
    """``v1`` for a new adapter, else one more than the highest published ``vN``."""
    existing = [p.name for p in (adapters_root / name).glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return f"v{max((int(v[1:]) for v in existing), default=0) + 1}"


def config_digest(config: TrainJobConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _world() -> tuple[int, int]:
    """(global rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _plan_run(config: TrainJobConfig, data: PreparedData) -> _Plan:
    """Decide, on rank 0, whether this job starts a run, resumes one, or was already done."""
    out = config.output
    run_dir = out.resolved_run_dir
    fingerprint = fingerprint_for(config, data.sha256)
    digest = config_digest(config)
    complete, partial = scan(run_dir)
    state_file = run_dir / RUN_FILE
    previous = RunState.from_file(state_file) if state_file.is_file() else None

    if previous is None and (complete or partial):
        raise ResumeRefusedError(
            f"{run_dir} holds checkpoints but no {RUN_FILE}: they were not written by a loraplane run",
            hint="point output.run_dir at an empty or new directory",
        )
    if previous is not None and previous.status == "running" and _published_by(previous, out.adapters_root):
        # Killed after the rename that published the adapter, before run.json said so.
        previous = previous.published()
        previous.save(run_dir)
        clear_checkpoints(run_dir)
    if previous is not None and previous.status == "published":
        target = out.adapters_root / previous.name / previous.version
        manifest_path = target / "manifest.json"
        if (
            previous.config_sha256 == digest
            and previous.fingerprint == fingerprint
            and manifest_path.is_file()
        ):
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("run_id") == previous.run_id:
                log.warning(
                    "this job already published its adapter; nothing to do",
                    extra={"adapter": f"{previous.name}@{previous.version}", "run_id": previous.run_id},
                )
                done = PublishedAdapter(previous.name, previous.version, target, manifest, True)
                return _Plan(previous, None, done)
        clear_checkpoints(run_dir)  # the last run is finished and published: a new run starts
        previous = None
    if previous is not None:  # an interrupted run
        if out.name != previous.name or (out.version is not None and out.version != previous.version):
            raise ResumeRefusedError(
                f"{run_dir} belongs to the unfinished run of {previous.name}@{previous.version}, "
                f"not {out.name}@{out.version or '(next version)'}",
                hint="finish that run (restart it with its own config), or use another output.run_dir",
            )
        diffs = fingerprint.differences(previous.fingerprint)
        if diffs:
            raise ResumeRefusedError(
                f"refusing to resume the unfinished run in {run_dir} with a different job:\n  "
                + "\n  ".join(diffs),
                hint="restore the original base model / LoRA settings / dataset, or point "
                "output.run_dir at a new directory to start a new run",
            )
        if config.checkpoints.resume == "never" and complete:
            raise ResumeRefusedError(
                f"{run_dir} holds {len(complete)} checkpoint(s) of an unfinished run and "
                "checkpoints.resume is 'never'",
                hint="set checkpoints.resume=auto to continue it, or use another output.run_dir",
            )
        if partial:
            set_partial_aside(partial)
        sweep_staging(out.adapters_root / previous.name, previous.version)
        resume_from = complete[-1] if complete else None
        if resume_from is not None:
            check_resumable(resume_from, previous)
            log.warning(
                "resuming from checkpoint",
                extra={"checkpoint": str(resume_from.path), "step": resume_from.step},
            )
        run = RunState(**{**previous.__dict__, "config_sha256": digest})
        run.save(run_dir)
        return _Plan(run, resume_from, None)

    version = out.version or next_version(out.adapters_root, out.name)
    target = out.adapters_root / out.name / version
    if target.exists():
        raise InvalidInputError(
            f"adapter {out.name}@{version} already exists at {target}",
            hint="published versions are immutable: leave output.version unset to get the next free one",
        )
    run = new_run(out.name, version, fingerprint, digest)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)  # an earlier run's event files
    run_dir.mkdir(parents=True, exist_ok=True)
    run.save(run_dir)
    return _Plan(run, None, None)


def _published_by(run: RunState, adapters_root: Path) -> bool:
    """Whether ``run``'s adapter version exists and its manifest names this run."""
    manifest_path = adapters_root / run.name / run.version / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(manifest, dict) and manifest.get("run_id") == run.run_id


def sweep_staging(adapter_dir: Path, version: str) -> list[Path]:
    """Remove staging directories a killed publish of ``version`` left behind (never a published one).

    The version belongs to this run (recorded in run.json when the run started), so no other job
    publishes it: its ``.vN.staging-*`` siblings are debris of an earlier attempt of this same run.
    """
    removed = []
    for stale in sorted(adapter_dir.glob(f".{version}.staging-*")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
            log.warning("removed an interrupted publish", extra={"staging": str(stale)})
    return removed


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def require_writable(*directories: Path) -> None:
    """Raise InvalidInputError (exit 2: do not retry) unless this user can create or write each
    directory; creates nothing.

    A permission error is not transient: a Job that retries it fails the same way each time (a
    hostPath volume ignores the pod's fsGroup; a volume written by another user)."""
    for directory in directories:
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing == directory and not directory.is_dir():
            raise InvalidInputError(f"output directory {directory} exists and is not a directory")
        if os.access(existing, os.W_OK | os.X_OK):
            continue
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise InvalidInputError(
            f"cannot write to {directory} (as uid {os.getuid()}, gid {os.getgid()}): "
            + (f"{existing} is on a read-only file system" if read_only else f"{existing} is not writable"),
            hint="mount the shared volume read-write for the trainer"
            if read_only
            else "make the directory writable for this user: on Kubernetes the pod's fsGroup (volumes that "
            "honour it) or a chown of the volume's directory; or set output.adapters_root / output.run_dir "
            "to a writable place",
        )


def _with_local_base_model(config: TrainJobConfig) -> TrainJobConfig:
    """An ``hf://`` or ``s3://`` base model is fetched (once, onto the models root, see
    loraplane.common.model_fetch) and trained from its directory; every rank calls this, the
    fetch lock lets one download and the others find the model there."""
    from loraplane.common.model_fetch import ensure_model

    spec = config.base_model
    local = ensure_model(spec.path, revision=spec.revision, field="base_model.path", say=log.info)
    if local == spec.path:
        return config
    return config.model_copy(update={"base_model": spec.model_copy(update={"path": local})})


def _with_local_dataset(config: TrainJobConfig) -> TrainJobConfig:
    """An ``s3://`` dataset.url is downloaded next to the run (``RUN_DIR/data/<etag>/``, found there
    on a resume) and trained from that file; its sha256 is recorded like any file's."""
    url = config.dataset.url
    if url is None:
        return config
    from loraplane.common.model_fetch import fetch_object

    local = fetch_object(url, config.output.resolved_run_dir / "data", field="dataset.url", say=log.info)
    dataset = config.dataset.model_copy(update={"url": None, "path": local})
    return config.model_copy(update={"dataset": dataset})


def train_and_publish(
    config: TrainJobConfig, *, on_log: Any = None, handle_sigterm: bool = True
) -> PublishedAdapter:
    """Validate, train (resuming when possible) and publish ``<adapters_root>/<name>/<version>/``.

    Raises InvalidInputError (exit 2, do not retry) for bad config/data/model or a foreign run
    directory, PreemptedError (exit 75) after SIGTERM once a checkpoint is saved, and
    LoraplaneError (exit 1) for failures a retry may fix. The experiment-tracking runs it started
    (``tracking:``, loraplane.trainer.tracking) end FINISHED, KILLED (preempted) or FAILED accordingly.
    """
    from loraplane.trainer.tracking import RunTracking

    tracking = RunTracking(config, config.output.resolved_run_dir, is_main=_world()[0] == 0)
    try:
        published = _train_and_publish(config, tracking, on_log=on_log, handle_sigterm=handle_sigterm)
    except BaseException as exc:
        tracking.end(exc)
        raise
    tracking.end(None)
    return published


def _train_and_publish(
    config: TrainJobConfig, tracking: Any, *, on_log: Any, handle_sigterm: bool
) -> PublishedAdapter:
    rank, world_size = _world()
    is_main = rank == 0
    # tracking's packages; on rank 0 the MLflow server must answer, before a base model is fetched
    tracking.check()
    config = _with_local_base_model(config)
    config = _with_local_dataset(config)
    from loraplane.trainer.dpo import resolve_base_adapter

    config, base_adapter = resolve_base_adapter(config)  # method: dpo from NAME@vN; cheap, no torch
    # The heavy imports come after the cheap config checks of the caller, not at module import.
    from loraplane.trainer.sft import check_hardware

    check_hardware(config, world_size=world_size)
    if is_main:  # before any model or data is read: a volume this user cannot write never will be
        require_writable(config.output.adapters_root, config.output.resolved_run_dir)
    tokenizer = load_tokenizer(config.base_model)
    t = config.training
    data = prepare_datasets(
        config.dataset,
        tokenizer,
        max_seq_length=t.max_seq_length,
        assistant_only_loss=t.assistant_only_loss,
        seed=t.seed,
        method=config.method,
    )
    run_dir = config.output.resolved_run_dir

    from loraplane.trainer.callbacks import PreemptionHandler, ProgressReporter
    from loraplane.trainer.sft import build_trainer, training_args

    # Building the arguments sets up torch.distributed under torchrun (gloo on CPU, nccl on GPUs).
    _ = training_args(config, run_dir, has_eval=data.eval is not None).device
    plan = _plan_run(config, data) if is_main else None
    _barrier()
    if not is_main:  # the other ranks follow the plan rank 0 wrote
        plan = _follow_plan(config)
    assert plan is not None
    if plan.published is not None:
        return plan.published
    # rank 0: the MLflow run (reopened when this run resumes), active for the Trainer's callback
    tracking.start(config, f"{plan.run.name}@{plan.run.version}", plan.run.run_id, data.sha256)

    progress = ProgressReporter(on_log, is_main=is_main)
    preemption = PreemptionHandler()
    if config.method == "dpo":
        from loraplane.trainer.dpo import build_trainer as build_dpo_trainer

        trainer = build_dpo_trainer(
            config,
            tokenizer,
            data.train.usable,
            data.eval.usable if data.eval else None,
            run_dir,
            callbacks=[progress, preemption],
            base_adapter=base_adapter,
        )
    else:
        trainer = build_trainer(
            config,
            tokenizer,
            data.train.usable,
            data.eval.usable if data.eval else None,
            run_dir,
            callbacks=[progress, preemption],
        )
    tracking.attach(trainer)  # TensorBoard event files into RUN_DIR/tensorboard, every attempt
    trainer.loraplane_run = plan.run
    trainer.loraplane_protect = plan.resume_from.path if plan.resume_from else None
    clock = _clock(plan, is_main=is_main)
    trainer.add_callback(clock)
    if handle_sigterm:
        preemption.install()
    started = time.monotonic()
    try:
        result = trainer.train(
            resume_from_checkpoint=str(plan.resume_from.path) if plan.resume_from else None
        )
    except ValueError as exc:  # trl/peft reject bad settings (e.g. unknown target modules)
        raise DoNotRetryError(f"training failed: {exc}") from exc
    finally:
        preemption.uninstall()
    seconds = time.monotonic() - started
    if preemption.stopped_at is not None:
        saved = run_dir / f"checkpoint-{preemption.stopped_at}"
        raise PreemptedError(
            f"stopped by SIGTERM at step {preemption.stopped_at}; checkpoint {saved} is complete "
            "and the next start resumes from it"
        )

    history: list[dict[str, Any]] = list(trainer.state.log_history)
    losses = [float(e["loss"]) for e in history if "loss" in e]
    final_loss = losses[-1] if losses else float(result.training_loss)
    if not math.isfinite(final_loss):
        raise DoNotRetryError(
            f"training diverged (loss={final_loss}); nothing was published",
            hint="lower training.learning_rate or raise training.warmup_ratio",
        )
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    tokens_this_run = tokens_seen - progress.tokens_at_start
    metrics: dict[str, float] = {
        "steps": float(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "final_train_loss": final_loss,
        "train_seconds": round(seconds, 2),
        "tokens_seen": float(tokens_seen),
        "tokens_per_second": round(tokens_this_run / seconds, 1) if seconds > 0 else 0.0,
        "resumed_from_step": float(plan.resume_from.step if plan.resume_from else 0),
    }
    from loraplane.trainer.cost import cost_record

    # GPU-seconds from the launcher's view: the processes torchrun started (one device each) times the
    # training wall time of every attempt (loraplane.trainer.cost).
    cost = cost_record(
        devices=world_size,
        accelerator=str(trainer.args.device.type),
        train_seconds=clock.seconds_before + seconds,
        attempt_seconds=seconds,
        attempts=clock.attempts,
        tokens_trained=tokens_seen,
        attempt_tokens=tokens_this_run,
    )
    if data.eval is not None:
        eval_loss = float(trainer.evaluate()["eval_loss"])
        from loraplane.trainer.publish import perplexity

        metrics["eval_loss"] = eval_loss
        if config.method == "sft":  # a DPO loss is not a token NLL: it has no perplexity
            metrics["eval_perplexity"] = perplexity(eval_loss)
        history = list(trainer.state.log_history)
    if config.method == "dpo":
        from loraplane.trainer.dpo import dpo_metrics

        metrics.update(dpo_metrics(history))

    tracking.close_writers(trainer)
    final_dir = run_dir / "final"
    if is_main and final_dir.exists():
        shutil.rmtree(final_dir)
    _barrier()
    trainer.save_model(str(final_dir))  # every rank calls it (FSDP gathers); rank 0 writes
    _barrier()
    target = config.output.adapters_root / plan.run.name / plan.run.version
    published = None
    if is_main:
        published = _publish(
            config,
            plan.run,
            trainer,
            final_dir,
            target,
            data,
            metrics,
            history,
            base_adapter=base_adapter,
            cost=cost,
            tracking=tracking,
        )
    _barrier()
    if published is None:  # other ranks: report what rank 0 published
        manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
        published = PublishedAdapter(plan.run.name, plan.run.version, target, manifest)
    return published


def _clock(plan: _Plan, *, is_main: bool) -> Any:
    """The run's training clock, carrying on from the time recorded in the checkpoint it resumes from."""
    from loraplane.trainer.callbacks import TrainingClock
    from loraplane.trainer.cost import read_checkpoint_cost

    before, attempts = read_checkpoint_cost(plan.resume_from.path) if plan.resume_from else (0.0, 0)
    if plan.resume_from is not None and attempts == 0:
        attempts = 1  # resumed from a checkpoint without a record: at least one attempt came before
    return TrainingClock(is_main=is_main, seconds_before=before, attempts_before=attempts)


def _follow_plan(config: TrainJobConfig) -> _Plan:
    run_dir = config.output.resolved_run_dir
    run = RunState.from_file(run_dir / RUN_FILE)
    complete, _ = scan(run_dir)
    if run.status == "published":
        target = config.output.adapters_root / run.name / run.version
        manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
        return _Plan(run, None, PublishedAdapter(run.name, run.version, target, manifest, True))
    return _Plan(run, complete[-1] if complete else None, None)


def _publish(
    config: TrainJobConfig,
    run: RunState,
    trainer: Any,
    final_dir: Path,
    target: Path,
    data: PreparedData,
    metrics: dict[str, float],
    history: list[dict[str, Any]],
    *,
    base_adapter: Any = None,
    cost: dict[str, Any] | None = None,
    tracking: Any = None,
) -> PublishedAdapter:
    from loraplane.trainer.publish import (
        build_manifest,
        chat_template_record,
        write_loss_plot,
        write_metrics_jsonl,
    )

    run_dir = config.output.resolved_run_dir
    metrics["run_wall_seconds"] = round(
        (datetime.now(UTC) - datetime.fromisoformat(run.started_at)).total_seconds(), 1
    )
    dataset_info = {
        "source": data.train.source,
        "sha256": data.sha256,
        "rows": data.train.rows,
        "examples": len(data.train.usable),
        "dropped_over_length": data.train.dropped_over_length,
        "trained_tokens_per_epoch": data.train.trained_tokens,
        "tokens_per_epoch": data.train.total_tokens,
        "eval_source": data.eval.source if data.eval else None,
        "eval_examples": len(data.eval.usable) if data.eval else 0,
    }
    try:
        with staged_directory(target) as staging:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(final_dir / name, staging / name)
            write_metrics_jsonl(staging / "metrics.jsonl", history)
            write_loss_plot(staging / "loss.png", history, f"{run.name}@{run.version}")
            if tracking is not None:
                tracking.publish_tensorboard(staging)  # <version>/tensorboard/: event files
            manifest = build_manifest(
                config,
                version=run.version,
                run_id=run.run_id,
                staging=staging,
                base_commit=getattr(trainer.model.config, "_commit_hash", None),
                base_files_sha256=run.fingerprint.base_files,
                data=dataset_info,
                metrics=metrics,
                base_adapter=base_adapter.to_manifest() if base_adapter is not None else None,
                chat_template=chat_template_record(getattr(trainer, "processing_class", None), config),
            )
            if cost is not None:
                manifest["cost"] = cost  # GPU-seconds, tokens trained, tokens/s (loraplane.trainer.cost)
            if tracking is not None:
                manifest["tracking"] = tracking.manifest_record()  # event files, MLflow / W&B runs
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        raise LoraplaneError(
            f"{target} appeared while this run was training; published versions are never overwritten",
            hint=f"the run's adapter is still in {final_dir}; rerun with another output.version",
        ) from None
    run.published().save(run_dir)
    clear_checkpoints(run_dir)
    shutil.rmtree(final_dir, ignore_errors=True)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)  # published with the adapter
    log.info("published adapter", extra={"adapter": f"{run.name}@{run.version}", "path": str(target)})
    if tracking is not None:
        tracking.published(manifest, target)  # final metrics and the manifest to the MLflow run
    return PublishedAdapter(name=run.name, version=run.version, path=target, manifest=manifest)

"""Experiment tracking (``tracking:`` in the training config) through the Trainer's own integrations.

transformers' callbacks do the logging (``report_to``); this module decides where, owns the runs' life
cycle, and records them with the adapter:

- **TensorBoard** (default on): ``TensorBoardCallback`` writes event files to ``RUN_DIR/tensorboard/``
  while the run trains. Every attempt of a run (a resume after SIGTERM or a crash) writes to that one
  directory, so TensorBoard shows one curve (it drops the steps a killed attempt logged past the
  checkpoint the next one resumed from). The directory is published with the adapter, in the same
  staged rename, as ``<version>/tensorboard/``: event files only, no pickles.
- **MLflow**: rank 0 checks the tracking server before any data or model is loaded (an unreachable
  server fails the run in seconds, naming the URI), creates the run once the version is known, and
  makes it the active run, so that ``MLflowCallback`` logs the Trainer's arguments, the model config and
  every logged step to it (loraplane adds the LoRA shape, base model and dataset digest as params).
  The run id is kept in ``RUN_DIR/tracking.json``: a resumed attempt reopens the same run. After
  publishing, the final metrics, cost and ``manifest.json`` are logged and the run ends ``FINISHED``;
  a preempted attempt ends it ``KILLED``, a failed one ``FAILED``. The manifest's ``tracking.mlflow``
  names the run, and ``loraplane adapters eval`` logs its results to it (:func:`log_eval_to_mlflow`).
- **Weights & Biases** (untested: it needs W&B's service): the run is created with ``wandb.init``
  (id = loraplane's run id, ``resume="allow"``) and ``WandbCallback`` logs to it.

Everything here imports mlflow / wandb lazily: the CLI never pays for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import atomic_write_text
from loraplane.trainer.config import MlflowSpec, TrackingSpec, TrainJobConfig

log = logging.getLogger("loraplane.trainer")

TENSORBOARD_DIR = "tensorboard"  # in the run directory while training, then in the published version
TRACKING_FILE = "tracking.json"  # in the run directory: the MLflow run a resumed attempt reopens
PROBE_TIMEOUT_S = 10
RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_METRIC_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /:]")
_UNREACHABLE = ("ConnectionError", "Timeout", "TimeoutError", "ConnectionRefusedError")


def check_packages(tracking: TrackingSpec) -> None:
    """Refuse (exit 2) a tracking setting whose package is not installed, before anything is loaded."""
    wanted = [
        (
            "tensorboard",
            tracking.tensorboard,
            "tensorboard",
            "pip install 'loraplane[train]' (it includes tensorboard), or set tracking.tensorboard=false",
        ),
        (
            "mlflow",
            tracking.mlflow is not None,
            "mlflow",
            "pip install 'loraplane[track]' (the MLflow client), or remove tracking.mlflow",
        ),
        ("wandb", tracking.wandb is not None, "wandb", "pip install wandb, or remove tracking.wandb"),
    ]
    for field, on, module, hint in wanted:
        if on and importlib.util.find_spec(module) is None:
            raise InvalidInputError(
                f"tracking.{field} needs the {module} package, which is not installed", hint=hint
            )


@contextlib.contextmanager
def _one_quick_try() -> Iterator[None]:
    """MLflow's client retries a failed request with backoff for minutes; a probe tries once."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a connection failure or timeout, not an answer."""
    seen: BaseException | None = exc
    while seen is not None:
        # requests' ConnectionError / Timeout (and their subclasses), or the OS's own
        if any(cls.__name__ in _UNREACHABLE for cls in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out"))


def mlflow_error(uri: str, exc: Exception, *, doing: str) -> LoraplaneError:
    """The error to raise when the tracking server at ``uri`` failed ``doing``."""
    reason = getattr(exc, "message", None) or str(exc)
    if _unreachable(exc):
        return LoraplaneError(  # a server that is down may come back: a retry (exit 1) may succeed
            f"tracking.mlflow.uri: cannot reach the MLflow tracking server at {uri} ({doing}): "
            f"{reason.splitlines()[0][:300]}",
            hint=f"start the server (mlflow server --host 0.0.0.0 --port PORT) or make {uri} reachable from "
            "the trainer, or fix tracking.mlflow.uri; remove tracking.mlflow to train without MLflow",
        )
    return InvalidInputError(
        f"tracking.mlflow.uri: the MLflow tracking server at {uri} refused {doing}: {reason[:500]}",
        hint="check that the URI is an MLflow tracking server, and set MLFLOW_TRACKING_TOKEN (or "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) in the trainer's environment if it "
        "needs them",
    )


def experiment_name(config: TrainJobConfig) -> str:
    spec = config.tracking.mlflow
    return (spec.experiment if spec and spec.experiment else None) or config.output.name


def probe_mlflow(spec: MlflowSpec, experiment: str) -> None:
    """One quick request to the tracking server: raise (naming the URI) unless it answers."""
    from mlflow.tracking import MlflowClient

    with _one_quick_try():
        try:
            MlflowClient(tracking_uri=spec.uri).get_experiment_by_name(experiment)
        except Exception as exc:
            raise mlflow_error(spec.uri, exc, doing="before training: nothing was trained") from None


@dataclass(frozen=True)
class MlflowRun:
    uri: str
    experiment: str
    experiment_id: str
    run_id: str
    run_name: str

    def to_manifest(self) -> dict[str, str]:
        return asdict(self)


def _config_params(config: TrainJobConfig, dataset_sha256: str) -> dict[str, str]:
    """What the Trainer's own MLflow params lack: the LoRA shape, the base model and the data."""
    params: dict[str, Any] = {
        "loraplane.method": config.method,
        "base_model.path": config.base_model.path,
        "base_model.revision": config.base_model.revision,
        "base_model.quantization": config.base_model.quantization,
        "dataset.sha256": dataset_sha256,
        "training.batching": config.training.batching,
        "training.max_seq_length": config.training.max_seq_length,
        **{f"lora.{k}": v for k, v in config.lora.model_dump(mode="json").items()},
    }
    if config.method == "dpo":
        params.update({f"dpo.{k}": v for k, v in config.dpo.model_dump(mode="json").items()})
        params["base_adapter"] = config.base_adapter
    return {k: str(v)[:6000] for k, v in params.items()}


class RunTracking:
    """The tracking runs of one training job in this process (rank 0 holds them; other ranks none)."""

    def __init__(self, config: TrainJobConfig, run_dir: Path, *, is_main: bool) -> None:
        self.config = config
        self.run_dir = run_dir
        self.is_main = is_main
        self.mlflow: MlflowRun | None = None
        self.wandb: dict[str, Any] | None = None
        self._restore_env: dict[str, str | None] = {}  # what start() changed, put back by end()

    # --- before training ---------------------------------------------------------------------------

    def check(self) -> None:
        """Packages on every rank; the MLflow server from rank 0 (before any data or model is read)."""
        check_packages(self.config.tracking)
        spec = self.config.tracking.mlflow
        if self.is_main and spec is not None:
            probe_mlflow(spec, experiment_name(self.config))

    def start(
        self, config: TrainJobConfig, run_name: str, loraplane_run_id: str, dataset_sha256: str
    ) -> None:
        """Create (or, for a resumed run, reopen) the runs and make them the Trainer's. ``config`` is
        the job as it trains (a local base model path, a DPO base adapter's LoRA shape)."""
        self.config = config
        if not self.is_main:
            return
        if self.config.tracking.mlflow is not None:
            self.mlflow = self._start_mlflow(run_name, loraplane_run_id, dataset_sha256)
        if self.config.tracking.wandb is not None:
            self.wandb = self._start_wandb(run_name, loraplane_run_id, dataset_sha256)

    def _start_mlflow(self, default_name: str, loraplane_run_id: str, dataset_sha256: str) -> MlflowRun:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        spec = self.config.tracking.mlflow
        assert spec is not None
        experiment = experiment_name(self.config)
        client = MlflowClient(tracking_uri=spec.uri)
        run = self._recorded_mlflow_run(client, spec.uri, experiment, loraplane_run_id)
        if run is None:
            try:
                found = client.get_experiment_by_name(experiment)
                if found is not None:
                    experiment_id = found.experiment_id
                else:
                    try:
                        experiment_id = client.create_experiment(experiment)
                    except Exception:  # created meanwhile by another run
                        again = client.get_experiment_by_name(experiment)
                        if again is None:
                            raise
                        experiment_id = again.experiment_id
                name = spec.run_name or default_name
                tags = {
                    **spec.tags,
                    "loraplane.adapter": default_name,
                    "loraplane.run_id": loraplane_run_id,
                    "loraplane.method": self.config.method,
                }
                created = client.create_run(experiment_id, run_name=name, tags=tags)
                params = _config_params(self.config, dataset_sha256)
                client.log_batch(created.info.run_id, params=[Param(k, v) for k, v in params.items()])
            except LoraplaneError:
                raise
            except Exception as exc:
                raise mlflow_error(spec.uri, exc, doing="creating the run") from None
            run = MlflowRun(spec.uri, experiment, experiment_id, created.info.run_id, name)
            atomic_write_text(
                self.run_dir / TRACKING_FILE,
                json.dumps({"run_id": loraplane_run_id, "mlflow": run.to_manifest()}, indent=2) + "\n",
            )
            log.info("MLflow run created", extra={"mlflow_run_id": run.run_id, "uri": spec.uri})
        # The Trainer's MLflowCallback logs to the active run and leaves it open (we end it); an
        # MLFLOW_RUN_ID or MLFLOW_NESTED_RUN in the environment would make it start another one.
        for key in ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN"):
            if key in os.environ:
                self._restore_env[key] = os.environ.pop(key)
                log.warning("%s is ignored: the run is tracking.mlflow's", key)
        # MLflow's client retries a failed request for about four minutes (7 retries, 120 s timeout):
        # a server that goes away mid-run would hold the end of the run that long per queued batch.
        # Training does not wait for it (the callback logs asynchronously); the end of the run waits at
        # most about a minute. A value set in the environment wins.
        for key, value in RETRY_DEFAULTS.items():
            if key not in os.environ:
                self._restore_env[key] = None
                os.environ[key] = value
        mlflow.set_tracking_uri(spec.uri)
        try:
            mlflow.start_run(run_id=run.run_id)
        except Exception as exc:
            raise mlflow_error(spec.uri, exc, doing=f"reopening run {run.run_id}") from None
        return run

    def _recorded_mlflow_run(
        self, client: Any, uri: str, experiment: str, loraplane_run_id: str
    ) -> MlflowRun | None:
        """The MLflow run an earlier attempt of this same run created, if it is still there."""
        path = self.run_dir / TRACKING_FILE
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            previous = MlflowRun(**recorded["mlflow"]) if recorded.get("run_id") == loraplane_run_id else None
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if previous is None or previous.uri != uri or previous.experiment != experiment:
            return None
        try:
            stage = client.get_run(previous.run_id).info.lifecycle_stage
        except Exception as exc:
            if _unreachable(exc):
                raise mlflow_error(uri, exc, doing=f"reopening run {previous.run_id}") from None
            stage = "gone"
        if stage != "active":
            log.warning(
                "the MLflow run of the earlier attempt is deleted or gone; starting a new one",
                extra={"mlflow_run_id": previous.run_id},
            )
            return None
        log.warning(
            "continuing the MLflow run of the earlier attempt", extra={"mlflow_run_id": previous.run_id}
        )
        return previous

    def _start_wandb(self, default_name: str, loraplane_run_id: str, dataset_sha256: str) -> dict[str, Any]:
        import wandb

        spec = self.config.tracking.wandb
        assert spec is not None
        local = self.run_dir / "wandb"
        local.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            name=spec.run_name or default_name,
            id=loraplane_run_id,  # a resumed attempt continues the same W&B run
            resume="allow",
            tags=spec.tags or None,
            config=_config_params(self.config, dataset_sha256),
            dir=str(local),
        )
        return {"project": spec.project, "entity": run.entity, "run_id": run.id, "url": run.url}

    def attach(self, trainer: Any) -> None:
        """Point the Trainer's TensorBoard callback at ``RUN_DIR/tensorboard`` (one directory for
        every attempt; transformers' default is a new ``runs/<time>_<host>`` each time)."""
        if not self.config.tracking.tensorboard:
            return
        from transformers.integrations import TensorBoardCallback

        found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]
        if not found:
            raise LoraplaneError("tracking.tensorboard is on but the Trainer has no TensorBoard callback")
        for callback in found:
            callback.logging_dir = str(self.run_dir / TENSORBOARD_DIR)

    # --- after training ----------------------------------------------------------------------------

    @staticmethod
    def close_writers(trainer: Any) -> None:
        """Close the TensorBoard writers (the evaluation after training reopens one) before publishing."""
        from transformers.integrations import TensorBoardCallback

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None

    def publish_tensorboard(self, staging: Path) -> None:
        """Copy the event files into the staging directory of the version being published."""
        events = self.run_dir / TENSORBOARD_DIR
        if self.config.tracking.tensorboard and events.is_dir():
            shutil.copytree(events, staging / TENSORBOARD_DIR)

    def manifest_record(self) -> dict[str, Any]:
        """The manifest's ``tracking``: where the event files are, and the runs."""
        return {
            "tensorboard": TENSORBOARD_DIR if self.config.tracking.tensorboard else None,
            "mlflow": self.mlflow.to_manifest() if self.mlflow else None,
            "wandb": self.wandb,
        }

    def published(self, manifest: dict[str, Any], path: Path) -> None:
        """Log what was published (final metrics, cost, the manifest) to the runs. The adapter is
        published already: a tracking server that fails now is a warning, not a failed run."""
        if self.mlflow is not None:
            try:
                import mlflow

                with _one_quick_try():  # gone since training started: say so now, not after retries
                    mlflow.tracking.MlflowClient(tracking_uri=self.mlflow.uri).get_run(self.mlflow.run_id)
                finals = {f"final/{k}": v for k, v in manifest.get("metrics", {}).items()}
                finals.update({f"cost/{k}": v for k, v in (manifest.get("cost") or {}).items()})
                numbers = {
                    k: float(v)
                    for k, v in finals.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                }
                step = int(manifest.get("metrics", {}).get("steps", 0))
                mlflow.log_metrics(numbers, step=step)
                mlflow.set_tags(
                    {
                        "loraplane.adapter_path": str(path),
                        "loraplane.weights_sha256": str(manifest.get("weights_sha256")),
                    }
                )
                mlflow.log_dict(manifest, "loraplane/manifest.json")
            except Exception as exc:
                log.warning(
                    "the adapter is published, but logging it to MLflow failed: %s",
                    exc,
                    extra={"uri": self.mlflow.uri, "mlflow_run_id": self.mlflow.run_id},
                )
        if self.wandb is not None:
            try:
                import wandb

                if wandb.run is not None:
                    wandb.run.summary.update(
                        {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, int | float)}
                    )
            except Exception as exc:
                log.warning("the adapter is published, but logging it to W&B failed: %s", exc)

    def end(self, error: BaseException | None) -> None:
        """End the runs: FINISHED, KILLED (preempted, interrupted) or FAILED. Never raises."""
        from loraplane.trainer.exit_codes import PreemptedError

        killed = isinstance(error, PreemptedError | KeyboardInterrupt)
        if self.mlflow is not None:
            status = "FINISHED" if error is None else "KILLED" if killed else "FAILED"
            try:
                import mlflow

                if mlflow.active_run() is not None:
                    # also waits for the queued asynchronous logging; MLflow prints the run's URL on
                    # stdout, which is the trainer's result line's
                    with contextlib.redirect_stdout(sys.stderr):
                        mlflow.end_run(status=status)
                    log.info(
                        "MLflow run ended",
                        extra={"status": status, "mlflow_run_id": self.mlflow.run_id, "uri": self.mlflow.uri},
                    )
            except Exception as exc:
                log.warning(
                    "could not end the MLflow run: %s",
                    exc,
                    extra={"uri": self.mlflow.uri, "mlflow_run_id": self.mlflow.run_id},
                )
        if self.wandb is not None:
            try:
                import wandb

                wandb.finish(exit_code=0 if error is None else 1)
            except Exception as exc:
                log.warning("could not finish the W&B run: %s", exc)
        for key, value in self._restore_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._restore_env = {}


# --- evaluations -------------------------------------------------------------------------------------


def _metric_key(*parts: str) -> str:
    return "/".join(_METRIC_KEY_CHARS.sub("_", p) for p in parts)[:250]


def eval_metrics(scores: dict[str, dict[str, dict[str, float | None]]], passed: bool) -> dict[str, float]:
    """``eval/DATASET/ROLE/METRIC`` for every finite figure of a suite run, and ``eval/gate_passed``."""
    metrics = {"eval/gate_passed": 1.0 if passed else 0.0}
    for dataset, roles in scores.items():
        for role, figures in roles.items():
            for name, value in figures.items():
                if value is not None and math.isfinite(value):
                    metrics[_metric_key("eval", dataset, role, name)] = float(value)
    return metrics


def mlflow_run_of(manifest: dict[str, Any]) -> MlflowRun | None:
    """The MLflow run a version's manifest names (``tracking.mlflow``), if any."""
    tracking = manifest.get("tracking")
    record = tracking.get("mlflow") if isinstance(tracking, dict) else None
    if not isinstance(record, dict):
        return None
    try:
        return MlflowRun(
            **{k: str(record[k]) for k in ("uri", "experiment", "experiment_id", "run_id", "run_name")}
        )
    except KeyError:
        return None


def log_eval_to_mlflow(
    manifest: dict[str, Any],
    *,
    scores: dict[str, dict[str, dict[str, float | None]]],
    passed: bool,
    suite: str,
    report: dict[str, Any],
    files: Sequence[Path] = (),
    step: int = 0,
    on_warning: Callable[[str], None] | None = None,
) -> MlflowRun | None:
    """Log an evaluation of a version to the MLflow run that trained it (the manifest's
    ``tracking.mlflow``): every figure as ``eval/DATASET/ROLE/METRIC`` at ``step`` (the version's
    evaluation count), the report as ``evals/<suite>-<step>.json`` (and ``files``, e.g. its Markdown and
    chart, under ``evals/``), and tags with the verdict. Returns the run, or None when the manifest names
    none. The evaluation is recorded in the registry already: a failure here is a warning."""
    run = mlflow_run_of(manifest)
    if run is None:
        return None
    warn = on_warning or log.warning
    if importlib.util.find_spec("mlflow") is None:
        warn(
            f"not logged to MLflow run {run.run_id} at {run.uri}: the mlflow package is not installed "
            "(pip install 'loraplane[track]')"
        )
        return None
    try:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run.uri)
        with _one_quick_try():  # a server that is gone costs seconds, not minutes of retries
            client.get_run(run.run_id)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in eval_metrics(scores, passed).items()]
        tags = [RunTag("loraplane.eval.suite", suite), RunTag("loraplane.eval.passed", str(passed).lower())]
        client.log_batch(run.run_id, metrics=metrics, tags=tags, synchronous=True)
        client.log_dict(run.run_id, report, f"evals/{_metric_key(suite)}-{step}.json")
        for path in files:
            if path.is_file():
                client.log_artifact(run.run_id, str(path), artifact_path="evals")
    except Exception as exc:
        warn(
            f"the evaluation is recorded, but logging it to MLflow run {run.run_id} at {run.uri} failed: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
        )
        return None
    log.info("evaluation logged to MLflow", extra={"mlflow_run_id": run.run_id, "uri": run.uri})
    return run

"""Where a training run happens, and the whole ``train submit`` workflow as one library call.

Two backends (:data:`Backend`): ``local`` runs the trainer as a process on this machine and
registers what it publishes in the local registry (``platform/training_local.py``); ``kubernetes``
creates a Job from the release's training template (``platform/training_k8s.py``) and, when asked to
wait, follows it and registers the version it published in the cluster's registry. Which one runs is
decided in one place, :func:`training_backend`: the registry the settings name (a version must be
registered where the servers read it).

    from loraplane.common.settings import Settings
    from loraplane.platform.training import train

    outcome = train(Settings(registry="kubernetes", namespace="ml"), Path("train.yaml"), wait=True)
    print(outcome.registered.ref if outcome.registered else outcome.job)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.registry.model import AdapterVersion

Backend = Literal["local", "kubernetes"]
DAY_S = 24 * 3600.0


def training_backend(settings: Settings) -> Backend:
    """The one place that maps the settings to where training runs."""
    return "kubernetes" if settings.registry == "kubernetes" else "local"


@dataclass
class TrainOutcome:
    """What one ``train`` call did: where, which Job (cluster), how it ended, what it registered."""

    backend: Backend
    adapter: str  # the adapter's name (cluster, before it published) or NAME@vN once registered
    job: str | None = None
    namespace: str | None = None
    state: str | None = None  # Succeeded, Failed; None: submitted and not waited for
    registered: AdapterVersion | None = None
    created: bool = False  # False: this version was registered before, with the same weights
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend, "adapter": self.adapter}
        if self.job is not None:
            out |= {"job": self.job, "namespace": self.namespace}
        if self.state is not None:
            out["state"] = self.state
        if self.registered is not None:
            out["registered"] = {
                "ref": self.registered.ref,
                "path": self.registered.path,
                "new": self.created,
            }
        return out


class TrainingRunFailedError(LoraplaneError):
    """A training Job ended Failed (exit 1); the message says why and where its log is."""


def train(
    settings: Settings,
    config: Path,
    overrides: list[str] | None = None,
    *,
    release: str = "platform",
    wait: bool = False,
    timeout: float = DAY_S,
    on_submitted: Callable[[TrainOutcome], None] | None = None,
) -> TrainOutcome:
    """Train an adapter and register it where the servers read it.

    Local: runs the trainer here (always waits) and registers the published version. Kubernetes:
    validates the config, creates the Job and returns, or with ``wait`` follows it for up to
    ``timeout`` seconds and registers the published version exactly once (``on_submitted`` is called
    in between, e.g. to say the Job exists). Raises :class:`TrainingRunFailedError` when the Job failed.
    """
    if training_backend(settings) == "local":
        from loraplane.platform.training_local import train_locally

        local = train_locally(settings, config, overrides or [])
        return TrainOutcome(
            "local", local.adapter.ref, state="Succeeded", registered=local.adapter, created=local.registered
        )
    from loraplane.platform.training_k8s import (
        published_result,
        register_published,
        submit_training,
        wait_for_training,
    )

    run = submit_training(settings, config, overrides or [], release=release)
    outcome = TrainOutcome("kubernetes", run.adapter, job=run.job, namespace=run.namespace)
    if not wait:
        return outcome
    if on_submitted is not None:
        on_submitted(outcome)
    final = wait_for_training(settings, run.job, timeout=timeout)
    outcome.state = final.state
    if final.state != "Succeeded":
        raise TrainingRunFailedError(
            f"training Job {run.job} failed: {final.reason}: {final.message}",
            hint=f"see its log: loraplane --registry kubernetes -n {run.namespace} train logs {run.job}",
        )
    outcome.registered, outcome.created = register_published(
        settings, published_result(settings, run.job), job=run.job
    )
    return outcome


@dataclass
class RunStatus:
    """``train status``: the Job's state and, once it succeeded, what was registered from it."""

    status: Any  # training_k8s.TrainingStatus
    registered: AdapterVersion | None = None
    created: bool = False
    register_error: str | None = None  # the status stands; the next call tries again

    def registered_dict(self) -> dict[str, Any] | None:
        if self.register_error is not None:
            return {"error": self.register_error}
        if self.registered is None:
            return None
        return {"ref": self.registered.ref, "path": self.registered.path, "new": self.created}


def training_run_status(settings: Settings, job: str, *, register: bool = True) -> RunStatus:
    """The state of the cluster's training Job ``job``; a succeeded run's adapter is registered
    (once: a later call finds it registered) unless ``register`` is False. A registration that fails
    leaves the status standing, with the reason in ``register_error``."""
    from loraplane.platform.training_k8s import published_result, register_published, training_status

    result = RunStatus(training_status(settings, job))
    if register and result.status.state == "Succeeded":
        try:
            result.registered, result.created = register_published(
                settings, published_result(settings, job), job=job
            )
        except LoraplaneError as exc:
            result.register_error = str(exc)
    return result

"""Exit codes of the training job, chosen so that a Kubernetes Job's ``podFailurePolicy`` can act on them.

- ``0``  the adapter is published (or was already published by an earlier attempt of the same run);
- ``1``  a failure that a retry may fix (out of memory, a lost node, a crash): let the Job retry;
- ``2``  DO NOT RETRY: the data, the configuration or the base model is wrong, or the run directory holds
  checkpoints of a different run. The same input fails the same way; the chart maps it to ``FailJob``;
- ``75`` preempted (SIGTERM): a complete checkpoint was saved and the next attempt resumes from it
  (``EX_TEMPFAIL`` from sysexits.h: "temporary failure; the user is invited to retry");
- ``76`` a multi-node run lost its rendezvous host (pod 0, which holds torchrun's c10d store): this
  pod's own work was fine; it stops so that the gang restarts with a new pod 0 and resumes from the
  newest complete checkpoint. Written by ``loraplane.trainer.elastic``, the launcher of multi-node
  pods; the chart ignores it in the retry budget (pod 0's own failure is counted, or not, by its rule).
"""

from __future__ import annotations

from loraplane.common.errors import InvalidInputError, LoraplaneError

SUCCESS = 0
FAILED = 1
DO_NOT_RETRY = InvalidInputError.exit_code  # 2, the same code every loraplane command uses for bad input
PREEMPTED = 75
PEER_LOST = 76


class PreemptedError(LoraplaneError):
    """Training stopped on SIGTERM after saving a checkpoint; a restart resumes from it."""

    exit_code = PREEMPTED


class DoNotRetryError(LoraplaneError):
    """A failure that the same input reproduces (e.g. the loss diverged): retrying wastes GPU time."""

    exit_code = DO_NOT_RETRY

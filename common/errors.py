"""Errors every component raises, the exit codes they map to, and how a validation error is shown.

Every error a user can act on is a :class:`LoraplaneError` (it says what is wrong, where, and what
to do); the CLI prints it and exits with its ``exit_code``, one of :class:`ExitCode`::

    FAILED 1      LoraplaneError itself; common.kube.KubernetesError, serving.client.ServerError,
                  a failed training run, a Helm error
    BAD_INPUT 2   InvalidInputError and its subclasses (ConfigError: one line per field;
                  common.adapter_dir.AdapterPreflightError; the trainer's data errors), and
                  registry.model.RegistryError, registry.version_states.TransitionRefusedError,
                  serving.client.AdapterError, platform.helm_release.HelmValuesError
    REFUSED 3     registry.model.IntegrityError (weights changed since registration),
                  platform.adapters.PromotionRefusedError (the gate failed)
    CONFLICT 4    registry.model.ConflictError (another command moved the alias meanwhile)

Ctrl-C exits ``INTERRUPTED`` (130). The trainer's own exit codes (75 preempted, 76 lost pod 0, ...)
are in ``trainer/exit_codes.py``: the Job's podFailurePolicy reads them.
"""

from __future__ import annotations

from enum import IntEnum

from pydantic import ValidationError


class ExitCode(IntEnum):
    """What the ``loraplane`` command exits with."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    REFUSED = 3
    CONFLICT = 4
    INTERRUPTED = 130


class LoraplaneError(Exception):
    """An error the user can act on: ``str(err)`` says what is wrong, where, and what to do.

    ``exit_code`` is what the CLI exits with: 2 for bad input (config, dataset, adapter),
    1 for everything else (a server that is down, a failed run).
    """

    exit_code: int = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InvalidInputError(LoraplaneError):
    """Bad input: a config value, a dataset line, an adapter directory."""

    exit_code = ExitCode.BAD_INPUT


class ConfigError(InvalidInputError):
    """A configuration file or option is invalid."""


def format_validation_error(exc: ValidationError, *, source: str) -> ConfigError:
    """Turn pydantic's error into one line per field: ``field: got VALUE; MESSAGE``."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown field (remove it, or check its spelling)")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required field is missing (add it)")
        else:
            lines.append(f"  {loc}: got {shown}; {msg}")
    return ConfigError("\n".join(lines))

"""Errors every component raises, and how a pydantic validation error is shown to a user."""

from __future__ import annotations

from pydantic import ValidationError


class LoraplaneError(Exception):
    """An error the user can act on: ``str(err)`` says what is wrong, where, and what to do.

    ``exit_code`` is what the CLI exits with: 2 for bad input (config, dataset, adapter),
    1 for everything else (a server that is down, a failed run).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InvalidInputError(LoraplaneError):
    """Bad input: a config value, a dataset line, an adapter directory."""

    exit_code = 2


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

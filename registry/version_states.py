"""The life cycle of an adapter version: its states, the commands that move it, and what is refused.

Declared once, here, as a table; every command of :mod:`loraplane.platform.adapters` (and ``sync``,
through :func:`loraplane.registry.model.mark_serving`) asks :func:`transition` before it changes
anything. Pure: no registry, no server, no I/O. docs/cli.md shows the same machine as a table and a
diagram.

States (``AdapterVersion.state``)::

    registered --load/eval-load/promote/rollback/sync--> serving
    serving    --unload--> registered            (stopped: not served again until a load)
    registered --unload--> registered            (stopped; a no-op when it already is)
    registered --retire--> retired
    serving    --retire--> retired               (retired is terminal)

A load failure reported by a server (``AdapterVersion.failure``) is not a state: it is what the last
load attempt of one server said. It does not change what replicas should serve, and every command
treats the version by its state alone; a successful load clears it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from loraplane.common.errors import ExitCode, LoraplaneError

VersionState = Literal["registered", "serving", "retired"]
Command = Literal["register", "load", "sync", "eval", "promote", "rollback", "unload", "retire"]

# (command, state before) -> state after. A pair that is not here is refused.
# ``None`` before: the version is not registered yet.
TRANSITIONS: Final[Mapping[tuple[Command, VersionState | None], VersionState]] = {
    ("register", None): "registered",
    ("load", "registered"): "serving",
    ("load", "serving"): "serving",
    ("sync", "registered"): "serving",  # a sync that loaded it on every replica records it as a load
    ("sync", "serving"): "serving",
    ("eval", "registered"): "registered",  # the record itself; the evaluation loads it first (a load)
    ("eval", "serving"): "serving",
    ("promote", "registered"): "serving",  # every replica loads it before the alias moves
    ("promote", "serving"): "serving",
    ("rollback", "registered"): "serving",
    ("rollback", "serving"): "serving",
    ("unload", "registered"): "registered",  # stopped: neither a restart nor sync loads it again
    ("unload", "serving"): "registered",
    ("retire", "registered"): "retired",
    ("retire", "serving"): "retired",
    ("retire", "retired"): "retired",  # a no-op, said so
}

# Refused while an alias points at the version: users would lose what they ask for by name.
NEEDS_NO_ALIAS: Final[frozenset[Command]] = frozenset({"unload", "retire"})

_VERB: Final[Mapping[Command, str]] = {
    "register": "registered again",
    "load": "loaded",
    "sync": "loaded by sync",
    "eval": "evaluated",
    "promote": "promoted",
    "rollback": "rolled back to",
    "unload": "unloaded (it is not served)",
    "retire": "retired",
}


class TransitionRefusedError(LoraplaneError):
    """The version's state does not allow the command; nothing was changed."""

    exit_code = ExitCode.BAD_INPUT


class RetiredError(TransitionRefusedError):
    """The version is retired, and retired is terminal."""


class AliasedVersionError(TransitionRefusedError):
    """The command would take away a version an alias points at."""


@dataclass(frozen=True)
class Transition:
    command: Command
    before: VersionState | None
    after: VersionState
    noop: bool  # True: nothing to record (the version is already where the command would put it)


def transition(
    command: Command,
    before: VersionState | None,
    *,
    ref: str,
    aliases: Sequence[str] = (),
    servable: bool = True,
    path: str | None = None,
) -> Transition:
    """What ``command`` does to a version in state ``before``, or the refusal (raised).

    ``aliases``: the ``NAME:ALIAS`` names that point at the version. ``servable``: whether replicas
    should serve it now (a ``registered`` version stopped by ``unload`` is not); only ``unload`` asks.
    ``path``: the version's directory, named in the hint of a refusal of a retired version.
    """
    if before == "retired" and command != "retire":
        name = ref.split("@", 1)[0]
        hint = (
            "to serve these weights again, register them as a new version: "
            f"loraplane adapters register {path or 'PATH'} --name {name} --version vN"
        )
        if command == "rollback":
            hint = f"roll back to another version (loraplane adapters rollback {name} --to vN), or {hint}"
        raise RetiredError(
            f"{ref} is retired, and retired is terminal: it cannot be {_VERB[command]}", hint=hint
        )
    after = TRANSITIONS.get((command, before))
    if after is None:
        if before is None:
            raise TransitionRefusedError(
                f"{ref} is not registered", hint="register it first: loraplane adapters register PATH"
            )
        raise TransitionRefusedError(f"{ref} is {before}: it cannot be {_VERB[command]}")
    if command in NEEDS_NO_ALIAS and aliases:
        shown = ", ".join(aliases)
        raise AliasedVersionError(
            f"cannot {command} {ref}: {shown} point{'s' if len(aliases) == 1 else ''} at it",
            hint=f"promote another version to {shown} first (or roll it back)",
        )
    if command == "unload":
        noop = before == "registered" and not servable
    elif command in ("load", "sync", "retire"):
        noop = before == after
    else:  # eval, promote, rollback, register record their own event
        noop = False
    return Transition(command=command, before=before, after=after, noop=noop)


__all__ = [
    "NEEDS_NO_ALIAS",
    "TRANSITIONS",
    "AliasedVersionError",
    "Command",
    "RetiredError",
    "Transition",
    "TransitionRefusedError",
    "VersionState",
    "transition",
]

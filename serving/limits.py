"""The limits of the server an adapter will run on, read from that server rather than assumed.

vLLM does not publish its ``--max-lora-rank`` over HTTP, so they come from what started it:

- local mode: the state file of the supervisor serving ``settings.server_url`` (``server_state.py``),
  written by ``python -m loraplane.serving`` / ``loraplane serve``;
- Kubernetes: the vLLM container's arguments in the release's pods (the chart renders
  ``--max-lora-rank=N`` from ``serving.maxLoraRank``).

When neither is known (a server started by hand), ``settings.max_lora_rank`` applies.
"""

from __future__ import annotations

import logging

from loraplane.common.errors import LoraplaneError
from loraplane.common.settings import Settings
from loraplane.serving.capacity import cpu_lora_capacity
from loraplane.serving.server_state import ServerLimits, find_local_server

log = logging.getLogger("loraplane.serving")


def _flag(args: list[str], name: str) -> int | None:
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
        else:
            continue
        try:
            return int(value)
        except ValueError:
            return None
    return None


def limits_from_args(args: list[str]) -> ServerLimits | None:
    """The limits in a ``python -m loraplane.serving`` (or vLLM) command line; None without a rank."""
    rank = _flag(args, "--max-lora-rank")
    if rank is None:
        return None
    return ServerLimits(
        max_lora_rank=rank,
        max_loras=_flag(args, "--max-loras") or 1,
        max_cpu_loras=_flag(args, "--max-cpu-loras"),
        max_model_len=_flag(args, "--max-model-len") or 0,
    )


def server_limits(settings: Settings, url: str | None = None) -> ServerLimits | None:
    """The limits of the server at ``url`` (default ``settings.server_url``), when they can be known."""
    if settings.registry == "kubernetes":
        from loraplane.serving.replicas import vllm_container_args

        try:
            args = vllm_container_args(settings, release=settings.release)
        except LoraplaneError as exc:
            log.info("cannot read the vLLM pods' limits", extra={"why": exc.message})
            return None
        return limits_from_args(args) if args else None
    state = find_local_server(settings.home, url or settings.server_url)
    return state.limits if state else None


def adapter_capacity(settings: Settings, url: str | None = None) -> int | None:
    """How many adapters the server at ``url`` holds at most (``serving/capacity.py``); None when
    its limits are not known (a server started by hand: vLLM's own default then applies, unchecked)."""
    limits = server_limits(settings, url)
    return cpu_lora_capacity(limits.max_loras, limits.max_cpu_loras) if limits else None


def max_lora_rank(settings: Settings, url: str | None = None) -> int:
    """The rank limit an adapter must fit on the server at ``url``."""
    limits = server_limits(settings, url)
    return limits.max_lora_rank if limits else settings.max_lora_rank

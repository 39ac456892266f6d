"""Run vLLM as a child, then load the registry's adapters into it one by one; never let one stop it.

``python -m loraplane.serving`` with a registry becomes this supervisor (in a pod it is the
container's main process):

1. starts vLLM with no adapter, in a process group of its own, guarded by a watchdog
   (``process_group.py``): whatever kills the supervisor, vLLM's engine does not outlive it;
2. waits for ``/health``, then serves the registry's servable versions. With the Kubernetes
   registry a reconciler thread (``replica_reconciler.py``) watches the ``LoraAdapter`` objects and
   keeps this server serving exactly that set as it changes, reporting in the objects' status; with
   the local registry every servable version is loaded once at runtime (``rehydrate.py``). Either way
   a version that fails is skipped, named in the log with its reason and recorded;
3. writes its state file (``server_state.py``) at each step: ``starting`` -> ``loading`` ->
   ``ready`` (every servable version tried) -> ``stopped``. The readiness probe reads it;
4. forwards SIGTERM/SIGINT/SIGHUP to vLLM (which drains for ``--shutdown-timeout``), waits for it,
   kills what is left of its group and exits with vLLM's exit code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import httpx

from loraplane.common.settings import Settings
from loraplane.serving.base_model import BaseModelFacts
from loraplane.serving.capacity import cpu_lora_capacity
from loraplane.serving.launcher import VLLMServerConfig, flag_value
from loraplane.serving.process_group import ProcessGroup, start_watchdog
from loraplane.serving.rehydrate import rehydrate_at_runtime
from loraplane.serving.replica_metrics import ReplicaMetrics
from loraplane.serving.replica_reconciler import ReplicaReconciler
from loraplane.serving.replica_reconciler import start as start_reconciler
from loraplane.serving.server_state import ServerLimits, ServerState

log = logging.getLogger("loraplane.serving")


def _say(message: str) -> None:
    print(f"[loraplane.serving] {message}", file=sys.stderr, flush=True)  # noqa: T201


def _wait_healthy(group: ProcessGroup, url: str, stopping: threading.Event, timeout: float) -> bool:
    """True once ``/health`` answers 200; False when vLLM exits, a stop is asked or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, verify=url.startswith("https://"), trust_env=False) as client:
        while time.monotonic() < deadline and not stopping.is_set():
            if group.poll() is not None:
                return False
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            stopping.wait(0.5)
    if not stopping.is_set() and group.poll() is None:
        _say(f"vLLM did not become healthy within {timeout:.0f}s; stopping it")
    return False


def supervise(
    config: VLLMServerConfig,
    settings: Settings,
    *,
    state_path: Path,
    base: BaseModelFacts | None,
    startup_timeout: float = 1800.0,
    stop_grace: float = 30.0,
    metrics_port: int = 0,
) -> int:
    """Run vLLM per ``config`` and serve the registry's adapters (``settings``); return vLLM's exit code.

    ``metrics_port``: with the Kubernetes registry, serve the reconciler's Prometheus metrics
    (``replica_metrics.py``) on ``config.host:metrics_port`` from the start (0: not served).
    """
    local_url = f"http://127.0.0.1:{config.port}" if config.host in ("0.0.0.0", "::") else config.url
    state = ServerState(
        url=local_url,
        model=config.model,
        served_model_name=config.served_model_name,
        chat_template=flag_value(config.extra_args, "--chat-template"),
        limits=ServerLimits(
            max_lora_rank=config.max_lora_rank,
            max_loras=config.max_loras,
            max_cpu_loras=cpu_lora_capacity(config.max_loras, config.max_cpu_loras),
            max_model_len=config.max_model_len,
        ),
        adapters_root=str(settings.adapters_dir),
    )
    state.write(state_path)
    group = ProcessGroup(config.argv(), env=config.env())
    watchdog = start_watchdog([group.pid], grace=stop_grace)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        group.signal(signal.SIGTERM)  # vLLM drains in-flight requests, then exits

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    code: int | None = None
    reconciler: ReplicaReconciler | None = None
    metrics: ReplicaMetrics | None = None
    if metrics_port and settings.registry == "kubernetes":
        metrics = ReplicaMetrics()  # served before vLLM is up: loraplane_replica_ready 0 says it is not
        metrics.serve(metrics_port, host=config.host)
    try:
        healthy = _wait_healthy(group, local_url, stopping, startup_timeout)
        if healthy and settings.registry == "kubernetes":
            state.phase = "loading"
            state.write(state_path)
            reconciler = ReplicaReconciler(
                settings.model_copy(update={"server_url": local_url}),
                local_url,
                pod=_server_name(),
                state=state,
                state_path=state_path,
                on_first_pass=lambda served: _say(
                    f"serving {len(served.loaded)} registered adapter version(s) (loaded at runtime)"
                    + "".join(f"\n  not serving {name}: {why}" for name, why in served.failed.items())
                    + "; watching the registry for changes"
                ),
                metrics=metrics,
            )
            start_reconciler(reconciler, stopping)
        elif healthy:
            state.phase = "loading"
            state.write(state_path)
            result = asyncio.run(
                rehydrate_at_runtime(
                    settings.model_copy(update={"server_url": local_url}),
                    local_url,
                    base=base,
                    server=_server_name(),
                    capacity=cpu_lora_capacity(config.max_loras, config.max_cpu_loras),
                    stop=stopping.is_set,
                )
            )
            state.loaded, state.failed = result.loaded, result.skipped
            state.phase = "ready"
            state.write(state_path)
            failed = "".join(f"\n  not serving {name}: {why}" for name, why in result.skipped.items())
            _say(f"serving {len(result.loaded)} registered adapter version(s) (loaded at runtime){failed}")
        code = group.process.wait()
    finally:
        stopping.set()
        if group.poll() is None:
            code = group.stop(grace=stop_grace)
        if reconciler is not None:
            reconciler.withdraw()
        if metrics is not None:
            metrics.ready.set(0)
            metrics.close()
        group.reap()  # the engine core and helpers of a vLLM that exited or was killed
        watchdog.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        state.phase = "stopped"
        state.write(state_path)
    return 0 if code is None else (code if code >= 0 else 128 - code)


def _server_name() -> str:
    """This server in a load-failure record: the pod's name in a cluster, else host:pid."""
    import os
    import socket

    return os.environ.get("POD_NAME") or f"{socket.gethostname()}:{os.getpid()}"

"""``loraplane serve``: vLLM and the gateway on this machine, serving the local registry.

Two processes, each the leader of a process group of its own and both guarded by a watchdog
(``serving/process_group.py``), so Ctrl-C, ``kill`` or even ``kill -9`` of ``loraplane serve``
leaves neither vLLM (nor its engine) nor the gateway behind:

- the vLLM supervisor, ``python -m loraplane.serving --registry-home HOME``: it starts vLLM on
  loopback and loads every servable registered version at runtime, skipping (and recording) any
  that fails;
- the gateway, ``python -m loraplane.serving.gateway``: the OpenAI-compatible endpoint users and
  their clients call, with aliases (``NAME:prod``), client keys and metrics; vLLM's admin routes
  are not reachable through it.

Keys are made once and kept under ``HOME/serving/`` (mode 0600): the gateway's client key, which
users put in their OpenAI client, and vLLM's own key, which the CLI's admin commands (``adapters
load|promote|sync``) read from there when ``LORAPLANE_API_KEY`` is not set.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
from pydantic import BaseModel, ConfigDict, Field

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import atomic_write_text
from loraplane.common.settings import Settings, vllm_key_path
from loraplane.serving.process_group import ProcessGroup, Watchdog, start_watchdog
from loraplane.serving.server_state import ServerState, read_state, state_path_for

log = logging.getLogger("loraplane.platform")

DEFAULT_MAX_MODEL_LEN = 2048


class ServeOptions(BaseModel):
    """What ``loraplane serve`` starts; every engine value has a default safe on a laptop's CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Base model: a local directory or a hub id (already in the HF cache).")
    served_model_name: str = Field(default="base", description="Name clients use for the base model.")
    host: str = Field(default="127.0.0.1", description="Where the gateway listens (vLLM: always loopback).")
    port: int = Field(default=8080, ge=1, le=65535, description="The gateway's port (what users call).")
    vllm_port: int = Field(default=8000, ge=1, le=65535, description="vLLM's port, on 127.0.0.1 only.")
    max_loras: int = Field(default=4, ge=1)
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description="Adapters the server holds at most (vLLM --max-cpu-loras); None: serving/capacity.py's.",
    )
    max_lora_rank: int = 16
    max_model_len: int | None = Field(default=None, ge=16, description="None: the model's, at most 2048.")
    max_num_seqs: int = Field(default=16, ge=1)
    dtype: str = "auto"
    kv_cache_gib: int = Field(
        default=1, ge=1, description="KV cache in GiB (CPU backend); 1 fits beside other programs."
    )
    startup_timeout: float = Field(default=900.0, gt=0)


@dataclass
class Endpoint:
    """Where users reach the running stack, and with which key."""

    url: str
    api_key: str
    base_model: str
    vllm_url: str
    state: ServerState
    home: Path


def _key(path: Path) -> str:
    """The key kept in ``path``, made on first use (0600)."""
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, key + "\n")
    path.chmod(0o600)
    return key


def client_key_path(home: Path) -> Path:
    return home / "serving" / "gateway-api-keys"


def model_max_len(model: str) -> int:
    """The model's own context length (``config.json``), at most DEFAULT_MAX_MODEL_LEN."""
    config = Path(model) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        positions = int(data.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    except (OSError, ValueError, TypeError):
        return DEFAULT_MAX_MODEL_LEN
    return max(16, min(positions, DEFAULT_MAX_MODEL_LEN))


def supervisor_argv(settings: Settings, opts: ServeOptions, state_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "loraplane.serving",
        "--model", opts.model, "--served-model-name", opts.served_model_name,
        "--host", "127.0.0.1", "--port", str(opts.vllm_port),
        "--max-loras", str(opts.max_loras), "--max-lora-rank", str(opts.max_lora_rank),
        "--max-model-len", str(opts.max_model_len or model_max_len(opts.model)),
        "--max-num-seqs", str(opts.max_num_seqs), "--dtype", opts.dtype,
        "--kv-cache-gib", str(opts.kv_cache_gib),
        *(["--max-cpu-loras", str(opts.max_cpu_loras)] if opts.max_cpu_loras else []),
        "--registry-home", str(settings.home), "--adapters-root", str(settings.adapters_dir),
        "--state-file", str(state_file), "--startup-timeout", str(opts.startup_timeout),
        "--shutdown-timeout", "5",
    ]  # fmt: skip


def gateway_argv(settings: Settings, opts: ServeOptions, vllm_url: str) -> list[str]:
    return [
        sys.executable, "-m", "loraplane.serving.gateway",
        "--upstream", vllm_url, "--home", str(settings.home), "--registry", "local",
        "--api-keys-file", str(client_key_path(settings.home)),
        "--upstream-api-key-file", str(vllm_key_path(settings.home)),
        "--host", opts.host, "--port", str(opts.port),
    ]  # fmt: skip


class LocalStack:
    """vLLM (through its supervisor) and the gateway, started and stopped together."""

    def __init__(self, settings: Settings, opts: ServeOptions) -> None:
        if settings.registry != "local":
            raise InvalidInputError(
                "loraplane serve runs the local mode; on Kubernetes the chart runs vLLM and the gateway",
                hint="drop --registry kubernetes, or use: loraplane install",
            )
        self.settings = settings
        self.opts = opts
        self.vllm_url = f"http://127.0.0.1:{opts.vllm_port}"
        self.state_file = state_path_for(settings.home, self.vllm_url)
        self.logs = settings.home / "logs"
        self.groups: list[ProcessGroup] = []
        self._watchdog: Watchdog | None = None

    def start(self) -> None:
        model = Path(self.opts.model).expanduser()
        looks_local = model.exists() or self.opts.model.startswith((".", "/", "~"))
        if looks_local and not (model / "config.json").is_file():
            raise InvalidInputError(
                f"--model {self.opts.model}: no model there (no config.json)",
                hint="give a model directory (e.g. loraplane demo build-model ./base-model) or a hub id",
            )
        vllm_key = _key(vllm_key_path(self.settings.home))
        _key(client_key_path(self.settings.home))
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_file.unlink(missing_ok=True)  # a state left by an earlier run says nothing of this one
        env = {**os.environ, "LORAPLANE_API_KEY": vllm_key}
        for name, argv in (
            ("vllm", supervisor_argv(self.settings, self.opts, self.state_file)),
            ("gateway", gateway_argv(self.settings, self.opts, self.vllm_url)),
        ):
            with (self.logs / f"{name}.log").open("ab") as log_file:
                self.groups.append(ProcessGroup(argv, env=env, stdout=log_file, stderr=log_file))
        self._watchdog = start_watchdog([g.pid for g in self.groups], grace=30.0)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.opts.host in ("0.0.0.0", "::") else self.opts.host
        return f"http://{host}:{self.opts.port}"

    def _check_alive(self) -> None:
        for group, name in zip(self.groups, ("vllm", "gateway"), strict=True):
            code = group.poll()
            if code is not None:
                tail = _tail(self.logs / f"{name}.log")
                raise LoraplaneError(
                    f"{'vLLM' if name == 'vllm' else 'the gateway'} exited with code {code}",
                    hint=f"see {self.logs / f'{name}.log'}:\n{tail}",
                )

    def wait_ready(
        self, on_phase: Callable[[str], None] = lambda _: None, stop: threading.Event | None = None
    ) -> Endpoint:
        """Until vLLM has tried every adapter and the gateway answers; raise if either exits (or
        KeyboardInterrupt when ``stop`` is set meanwhile)."""
        deadline = time.monotonic() + self.opts.startup_timeout
        phase = ""
        with httpx.Client(timeout=2.0, verify=False, trust_env=False) as client:
            while time.monotonic() < deadline:
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                self._check_alive()
                state = read_state(self.state_file)
                if state is not None and state.phase != phase:
                    phase = state.phase
                    on_phase(phase)
                if state is not None and state.phase == "ready":
                    try:
                        if client.get(f"{self.url}/health").status_code == 200:
                            key = _key(client_key_path(self.settings.home))
                            name = self.opts.served_model_name
                            return Endpoint(self.url, key, name, self.vllm_url, state, self.settings.home)
                    except httpx.HTTPError:
                        pass
                time.sleep(0.5)
        raise LoraplaneError(
            f"the server was not ready within {self.opts.startup_timeout:.0f}s",
            hint=f"see {self.logs / 'vllm.log'} and {self.logs / 'gateway.log'}",
        )

    def wait(self, stop: threading.Event) -> None:
        """Until ``stop`` is set or a process exits (then LoraplaneError with its log's tail)."""
        while not stop.wait(1.0):
            self._check_alive()

    def stop(self) -> None:
        for group in reversed(self.groups):  # the gateway first: no request reaches a stopping vLLM
            group.stop(grace=30.0)
        if self._watchdog is not None:
            self._watchdog.close()
        self.groups = []


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def serve_forever(
    settings: Settings,
    opts: ServeOptions,
    *,
    on_phase: Callable[[str], None],
    on_ready: Callable[[Endpoint], None],
) -> None:
    """Start the stack, report readiness, and run until SIGINT/SIGTERM; always stop what it started."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stack = LocalStack(settings, opts)
    try:
        stack.start()
        endpoint = stack.wait_ready(on_phase, stop)
        on_ready(endpoint)
        stack.wait(stop)
    finally:
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

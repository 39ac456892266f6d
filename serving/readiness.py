"""``python -m loraplane.serving.readiness``: is this vLLM server ready for traffic?

Ready means, all within ``--timeout`` seconds:

1. ``GET /health`` answers 200;
2. a one-token completion on the base model succeeds. vLLM V1 runs the engine in a separate
   process; ``/health`` only reports an engine that has died, so an engine that hangs (stopped,
   deadlocked, stuck in a kernel) still answers 200 there. The completion goes through the engine
   and catches it. A busy engine is not a hung one: when the completion waits in vLLM's queue past
   its share of the deadline but ``vllm:generation_tokens_total`` (``/metrics``) grew meanwhile, the
   engine is making progress and the server stays ready (taking the only replica out of rotation
   for being loaded would turn load into an outage);
3. with ``--state-file`` (what the chart passes): the supervisor (``python -m loraplane.serving``)
   has tried every servable adapter version, and every version the registry says is *served*
   (state ``serving``: loaded or promoted; a new registration never changes readiness) that did not
   fail to load on this server is listed in ``/v1/models``. With the Kubernetes registry that set is
   the one the pod's reconciler last saw (``required`` in the state file): the probe makes no
   Kubernetes API call. A version that failed here (recorded
   with its reason in the state file and the registry) is never required: one bad adapter must not
   take the replica out of rotation. Without ``--state-file``, every servable version of the
   registry (``--registry-home DIR`` or ``--registry kubernetes --namespace NS``) whose files pass
   their checks here is required.

Exit 0 when ready (stdout says "ready", or "ready (busy: ...)"); exit 1 with a one-line reason on
stderr. The chart runs it as the vLLM
container's exec readinessProbe, so it imports neither torch nor vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from loraplane.registry.model import AdapterVersion
    from loraplane.serving.server_state import ServerState

DEFAULT_TIMEOUT_S = 10.0
FINISH_S = 0.25  # of the deadline, kept to give the verdict after the completion's budget ran out


class NotReady(Exception):
    """Why the server is not ready (one line)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from loraplane.common.config_defaults import field_default
    from loraplane.common.settings import Settings

    p = argparse.ArgumentParser(prog="python -m loraplane.serving.readiness", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the vLLM server")
    p.add_argument("--api-key-file", type=Path, help="file holding vLLM's API key (default: $VLLM_API_KEY)")
    p.add_argument("--base-model", required=True, help="served name of the base model")
    p.add_argument("--registry-home", type=Path, help="local registry: require its servable adapters")
    p.add_argument("--registry", choices=("local", "kubernetes"), help="registry backend")
    p.add_argument("--namespace", default=field_default(Settings, "namespace"))
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for all checks")
    p.add_argument(
        "--adapters-root",
        type=Path,
        help="the server's adapters root (with --max-lora-rank): a version the server skipped at start "
        "for being outside it, above its rank limit or for another base is not required",
    )
    p.add_argument("--max-lora-rank", type=int, help="the server's --max-lora-rank (with --adapters-root)")
    p.add_argument(
        "--state-file",
        type=Path,
        help="the supervisor's state file (python -m loraplane.serving --state-file): not ready until it "
        "has tried every servable adapter; then only versions in the 'serving' state that did not fail "
        "on this server are required (a new registration never changes readiness)",
    )
    args = p.parse_args(argv)
    if (args.adapters_root is None) != (args.max_lora_rank is None):
        p.error("--adapters-root and --max-lora-rank go together: pass the server's values of both")
    return args


@dataclass(frozen=True)
class ServerLimits:
    """What the server itself checks at start (``python -m loraplane.serving``) beyond the files."""

    adapters_root: Path
    max_lora_rank: int


def supervisor_state(path: Path) -> ServerState:
    """The supervisor's state when it has tried every servable adapter; else NotReady saying where it is."""
    from loraplane.serving.server_state import read_state

    state = read_state(path)
    if state is None:
        raise NotReady(f"no server state at {path} yet: the server is starting")
    if state.phase == "starting":
        raise NotReady("vLLM is starting")
    if state.phase == "loading":
        raise NotReady("loading the registry's adapters into vLLM")
    if state.phase == "stopped":
        raise NotReady("the server has stopped")
    return state


def required_adapters(
    args: argparse.Namespace, state: ServerState | None = None
) -> dict[str, AdapterVersion] | None:
    """Served name -> version, for every servable version; None when no registry was named.

    With the supervisor's ``state``: only versions the registry says are served (state ``serving``:
    loaded or promoted, not merely registered) and that did not fail to load on this server."""
    if args.registry_home is None and args.registry is None:
        return None
    from loraplane.common.settings import Settings
    from loraplane.registry.backends import open_registry
    from loraplane.serving.reconcile import servable_versions

    settings = Settings(
        home=args.registry_home or Path.home() / ".loraplane",
        registry=args.registry or "local",
        namespace=args.namespace,
    )
    servable = servable_versions(open_registry(settings).read())
    if state is None:
        return {v.served_name: v for v in servable}
    return {v.served_name: v for v in servable if v.state == "serving" and v.served_name not in state.failed}


async def generated_tokens(client: httpx.AsyncClient, budget: float) -> float | None:
    """vLLM's ``vllm:generation_tokens_total`` summed over its label sets; None when unreadable.

    ``/metrics`` is outside vLLM's API-key guard (it guards /v1 and a few other prefixes)."""
    try:
        reply = await client.get("/metrics", timeout=max(budget, 0.1))
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    values = [
        float(line.rsplit(None, 1)[1])
        for line in reply.text.splitlines()
        if line.startswith(("vllm:generation_tokens_total{", "vllm:generation_tokens_total "))
    ]
    return sum(values) if values else None


class TokenProgress:
    """``vllm:generation_tokens_total`` read again and again while the probe's completion waits.

    The readings are taken during the wait, not after it: on a CPU-only server that its own engine
    keeps busy, ``/metrics`` itself can take seconds to answer, so a reading after the completion's
    budget ran out might not fit the deadline any more.
    """

    INTERVAL_S = 0.5

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.readings: list[float] = []
        self.failed = 0

    async def sample_until_cancelled(self, until: float) -> None:
        while (left := until - time.monotonic()) > 0:
            started = time.monotonic()
            value = await generated_tokens(self.client, left)
            if value is None:
                self.failed += 1
            else:
                self.readings.append(value)
            await asyncio.sleep(max(0.0, self.INTERVAL_S - (time.monotonic() - started)))

    def generated(self) -> float | None:
        """Tokens generated between the first reading and the last; None without progress seen."""
        if len(self.readings) < 2 or self.readings[-1] <= self.readings[0]:
            return None
        return self.readings[-1] - self.readings[0]

    @property
    def attempts(self) -> int:
        return len(self.readings) + self.failed


async def check(
    url: str,
    *,
    base_model: str,
    api_key: str | None,
    timeout: float,
    required: dict[str, AdapterVersion | None] | None,
    limits: ServerLimits | None = None,
) -> str:
    """Raise NotReady saying why ``url`` is not ready; when it is, return "" or a note ("busy: ...")."""
    deadline = time.monotonic() + timeout
    note = ""

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NotReady(f"the checks did not finish within {timeout:g}s")
        return remaining

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Certificates only for https: loading the CA bundle costs about 50 ms of CPU, and seconds on a CPU-only
    # server whose engine keeps every core busy, which is when the probe matters most.
    tls = url.lower().startswith("https://")
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, verify=tls) as client:
        try:
            health = await client.get("/health", timeout=left())
        except httpx.TimeoutException:
            raise NotReady(f"vLLM /health at {url} did not answer within {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise NotReady(f"cannot reach vLLM at {url}: {type(exc).__name__}: {exc}") from None
        if health.status_code != 200:
            raise NotReady(f"vLLM /health answered HTTP {health.status_code}")
        listed: set[str] = set()
        cards: list[dict[str, Any]] = []
        if required is not None:  # before the completion, which may take the rest of the deadline
            try:
                models = await client.get("/v1/models", timeout=left())
            except httpx.HTTPError as exc:
                raise NotReady(f"GET /v1/models: {type(exc).__name__}: {exc}") from None
            if models.status_code != 200:
                raise NotReady(f"GET /v1/models answered HTTP {models.status_code}")
            cards = [m for m in models.json().get("data", []) if isinstance(m, dict) and "id" in m]
            listed = {str(m.get("id")) for m in cards}
        if deadline - time.monotonic() <= FINISH_S:
            spent = timeout - (deadline - time.monotonic())
            asked = "/health and /v1/models" if required is not None else "/health"
            raise NotReady(
                f"vLLM's {asked} took {spent:.3g}s of the {timeout:g}s budget: no time was left for the "
                "one-token completion (an overloaded API server, or a probe timeout too short)"
            )
        budget = left() - FINISH_S
        progress = TokenProgress(client)
        sampler = asyncio.create_task(progress.sample_until_cancelled(deadline - FINISH_S))
        reply: httpx.Response | None = None
        try:
            if budget <= 0:
                raise httpx.ReadTimeout("no time left for the completion")
            reply = await client.post(
                "/v1/completions",
                json={"model": base_model, "prompt": "ready", "max_tokens": 1, "temperature": 0},
                timeout=budget,
            )
        except httpx.TimeoutException:
            generated = progress.generated()
            if generated is None and len(progress.readings) < 2:
                raise NotReady(
                    f"a one-token completion on {base_model!r} did not finish within {budget:.3g}s, and "
                    "vLLM's /metrics did not answer often enough to tell a busy engine from a hung one "
                    f"({len(progress.readings)} of {progress.attempts} reads answered in time)"
                ) from None
            if generated is None:
                raise NotReady(
                    f"a one-token completion on {base_model!r} did not finish within {budget:.3g}s and "
                    "no token was generated meanwhile although /health answers 200: the engine is hung"
                ) from None
            note = (
                f"busy: the one-token completion waited over {budget:.3g}s in the queue while the engine "
                f"generated {generated:g} tokens"
            )
        except httpx.HTTPError as exc:
            raise NotReady(f"one-token completion on {base_model!r}: {type(exc).__name__}: {exc}") from None
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if reply is not None and reply.status_code != 200:
            raise NotReady(
                f"a one-token completion on {base_model!r} answered HTTP {reply.status_code}: "
                f"{reply.text.strip()[:200]}"
            )
    if required is None:
        return note
    missing = sorted(
        n for n, v in required.items() if n not in listed and (v is None or _servable_here(v, limits, cards))
    )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise NotReady(f"{len(missing)} registered adapter version(s) not loaded: {shown}")
    return note


def _servable_here(entry: AdapterVersion, limits: ServerLimits | None, cards: list[dict[str, Any]]) -> bool:
    """A version the server skipped at start because it fails its checks is not required: its files
    (always), and with ``limits`` also the adapters root, the rank limit and the served base, exactly
    as ``serving/rehydrate.py`` checks them; else one such version would keep the pod unready forever."""
    from loraplane.common.adapter_dir import check_adapter_files
    from loraplane.common.errors import LoraplaneError
    from loraplane.registry.model import verify_weights
    from loraplane.serving.client import ModelCard
    from loraplane.serving.preflight import preflight_adapter
    from loraplane.serving.reconcile import served_base

    try:
        verify_weights(entry)
        if limits is None:
            check_adapter_files(Path(entry.path))
        else:
            base = served_base([ModelCard.from_json(c) for c in cards])
            preflight_adapter(
                Path(entry.path),
                adapters_root=limits.adapters_root,
                max_lora_rank=limits.max_lora_rank,
                base=base,
            )
    except LoraplaneError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    api_key = os.environ.get("VLLM_API_KEY")
    try:
        if args.api_key_file is not None:
            api_key = args.api_key_file.read_text().strip()
        state = supervisor_state(args.state_file) if args.state_file is not None else None
        required: dict[str, AdapterVersion | None] | None
        if state is not None and state.required is not None:  # the reconciler's view: no remote call
            required = {name: None for name in state.required if name not in state.failed}
        else:
            required = dict(found) if (found := required_adapters(args, state)) is not None else None
        limits = (
            ServerLimits(args.adapters_root, args.max_lora_rank) if args.max_lora_rank is not None else None
        )
        note = asyncio.run(
            check(
                args.url,
                base_model=args.base_model,
                api_key=api_key,
                timeout=args.timeout,
                required=required,
                limits=limits,
            )
        )
    except NotReady as exc:
        print(f"not ready: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except Exception as exc:  # a registry that cannot be read, a key file that is missing: not ready
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"not ready: {type(exc).__name__}: {first}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"ready ({note})" if note else "ready")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

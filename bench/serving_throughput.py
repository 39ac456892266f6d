"""Multi-LoRA serving throughput on real vLLM CPU servers, and adapter hot-load (numbers, not a test).

Targets B2 and B3 (below); issue 4's benchmark. Configurations, each on its own freshly
started vLLM server (``serving/launcher.py``, prefix caching off so repeated rounds do equal work):

* **a**: base model, vLLM started *without* ``--enable-lora`` (all requests to the base model);
* **b**: ``--enable-lora --max-loras 4``, one adapter, all requests to it. This server is the
  *reference*: it stays up for the whole job and every other configuration is measured alternately
  with it, so each ratio is paired per round (same minute, same machine load);
* **c**: ``--max-loras 4`` with four adapters, requests spread **uniformly** and **skewed** (Zipf,
  exponent 1.5: 60/21/12/8 %) over them (Punica's popularity settings), on one server;
* **d**: eight adapters with ``--max-loras 2`` (``--max-cpu-loras 8``): adapters swap in and out of
  the two slots (uniform popularity);
* **e**: the gateway (``python -m loraplane.serving.gateway``, its own process, local registry) in
  front of b's server, asked for the adapter by its bare name (alias resolution on every request),
  against b's direct rounds.

Workload: fixed token-id prompts (seeded) of ``--input-len`` tokens, ``--output-len`` output tokens
per request (``ignore_eos``, greedy, streamed), ``--requests`` requests per round from
``--concurrency`` closed-loop workers. One warm-up round per arm is not measured (for c and d it
touches every adapter). Each phase alternates its arms for ``--rounds`` rounds, reversing the order
every other round (ABBA). Reported per arm: output tokens/s (median over rounds, min-max) and TTFT
p50/p99 over every request of the measured rounds. Ratios b/a, c/b, d/b and e/b are computed per
round (same round, seconds apart) and given as the median with a seeded bootstrap 95% interval over
rounds. The gateway's added latency is measured apart, after the other phases, on an idle b: single
requests (16-token prompt, 1 output token) alternately direct and through the gateway, 30 pairs; the
median of the paired TTFT differences with its interval is what the <= 5 ms target is read against
(under closed-loop load, TTFT is mostly queueing in vLLM and varies by hundreds of milliseconds).

Hot-load (B3), on b's server after the throughput phases: ``--hotloads`` times (without, then with
background traffic to b's adapter at concurrency 2) ``POST /v1/load_lora_adapter`` a fresh adapter
(timed: ``t_load``), stream one request to it (``t_first`` = its TTFT), then five more (``t_steady``
= their median TTFT), then unload it. Reported: p50/p95 of ``t_load``, p50 of ``t_first`` and
``t_steady`` and the first-request penalty ``t_first / t_steady`` (median over loads).

Adapters: throughput does not depend on the values of the weights, so the adapters are LoRA r=16
(alpha 32) on all seven linear projections of every layer, made with peft and random (non-zero,
seeded) A and B, saved as safetensors: what training would produce, in seconds instead of minutes.

Model: ``--model bench`` (default) is a random-init Llama of 8 layers x 512 hidden, MLP 1536, 8 heads
of 64 (27.8M parameters), built with the demo model's builder and tokenizer. The demo model
(``--model demo``, 0.5M parameters) makes every step pure framework overhead; ``bench`` is as large as
keeps the whole job near a quarter of an hour on an idle 2-core machine (vLLM's CPU worker runs one
thread on one core and leaves the other to its API server, the gateway and this client).
``--model large`` (12 x 768, about 86M parameters) is heavier on the matrix products (not timed
here; expect at least twice as long). On CPU, vLLM's LoRA kernels are PyTorch fallbacks that
gather a copy of the adapter weights per token (``vllm/lora/ops/torch_ops``), so prompt processing
with LoRA is several times slower than without: expect b/a far below GPU figures.

Other processes: the benchmark records, per round, the share of all cores that processes other than
its own (servers, gateway, client) used; it does not retry, so read the ratios with that
column and the intervals.

    .venv/bin/python bench/serving_throughput.py [--quick] [--rounds N] [--model demo|bench|large]

Default settings: 4 rounds of 12 requests x (128 prompt + 48 output tokens) per arm; about 15
minutes on an idle 2-core machine (estimated from the round times; vLLM starts take about 70 s
idle); 27 minutes measured on a machine shared with three test runs, where starts took 2-6 minutes.
``--quick`` (demo model, 2 rounds of 8 short requests, 3 hot-loads, 10 latency pairs, servers c
and d started while phase a runs) is a smoke run: about 3-4 minutes idle, 8 on the shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import (
    CpuWatch,
    LoadError,
    Request,
    RoundResult,
    Target,
    bootstrap_median,
    make_prompts,
    measure_round,
    pick_models,
    stream_one,
    zipf_weights,
)

from loraplane.common.settings import Settings
from loraplane.serving.launcher import LoraModule, VLLMServer, VLLMServerConfig
from loraplane.trainer.demo_model import DemoModelSpec

SEED = 0
BASE = "bench-base"
API_KEY = "bench-vllm-key"
CLIENT_KEY = "bench-client-key"
LORA_RANK = 16
LORA_ALPHA = 32
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ZIPF_EXPONENT = 1.5
STEADY_REQUESTS = 5
LATENCY_PROMPT = 16  # prompt tokens of the gateway-latency probe
HOTLOAD_OUTPUT = 4  # tokens per hot-load probe request: TTFT needs one
KV_CACHE_GIB = 1  # whole GiB: vLLM parses VLLM_CPU_KVCACHE_SPACE as an int
MODELS = {
    "demo": DemoModelSpec(),
    "bench": DemoModelSpec(
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        initializer_range=0.02,
    ),
    "large": DemoModelSpec(
        num_hidden_layers=12,
        hidden_size=768,
        intermediate_size=2048,
        num_attention_heads=12,
        initializer_range=0.02,
    ),
}


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ servers


def server_config(
    model_dir: Path,
    *,
    lora: bool,
    max_loras: int = 4,
    max_cpu_loras: int | None = None,
    modules: Sequence[LoraModule] = (),
) -> VLLMServerConfig:
    from loraplane.platform.quickstart import free_port

    return VLLMServerConfig(
        model=str(model_dir),
        served_model_name=BASE,
        port=free_port(),
        max_loras=max_loras,
        max_lora_rank=LORA_RANK,
        max_cpu_loras=max_cpu_loras,
        max_model_len=512,
        max_num_seqs=16,
        dtype="float32",
        kv_cache_gib=KV_CACHE_GIB,
        api_key=API_KEY,
        enable_lora=lora,
        allow_runtime_lora_updating=lora,
        lora_modules=tuple(modules),
        extra_args=("--no-enable-prefix-caching",),
    )


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    url: str


def start_gateway(upstream: str, home: Path, work: Path) -> Gateway:
    from loraplane.platform.quickstart import free_port

    keys, upstream_key = work / "gateway-keys.txt", work / "vllm.key"
    keys.write_text(CLIENT_KEY + "\n")
    upstream_key.write_text(API_KEY + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "loraplane.serving.gateway", "--upstream", upstream, "--home", str(home)]
    cmd += ["--api-keys-file", str(keys), "--upstream-api-key-file", str(upstream_key), "--port", str(port)]
    with (work / "gateway.log").open("ab") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}; see {work / 'gateway.log'}")
            with suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return Gateway(proc, url)
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the gateway did not become healthy in 120 s; see {work / 'gateway.log'}")


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


@contextmanager
def running(servers: list[VLLMServer]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            server.stop()


def start(name: str, config: VLLMServerConfig, work: Path, servers: list[VLLMServer]) -> VLLMServer:
    server = VLLMServer(config, work / f"vllm-{name}.log")
    server.start()
    servers.append(server)
    return server


def wait(name: str, server: VLLMServer) -> None:
    started = time.perf_counter()
    server.wait_ready(timeout=900)
    say(f"  server {name} ready after {time.perf_counter() - started:.0f} s more ({server.url})")


# ------------------------------------------------------------------------------------ model, adapters


def build_model(kind: str, out: Path) -> Path:
    from loraplane.trainer.demo_model import build_demo_model

    if not out.exists():
        build_demo_model(out, MODELS[kind])
    return out


def count_params(model_dir: Path) -> int:
    import numpy as np
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += int(np.prod(f.get_slice(key).get_shape()))
    return total


def make_adapters(model_dir: Path, root: Path, names: Sequence[str]) -> dict[str, Path]:
    """Random-initialised (seeded, non-zero A and B) LoRA adapters saved by peft as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(TARGET_MODULES), lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    paths: dict[str, Path] = {}
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(SEED + 1000 + i)
        with torch.no_grad():
            for p in lora_params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        out = root / name.replace("@", "/")
        peft_model.save_pretrained(out, safe_serialization=True)
        paths[name] = out
    return paths


def lora_param_count(path: Path) -> int:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="np") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118


# ----------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    requests: int
    concurrency: int
    prompts: tuple[tuple[int, ...], ...]

    def round(self, models: Sequence[str]) -> list[Request]:
        return [Request(m, p, self.output_len) for m, p in zip(models, self.prompts, strict=True)]


@dataclass
class Arm:
    name: str
    target: Target
    requests: list[Request]
    warmup: list[Request]
    results: list[RoundResult] = field(default_factory=list)


def run_phase(title: str, arms: list[Arm], rounds: int, concurrency: int, watch: CpuWatch) -> None:
    say(f"\nphase {title}: warm-up (not measured)")
    for arm in arms:
        measure_round(arm.name, arm.target, arm.warmup, concurrency, watch)
    for rnd in range(rounds):
        order = arms if rnd % 2 == 0 else arms[::-1]
        for arm in order:
            r = measure_round(arm.name, arm.target, arm.requests, concurrency, watch)
            arm.results.append(r)
            say(
                f"  round {rnd + 1}/{rounds} {arm.name:11} {r.tokens_per_s:7.1f} out tok/s  "
                f"TTFT p50 {r.ttft_p50_ms:6.0f} ms  {r.wall_s:5.1f} s  others {r.foreign_share:4.0%}"
            )


# ------------------------------------------------------------------------------------------ hot-load


@dataclass
class HotLoad:
    load_s: float
    first_s: float
    steady_s: float


class Background:
    """Streams requests to one model at fixed concurrency in a thread until stopped."""

    def __init__(self, target: Target, request: Request, concurrency: int) -> None:
        self.target, self.request, self.concurrency = target, request, concurrency
        self.stop_event = threading.Event()
        self.tokens = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=600.0) as client:

            async def worker() -> None:
                while not self.stop_event.is_set():
                    try:
                        self.tokens += (await stream_one(client, self.target, self.request)).tokens
                    except (LoadError, httpx.HTTPError) as exc:
                        self.errors.append(str(exc))

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def __enter__(self) -> Background:
        self.thread.start()
        time.sleep(1.0)  # let the background stream reach steady state before the first load
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=120)


async def _hotload_once(target: Target, name: str, path: Path, prompt: tuple[int, ...]) -> HotLoad:
    headers = {"Authorization": f"Bearer {target.api_key}"}
    async with httpx.AsyncClient(timeout=600.0, headers=headers) as client:
        started = time.perf_counter()
        reply = await client.post(
            f"{target.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        load_s = time.perf_counter() - started
        if reply.status_code != 200:
            raise LoadError(f"loading {name}: HTTP {reply.status_code}: {reply.text[:300]}")
        request = Request(name, prompt, HOTLOAD_OUTPUT)
        first = await stream_one(client, target, request)
        steady = [(await stream_one(client, target, request)).ttft_s for _ in range(STEADY_REQUESTS)]
        reply = await client.post(f"{target.url}/v1/unload_lora_adapter", json={"lora_name": name})
        if reply.status_code != 200:
            raise LoadError(f"unloading {name}: HTTP {reply.status_code}: {reply.text[:300]}")
    return HotLoad(load_s, first.ttft_s, statistics.median(steady))


def run_hotloads(
    label: str, target: Target, adapters: Sequence[tuple[str, Path]], prompt: tuple[int, ...]
) -> list[HotLoad]:
    out: list[HotLoad] = []
    for i, (name, path) in enumerate(adapters, 1):
        h = asyncio.run(_hotload_once(target, name, path, prompt))
        out.append(h)
        say(
            f"  hot-load {label} {i}/{len(adapters)}: load {1000 * h.load_s:6.0f} ms  "
            f"first TTFT {1000 * h.first_s:6.0f} ms  steady TTFT {1000 * h.steady_s:6.0f} ms"
        )
    return out


# ---------------------------------------------------------------------------------- gateway latency


async def _latency_pairs(
    direct: Target, gateway: Target, prompt: tuple[int, ...], pairs: int
) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=600.0) as client:
        for i in range(pairs):
            legs = [(direct, "bench@v1"), (gateway, "bench")]
            times: dict[str, float] = {}
            for target, model in legs if i % 2 == 0 else legs[::-1]:
                times[model] = (await stream_one(client, target, Request(model, prompt, 1))).ttft_s
            out.append((times["bench@v1"], times["bench"]))
    return out


def gateway_latency(
    direct: Target, gateway: Target, prompt: tuple[int, ...], pairs: int
) -> list[tuple[float, float]]:
    """TTFT of single requests (nothing else running), direct and through the gateway, alternated."""
    return asyncio.run(_latency_pairs(direct, gateway, prompt, pairs))


# ------------------------------------------------------------------------------------------- report


def environment() -> list[str]:
    import peft
    import torch
    import vllm

    cpu, flags = "unknown", set()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return [
        f"cpu: {cpu}, {os.cpu_count()} logical cores, flags {' '.join(simd) or '?'}",
        f"python {platform.python_version()}, vllm {vllm.__version__}, torch {torch.__version__}, "
        f"peft {peft.__version__}",
    ]


def pct(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.array(values), q))


def report_table(arms: Sequence[Arm]) -> None:
    header = (
        f"{'arm':13} {'out tok/s':>9} {'min-max':>13} {'CV':>5} {'TTFT p50':>8} {'p99':>6} "
        f"{'others':>6} rounds"
    )
    say(header)
    say("-" * len(header))
    for arm in arms:
        tps = [r.tokens_per_s for r in arm.results]
        ttft = [1000 * t for r in arm.results for t in r.ttft_s]
        cv = statistics.stdev(tps) / statistics.mean(tps) if len(tps) > 1 else float("nan")
        say(
            f"{arm.name:13} {statistics.median(tps):9.1f} {min(tps):6.1f}-{max(tps):<6.1f} {cv:5.1%} "
            f"{pct(ttft, 50):6.0f}ms {pct(ttft, 99):4.0f}ms "
            f"{statistics.median(r.foreign_share for r in arm.results):6.0%} {len(tps)}"
        )


@dataclass(frozen=True)
class Ratio:
    label: str
    mid: float
    low: float
    high: float
    n: int
    ttft: float  # median per-round ratio of p50 TTFT

    def short(self) -> str:
        name = self.label.split(" (")[0]
        return f"{name} {self.mid:.2f} [{self.low:.2f}, {self.high:.2f}]"


def paired_ratio(label: str, num: Sequence[RoundResult], den: Sequence[RoundResult]) -> Ratio:
    ratios = [n.tokens_per_s / d.tokens_per_s for n, d in zip(num, den, strict=True)]
    ttft = [n.ttft_p50_ms / d.ttft_p50_ms for n, d in zip(num, den, strict=True)]
    mid, low, high = bootstrap_median(ratios)
    return Ratio(label, mid, low, high, len(ratios), statistics.median(ttft))


def ratio_line(r: Ratio, target: float | None) -> str:
    line = f"  {r.label:30} {r.mid:5.3f} [{r.low:.3f}, {r.high:.3f}]  n={r.n:2}  TTFT p50 x{r.ttft:.2f}"
    if target is not None:
        verdict = "PASS" if r.mid >= target else "MISS"
        clears = "whole CI clears it" if r.low >= target else "CI straddles it" if r.high >= target else ""
        line += f"  target >= {target}: {verdict}" + (f" ({clears})" if clears else "")
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run: demo model, 2 short rounds, 3 hot-loads."
    )
    parser.add_argument(
        "--model", choices=sorted(MODELS), default=None, help="Base model size (default bench)."
    )
    parser.add_argument("--rounds", type=int, default=None, help="Measured rounds per phase (default 4).")
    parser.add_argument("--requests", type=int, default=None, help="Requests per round (default 12).")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=None, help="Prompt tokens (default 128).")
    parser.add_argument(
        "--output-len", type=int, default=None, help="Output tokens per request (default 48)."
    )
    parser.add_argument("--hotloads", type=int, default=None, help="Hot-loads per setting (default 10).")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    quick = args.quick
    kind = args.model or ("demo" if quick else "bench")
    rounds = args.rounds or (2 if quick else 4)
    n_requests = args.requests or (8 if quick else 12)
    input_len = args.input_len or (32 if quick else 128)
    output_len = args.output_len or (16 if quick else 48)
    hotloads = args.hotloads or (3 if quick else 10)
    latency_pairs = 10 if quick else 30
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="loraplane-servebench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()

    for line in environment():
        say(line)
    say(f"workdir {work}" + ("  (--quick: a smoke run; its numbers mean little)" if quick else ""))
    say("preparing: base model and adapters ...")
    model_dir = build_model(kind, work / "model")
    settings = Settings(home=work / "state", adapters_root=work / "adapters", max_lora_rank=LORA_RANK)
    c_names = [f"c{i}@v1" for i in range(1, 5)]
    d_names = [f"d{i}@v1" for i in range(1, 9)]
    hot_names = [f"hot{i}@v1" for i in range(1, 2 * hotloads + 1)]
    paths = make_adapters(model_dir, settings.adapters_dir, ["bench@v1", *c_names, *d_names, *hot_names])
    from loraplane.platform.adapters import register_adapter

    register_adapter(settings, paths["bench@v1"], name="bench", version="v1")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    params, lora_params = count_params(model_dir), lora_param_count(paths["bench@v1"])
    spec = MODELS[kind]
    say(
        f"model '{kind}': random-init Llama {spec.num_hidden_layers}L x {spec.hidden_size}d, MLP "
        f"{spec.intermediate_size}, {spec.num_attention_heads} heads of {spec.head_dim}, vocab {vocab}: "
        f"{params / 1e6:.1f}M params, FP32"
        + (
            " (the demo model: every step is framework overhead)"
            if kind == "demo"
            else "; big enough that matrix products show, small enough for ~15 min on 2 idle cores"
        )
    )
    say(
        f"adapters: peft LoRA r={LORA_RANK} alpha={LORA_ALPHA} on {', '.join(TARGET_MODULES)}: "
        f"{lora_params / 1e6:.2f}M params ({lora_params / params:.1%} of the base), RANDOM (seeded, "
        "non-zero) weights saved as safetensors, not trained: throughput does not depend on the "
        "weights' values"
    )
    prompts = make_prompts(n_requests, input_len, 8, vocab, SEED)
    wl = Workload(input_len, output_len, n_requests, args.concurrency, tuple(prompts))
    say(
        f"workload: {n_requests} streamed /v1/completions per round, {input_len} prompt tokens (seeded "
        f"random ids), {output_len} output tokens each (ignore_eos, greedy), concurrency {args.concurrency} "
        f"(closed loop); {rounds} measured rounds per phase after one warm-up round per arm; prefix "
        "caching off; vLLM's CPU worker runs 1 thread on 1 core, the API server, gateway and client "
        "share the other"
    )
    say(
        "the reference server b stays up; each other configuration gets a fresh server, measured "
        "alternately with b"
    )

    warm_prompts = make_prompts(max(8, 2 * args.concurrency), input_len, 8, vocab, SEED + 1)

    def warm(models: Sequence[str]) -> list[Request]:
        return [Request(models[i % len(models)], p, output_len) for i, p in enumerate(warm_prompts)]

    c_modules = [LoraModule(name=n, path=paths[n]) for n in c_names]
    d_modules = [LoraModule(name=n, path=paths[n]) for n in d_names]
    configs = {
        "b": server_config(
            model_dir, lora=True, modules=[LoraModule(name="bench@v1", path=paths["bench@v1"])]
        ),
        "a": server_config(model_dir, lora=False),
        "c": server_config(model_dir, lora=True, modules=c_modules),
        "d": server_config(model_dir, lora=True, max_loras=2, max_cpu_loras=8, modules=d_modules),
    }
    for name, cfg in configs.items():
        argv = cfg.argv()
        lora = [f"{a} {argv[i + 1]}" for i, a in enumerate(argv) if a in ("--max-loras", "--max-cpu-loras")]
        shown = ["--enable-lora", *lora] if "--enable-lora" in argv else ["no --enable-lora"]
        say(f"  server {name}: {' '.join(shown)}, {len(cfg.lora_modules)} adapters from --lora-modules")

    servers: list[VLLMServer] = []
    gateway: Gateway | None = None
    phases: dict[str, list[Arm]] = {}
    hot: dict[str, list[HotLoad]] = {}
    background_tokens = 0.0
    latency: list[tuple[float, float]] = []
    try:
        with running(servers):
            # b and a start together: a start is mostly three processes importing vLLM one after
            # another (one core), so two starts take about as long as one. The others start when
            # their phase comes (--quick: all at once, while phase a runs; its numbers do not matter).
            say("\nstarting servers b (reference) and a")
            live = {name: start(name, configs[name], work, servers) for name in ("b", "a")}
            wait("b", live["b"])
            gateway = start_gateway(live["b"].url, settings.home, work)
            say(f"  gateway ready ({gateway.url}), upstream b")
            b = Target(live["b"].url, API_KEY)
            gw = Target(gateway.url, CLIENT_KEY)
            watch = CpuWatch()

            def b_arms() -> list[Arm]:
                return [
                    Arm("b", b, wl.round(["bench@v1"] * n_requests), warm(["bench@v1"])),
                    Arm("e (gateway)", gw, wl.round(["bench"] * n_requests), warm(["bench"])),
                ]

            zipf = zipf_weights(4, ZIPF_EXPONENT)
            plans: dict[str, list[Arm]] = {}
            for phase in ("a", "c", "d"):
                if phase not in live:
                    say(f"\nstarting server {phase}")
                    live[phase] = start(phase, configs[phase], work, servers)
                wait(phase, live[phase])
                if quick and phase == "a":
                    say("  --quick: starting servers c and d now, while phase a runs")
                    live.update({name: start(name, configs[name], work, servers) for name in ("c", "d")})
                target = Target(live[phase].url, API_KEY)
                if phase == "a":
                    mine = [Arm("a", target, wl.round([BASE] * n_requests), warm([BASE]))]
                elif phase == "c":
                    uniform = pick_models(c_names, n_requests, SEED)
                    skewed = pick_models(c_names, n_requests, SEED, zipf)
                    mine = [
                        Arm("c uniform", target, wl.round(uniform), warm(c_names)),
                        Arm("c skewed", target, wl.round(skewed), warm(c_names)),
                    ]
                else:
                    swap = pick_models(d_names, n_requests, SEED)
                    mine = [Arm("d swap", target, wl.round(swap), warm(d_names))]
                plans[phase] = mine + b_arms()
                run_phase(phase, plans[phase], rounds, args.concurrency, watch)
                live[phase].stop()
            phases = plans

            hot_paths = [(n, paths[n]) for n in hot_names]
            say(
                f"\nhot-load on server b: {hotloads} fresh adapters without, then {hotloads} with "
                "background traffic"
            )
            hot["idle"] = run_hotloads("idle", b, hot_paths[:hotloads], prompts[0])
            with Background(b, Request("bench@v1", prompts[1], output_len), 2) as bg:
                started = time.perf_counter()
                hot["busy"] = run_hotloads("busy", b, hot_paths[hotloads:], prompts[0])
                elapsed = time.perf_counter() - started
            if bg.errors:
                raise LoadError(f"background requests failed during hot-loads: {bg.errors[:3]}")
            background_tokens = bg.tokens / elapsed
            say(
                f"\ngateway latency: {latency_pairs} alternating pairs of single requests, direct and "
                "via the gateway"
            )
            short = make_prompts(1, LATENCY_PROMPT, 8, vocab, SEED + 2)[0]
            latency = gateway_latency(b, gw, short, latency_pairs)
    finally:
        if gateway is not None:
            stop_gateway(gateway)

    report(phases, hot, background_tokens, rounds, latency)
    say(f"\ntotal wall time {time.perf_counter() - begun:.0f} s; server logs in {work}")
    return 0


def report(
    phases: dict[str, list[Arm]],
    hot: dict[str, list[HotLoad]],
    background_tps: float,
    rounds: int,
    latency: list[tuple[float, float]],
) -> None:
    say("\n" + "=" * 100)
    say(
        "per arm: output tokens/s (median over rounds, min-max, coefficient of variation), TTFT p50/p99 "
        "over all requests of the measured rounds, median share of all cores used by other processes"
    )
    for phase, arms in phases.items():
        say(f"\nphase {phase}: server {phase} alternated with reference server b, direct and via the gateway")
        report_table(arms)

    by = {phase: {a.name: a.results for a in arms} for phase, arms in phases.items()}
    gw_rounds = [r for p in by.values() for r in p["e (gateway)"]]
    direct_rounds = [r for p in by.values() for r in p["b"]]
    ratios = [
        (paired_ratio("b/a (LoRA on, 1 adapter)", by["a"]["b"], by["a"]["a"]), None),
        (paired_ratio("c/b uniform (4 adapters)", by["c"]["c uniform"], by["c"]["b"]), None),
        (paired_ratio("c/b skewed (Zipf 1.5)", by["c"]["c skewed"], by["c"]["b"]), None),
        (paired_ratio("d/b (8 adapters, 2 slots)", by["d"]["d swap"], by["d"]["b"]), None),
        (paired_ratio("e/direct (gateway; all phases)", gw_rounds, direct_rounds), 0.97),
    ]
    say("\nratios of output tokens/s, paired per round: median [bootstrap 95% CI], rounds, p50 TTFT ratio")
    for r, target in ratios:
        say(ratio_line(r, target))
    added = [g.ttft_p50_ms - d.ttft_p50_ms for g, d in zip(gw_rounds, direct_rounds, strict=True)]
    load_mid, load_low, load_high = bootstrap_median(added)
    say(
        f"  gateway p50 TTFT under load: {load_mid:+.1f} ms [{load_low:+.1f}, {load_high:+.1f}] (per-round "
        "differences; queueing in vLLM dominates TTFT at this load, so this cannot resolve milliseconds)"
    )
    diffs = [1000 * (g - d) for d, g in latency]
    add_mid, add_low, add_high = bootstrap_median(diffs)
    say(
        f"  gateway added TTFT, single requests ({len(latency)} alternating pairs, {LATENCY_PROMPT}-token "
        f"prompt, 1 output token): {add_mid:+.1f} ms [{add_low:+.1f}, {add_high:+.1f}] over a direct p50 of "
        f"{1000 * statistics.median(d for d, _ in latency):.0f} ms  target <= 5 ms: "
        f"{'PASS' if add_mid <= 5.0 else 'MISS'}" + (" (whole CI below)" if add_high <= 5.0 else "")
    )
    b_all = [r.tokens_per_s for r in direct_rounds]
    b_cv = statistics.stdev(b_all) / statistics.mean(b_all)
    say(
        f"  noise: reference b over all {len(b_all)} rounds: median {statistics.median(b_all):.1f} tok/s, "
        f"min-max {min(b_all):.1f}-{max(b_all):.1f}, CV {b_cv:.1%}"
    )

    say("\nadapter hot-load on server b: POST /v1/load_lora_adapter of a fresh adapter, then requests to it")
    say(
        f"{'setting':8} {'load p50':>8} {'p95':>7} {'first TTFT':>10} {'steady TTFT':>11} "
        f"{'penalty':>8}  loads"
    )
    summary: list[str] = []
    for label, loads in hot.items():
        load_ms = [1000 * h.load_s for h in loads]
        penalty = statistics.median(h.first_s / h.steady_s for h in loads)
        say(
            f"{label:8} {pct(load_ms, 50):6.0f}ms {pct(load_ms, 95):5.0f}ms "
            f"{1000 * statistics.median(h.first_s for h in loads):8.0f}ms "
            f"{1000 * statistics.median(h.steady_s for h in loads):9.0f}ms {penalty:7.2f}x  {len(loads)}"
        )
        summary.append(
            f"{label}: load p50 {pct(load_ms, 50):.0f} ms / p95 {pct(load_ms, 95):.0f} ms, "
            f"penalty {penalty:.2f}x"
        )
    say(f"  background during the 'busy' loads: {background_tps:.1f} out tok/s (b's adapter, concurrency 2)")
    say("  CPU targets (B3): load p50 <= 1 s, first-request penalty <= 2")

    say(
        f"\nclosing note ({rounds} rounds per phase; throughput ratios median [95% CI]): "
        + "; ".join(r.short() for r, _ in ratios)
        + f"; gateway adds {add_mid:+.1f} ms [{add_low:+.1f}, {add_high:+.1f}] TTFT to a single request. "
        + "Hot-load "
        + "; ".join(summary)
        + ". b/a, c/b and d/b have no gate on CPU (vLLM's CPU LoRA path is PyTorch fallbacks): "
        "track them against the last main."
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""The gateway's overhead at high request rates: short streamed requests, direct vs through the gateway.

Issue 19 item 6. bench/serving_throughput.py's gateway arm (128 prompt + 48 output tokens at
concurrency 4, a few requests per second) shows the gateway at about 1.0x direct, but vLLM's own
benchmark client with short requests (32 in / 16 out, concurrency 8: 30-45 requests/s on 2 cores)
measured it far lower. This is that workload, with bench/serving_load.py's round and statistics
machinery and bench/serving_throughput.py's servers:

* one vLLM CPU server (``serving/launcher.py``; prefix caching off), ``--enable-lora`` with one
  random peft adapter ``bench@v1`` (as serving_throughput's reference server b), on the demo model
  by default (``--model demo``: 0.5M parameters, so every step is framework overhead and the request
  rate is as high as this machine allows; ``--model bench`` for serving_throughput's 27.8M model);
* the real gateway (``python -m loraplane.serving.gateway``, its own process, local registry) in front
  of it, asked for the adapter by its bare name ``bench`` (alias resolution on every request); direct
  requests name ``bench@v1``;
* four arms: ``/v1/completions`` (token-id prompts) and ``/v1/chat/completions`` (one user message:
  the same prompts decoded to text), each direct and through the gateway. Every round runs the four
  arms one after the other, the order reversed every other round (ABBA), after one warm-up round per
  arm; each round is ``--requests`` streamed requests (``ignore_eos``, greedy, ``include_usage``) from
  ``--concurrency`` closed-loop workers.

Reported: per arm, output tokens/s (median over rounds, min-max, CV), TTFT p50/p99 over every request
of the measured rounds, and the median share of all cores used by processes outside the benchmark
("others": tests and builds on a shared machine); the gateway process's CPU time per request; and
per API the ratio gateway/direct of output tokens/s, paired per round (same round, seconds apart),
as the median with a seeded bootstrap 95% interval, with the per-round p50 TTFT difference.

    .venv/bin/python bench/gateway_overhead.py [--rounds 20] [--requests 64] [--model demo|bench]

Defaults: 20 rounds of 64 requests x (32 prompt + 16 output tokens) per arm at concurrency 8; about
6 minutes on an idle 2-core machine (the vLLM start is about a minute of it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import CpuWatch, Request, Target, bootstrap_median, make_prompts, measure_round
from serving_throughput import (
    API_KEY,
    BASE,
    CLIENT_KEY,
    MODELS,
    Gateway,
    build_model,
    environment,
    make_adapters,
    paired_ratio,
    ratio_line,
    report_table,
    running,
    say,
    server_config,
    start,
    start_gateway,
    stop_gateway,
    wait,
)
from serving_throughput import (
    Arm as ThroughputArm,
)

from loraplane.common.settings import Settings
from loraplane.serving.launcher import LoraModule, VLLMServer

SEED = 0
TARGET = 0.95  # issue 19 item 6: the gateway at >= 0.95x of direct on this workload
APIS = ("completions", "chat")


@dataclass
class Arm(ThroughputArm):
    """serving_throughput's arm, plus whether it goes through the gateway and its CPU seconds per round."""

    via_gateway: bool = False
    gateway_cpu_s: list[float] = field(default_factory=list)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def run_rounds(
    arms: list[Arm], rounds: int, concurrency: int, watch: CpuWatch, gateway: psutil.Process
) -> None:
    say("\nwarm-up (not measured)")
    for arm in arms:
        measure_round(arm.name, arm.target, arm.warmup, concurrency, watch)
    for rnd in range(rounds):
        for arm in arms if rnd % 2 == 0 else arms[::-1]:
            before = cpu_seconds(gateway)
            r = measure_round(arm.name, arm.target, arm.requests, concurrency, watch)
            used = cpu_seconds(gateway) - before
            arm.results.append(r)
            if arm.via_gateway:
                arm.gateway_cpu_s.append(used)
            say(
                f"  round {rnd + 1:2}/{rounds} {arm.name:19} {r.tokens_per_s:7.1f} out tok/s  "
                f"{len(r.ttft_s) / r.wall_s:5.1f} req/s  TTFT p50 {r.ttft_p50_ms:5.1f} ms  "
                f"gateway CPU {1000 * used / len(r.ttft_s):5.2f} ms/req  others {r.foreign_share:4.0%}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo", help="Base model (default demo).")
    parser.add_argument("--rounds", type=int, default=20, help="Measured rounds per arm (default 20).")
    parser.add_argument("--requests", type=int, default=64, help="Requests per round (default 64).")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32, help="Prompt tokens (default 32).")
    parser.add_argument("--output-len", type=int, default=16, help="Output tokens per request (default 16).")
    parser.add_argument(
        "--apis", default=",".join(APIS), help="Comma-separated: completions,chat (default both)."
    )
    parser.add_argument(
        "--served",
        choices=("adapter", "base"),
        default="adapter",
        help="adapter: --enable-lora, requests to bench@v1 (the gateway: to 'bench'); base: no "
        "--enable-lora, requests to the base model under its own name (default adapter)",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    apis = [a for a in args.apis.split(",") if a]
    if not apis or any(a not in APIS for a in apis):
        parser.error(f"--apis takes a comma-separated subset of {','.join(APIS)}")

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="loraplane-gwbench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    for line in environment():
        say(line)
    say(f"workdir {work}")
    model_dir = build_model(args.model, work / "model")
    settings = Settings(home=work / "state", adapters_root=work / "adapters", max_lora_rank=16)
    paths = make_adapters(model_dir, settings.adapters_dir, ["bench@v1"])
    from loraplane.platform.adapters import register_adapter

    register_adapter(settings, paths["bench@v1"], name="bench", version="v1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    prompts = make_prompts(args.requests, args.input_len, 8, vocab, SEED)
    warm_prompts = make_prompts(2 * args.concurrency, args.input_len, 8, vocab, SEED + 1)
    texts = [tokenizer.decode(list(p)) for p in prompts]

    def chat_tokens(text: str) -> int:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    chat_len = statistics.median(chat_tokens(t) for t in texts)
    say(
        f"workload: {args.requests} streamed requests per round and arm, {args.input_len} prompt tokens "
        f"(seeded random ids; chat: the same ids decoded to text, {chat_len:.0f} tokens with the chat "
        f"template), {args.output_len} output tokens (ignore_eos, greedy), concurrency {args.concurrency} "
        f"(closed loop), {args.rounds} measured rounds after one warm-up round per arm, model "
        f"'{args.model}', "
        + (
            "adapter bench@v1 (direct) / bench (gateway: alias resolution)"
            if args.served == "adapter"
            else f"base model {BASE} (server without --enable-lora)"
        )
    )

    def requests(api: str, model: str, ids: list[tuple[int, ...]]) -> list[Request]:
        if api == "chat":
            return [Request(model, p, args.output_len, chat=tokenizer.decode(list(p))) for p in ids]
        return [Request(model, p, args.output_len) for p in ids]

    servers: list[VLLMServer] = []
    gateway: Gateway | None = None
    arms: list[Arm] = []
    try:
        with running(servers):
            lora = args.served == "adapter"
            modules = [LoraModule(name="bench@v1", path=paths["bench@v1"])] if lora else []
            config = server_config(model_dir, lora=lora, modules=modules)
            direct_model, gateway_model = ("bench@v1", "bench") if lora else (BASE, BASE)
            say("\nstarting the vLLM server")
            server = start("b", config, work, servers)
            wait("b", server)
            gateway = start_gateway(server.url, settings.home, work)
            say(f"  gateway ready ({gateway.url})")
            direct, gw = Target(server.url, API_KEY), Target(gateway.url, CLIENT_KEY)
            for api in apis:
                for side, target, model in (("direct", direct, direct_model), ("gateway", gw, gateway_model)):
                    arms.append(
                        Arm(
                            f"{api} {side}",
                            target,
                            requests(api, model, prompts),
                            requests(api, model, warm_prompts),
                            via_gateway=side == "gateway",
                        )
                    )
            run_rounds(arms, args.rounds, args.concurrency, CpuWatch(), psutil.Process(gateway.process.pid))
    finally:
        if gateway is not None:
            stop_gateway(gateway)

    report(arms, args.rounds)
    say(f"\ntotal wall time {time.perf_counter() - begun:.0f} s; logs in {work}")
    return 0


def report(arms: list[Arm], rounds: int) -> None:
    say("\n" + "=" * 100)
    say(
        "per arm: output tokens/s (median over rounds, min-max, CV), TTFT p50/p99 over all requests of "
        "the measured rounds, median share of all cores used by other processes"
    )
    report_table(arms)
    by = {a.name: a for a in arms}
    say(
        "\ngateway/direct, paired per round: output tokens/s ratio median [bootstrap 95% CI], rounds, "
        "median per-round p50 TTFT ratio"
    )
    notes: list[str] = []
    for api in APIS:
        if f"{api} direct" not in by:
            continue
        d, g = by[f"{api} direct"], by[f"{api} gateway"]
        r = paired_ratio(f"{api} gateway/direct", g.results, d.results)
        say(ratio_line(r, TARGET))
        added = [gr.ttft_p50_ms - dr.ttft_p50_ms for gr, dr in zip(g.results, d.results, strict=True)]
        mid, low, high = bootstrap_median(added)
        per_req = [1000 * s / len(res.ttft_s) for s, res in zip(g.gateway_cpu_s, g.results, strict=True)]
        rate = statistics.median(len(res.ttft_s) / res.wall_s for res in d.results)
        say(
            f"    p50 TTFT {mid:+.1f} ms [{low:+.1f}, {high:+.1f}] through the gateway; gateway CPU "
            f"{statistics.median(per_req):.2f} ms per request; direct {rate:.1f} req/s"
        )
        notes.append(
            f"{api} {r.mid:.2f} [{r.low:.2f}, {r.high:.2f}], TTFT {mid:+.1f} ms, gateway CPU "
            f"{statistics.median(per_req):.2f} ms/req"
        )
    others = [r.foreign_share for a in arms for r in a.results]
    direct_tps = [r.tokens_per_s for a in arms if not a.via_gateway for r in a.results]
    cv = statistics.stdev(direct_tps) / statistics.mean(direct_tps)
    say(
        f"  others (CPU share of processes outside the benchmark): median {statistics.median(others):.0%}, "
        f"max {max(others):.0%}; direct rounds' CV {cv:.1%}"
    )
    say(f"\nclosing note ({rounds} rounds; gateway/direct output tokens/s): " + "; ".join(notes))


if __name__ == "__main__":
    raise SystemExit(main())

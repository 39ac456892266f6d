"""The gateway in front of the real vLLM server and trainer-made adapters, called with the `openai` client.

Each test gets an adapter of its own with two versions of different behaviour (v1: the sentiment
adapter's weights, answering "positive" to the sentiment prompt; v2: the animals adapter's) in a
registry of its own, and a gateway (in-process, real HTTP) in front of the session's vLLM server.
The gateway's clients use a key of their own; vLLM only accepts the gateway's upstream key, so every
answer also proves the client's key was replaced.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from kube_client import helm_args
from openai import OpenAI
from support import API_KEY, BASE, ROOT, Live, engine_core, http, vllm_generated_tokens, wait_until
from test_gateway import metric, raw_post, serve

from loraplane.common.settings import Settings
from loraplane.platform.adapters import load_adapter, promote_adapter, register_adapter, unload_adapter
from loraplane.serving.gateway.app import GatewayConfig, create_app
from loraplane.serving.gateway.canary import CanaryRule, takes_canary

pytestmark = pytest.mark.e2e

CLIENT_KEY = "gateway-e2e-client-key"
DEADLINE_S = 120.0
soon = functools.partial(wait_until, timeout=DEADLINE_S, every=0.05)  # poll a condition, fail at the deadline
SYSTEM = "Answer with one word."
SENTIMENT_PROMPT = "Classify the sentiment: The movie was wonderful."
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Gw:
    settings: Settings
    name: str  # unique per test: served names live on the shared server
    url: str  # the gateway

    def client(self, key: str = CLIENT_KEY) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=DEADLINE_S)


@pytest.fixture
def gw(live: Live, tmp_path: Path) -> Iterator[Gw]:
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    name = "gw-" + re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-37:].strip("-")
    for version, task in (("v1", "sentiment"), ("v2", "animals")):
        copy = live.settings.adapters_dir / name / version
        shutil.copytree(live.adapters[task], copy)
        register_adapter(settings, copy, name=name, version=version)
    config = GatewayConfig(
        upstream=live.server.url, home=settings.home, api_keys=(CLIENT_KEY,), upstream_api_key=API_KEY
    )
    with serve(create_app(config)) as url:
        yield Gw(settings, name, url)


def ask(client: OpenAI, model: str) -> tuple[str, str]:
    """The sentiment question to ``model``: (the served name that answered, the answer)."""
    reply = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=8,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": SENTIMENT_PROMPT}],
    )
    return reply.model, reply.choices[0].message.content or ""


def test_openai_client_chat_completions_streaming_and_models_through_the_gateway(gw: Gw, live: Live) -> None:
    name = gw.name
    asyncio.run(promote_adapter(gw.settings, f"{name}@v1", force=True, reason="gateway e2e"))
    asyncio.run(load_adapter(gw.settings, f"{name}@v2"))
    client = gw.client()

    assert ask(client, name) == (f"{name}@v1", "positive"), "bare name = NAME:prod = v1 (sentiment)"
    assert ask(client, f"{name}:prod") == (f"{name}@v1", "positive")
    served, answer = ask(client, f"{name}@v2")
    assert served == f"{name}@v2" and answer not in ("positive", "negative"), answer

    completion = client.completions.create(model=f"{name}:prod", prompt="The movie was", max_tokens=4)
    assert completion.model == f"{name}@v1" and completion.usage and completion.usage.completion_tokens > 0
    base = client.completions.create(model=BASE, prompt="Hello", max_tokens=4, temperature=0)
    assert base.model == BASE and base.choices[0].text is not None

    # Streams: chunks as they come, the same answer as without streaming, usage when asked for.
    chunks = list(
        client.chat.completions.create(
            model=name,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": SENTIMENT_PROMPT}],
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 2 and {c.model for c in chunks} == {f"{name}@v1"}
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "positive"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    texts = [
        c.choices[0].text
        for c in client.completions.create(
            model=BASE, prompt="Once", max_tokens=12, stream=True, extra_body={"ignore_eos": True}
        )
        if c.choices
    ]
    assert len(texts) >= 6, texts  # several chunks, not one buffered answer

    cards = {m.id: m for m in client.models.list()}
    assert {BASE, name, f"{name}:prod", f"{name}@v1", f"{name}@v2"} <= set(cards)
    assert getattr(cards[f"{name}:prod"], "parent", None) == f"{name}@v1"
    assert getattr(cards[f"{name}@v2"], "parent", None) == BASE

    with pytest.raises(openai.NotFoundError, match="model_not_found"):
        ask(client, f"{name}@v9")
    with pytest.raises(openai.AuthenticationError):
        ask(gw.client(key=API_KEY), name)  # vLLM's own key is not a gateway key

    # The admin routes vLLM has do not exist behind the gateway, whatever key is sent.
    sneaky = {"lora_name": f"{name}-sneaky", "lora_path": str(gw.settings.adapters_dir / name / "v1")}
    for key in (CLIENT_KEY, API_KEY):
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{gw.url}/v1/load_lora_adapter", json=sneaky, headers=headers).status_code == 404
        assert (
            httpx.post(f"{gw.url}/adapters", json={"name": "x", "src": "/"}, headers=headers).status_code
            == 404
        )
    upstream = httpx.get(f"{live.server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert f"{name}-sneaky" not in {m["id"] for m in upstream.json()["data"]}
    assert httpx.get(f"{gw.url}/health").status_code == 200

    labels = {"model": name, "served": f"{name}@v1"}
    assert metric(gw.url, "loraplane_gateway_requests_total", {**labels, "route": CHAT, "code": "200"}) == 2
    assert metric(gw.url, "loraplane_gateway_tokens_total", {**labels, "kind": "completion"}) > 0
    assert metric(gw.url, "loraplane_gateway_time_to_first_byte_seconds_count", labels) == 1
    assert metric(gw.url, "loraplane_gateway_requests_total", {"model": f"{name}@v9", "code": "404"}) == 0


@dataclass
class Answer:
    sent: float  # wall clock (time.time), comparable with the registry file's mtime
    received: float
    served: str | None
    text: str | None
    error: str | None


def test_alias_flip_under_load_fails_no_request_and_switches_within_a_second(
    gw: Gw, request: pytest.FixtureRequest
) -> None:
    """Two clients ask NAME (= NAME:prod) in a loop while prod moves from v1 to v2 with promote_adapter."""
    name = gw.name
    asyncio.run(promote_adapter(gw.settings, f"{name}@v1", force=True, reason="release"))
    # What v2 answers alone: under load it must answer exactly that, never another adapter's answer
    # or the base model's (vLLM evicting adapters while serving mixes them up: serving/capacity.py).
    asyncio.run(load_adapter(gw.settings, f"{name}@v2"))
    served, v2_alone = ask(gw.client(), f"{name}@v2")
    assert served == f"{name}@v2" and v2_alone not in ("positive", "negative"), v2_alone
    answers: list[Answer] = []
    arrived = threading.Condition()
    stop = threading.Event()
    hard_stop = time.monotonic() + 60.0
    max_requests = 400

    def worker() -> None:
        client = gw.client()
        while not stop.is_set() and time.monotonic() < hard_stop and len(answers) < max_requests:
            sent = time.time()
            try:
                served, text = ask(client, name)
                answer = Answer(sent, time.time(), served, text, None)
            except Exception as exc:  # every failure is a finding: recorded, then asserted on
                answer = Answer(sent, time.time(), None, None, f"{type(exc).__name__}: {exc}")
            with arrived:
                answers.append(answer)
                arrived.notify_all()

    def wait_for(keep: Callable[[Answer], bool], n: int, what: str) -> None:
        with arrived:
            assert arrived.wait_for(lambda: sum(1 for a in answers if keep(a)) >= n, 60), what

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for t in workers:
        t.start()
    try:
        wait_for(lambda a: a.served is not None, 10, "no answers from v1")
        asyncio.run(promote_adapter(gw.settings, f"{name}@v2", force=True, reason="flip under load"))
        # The registry is written at the end of promote_adapter: its mtime is when the flip happened (at
        # the latest; the rename that publishes it comes after the last write).
        written = (gw.settings.home / "registry.json").stat().st_mtime_ns / 1e9
        wait_for(lambda a: a.sent > written + 1.5, 10, "no answers to requests sent after the flip")
    finally:
        stop.set()
        for t in workers:
            t.join(DEADLINE_S)

    assert len(answers) <= max_requests + 2
    assert [a.error for a in answers if a.error] == [], "no request may fail while the alias moves"
    v1, v2 = f"{name}@v1", f"{name}@v2"
    assert {(a.served, a.text) for a in answers if a.served == v1} == {(v1, "positive")}
    assert {a.text for a in answers if a.served == v2} == {v2_alone}
    assert all(a.served == v1 for a in answers if a.received < written), "v2 before the registry said so"
    first_v2 = min((a for a in answers if a.served == v2), key=lambda a: a.received)
    switch_s = first_v2.received - written
    request.node.user_properties += [  # in --junitxml reports (junit_family=legacy)
        ("alias_switch_seconds", round(switch_s, 3)),
        ("first_v2_request_seconds", round(first_v2.received - first_v2.sent, 3)),
        ("requests", len(answers)),
    ]
    assert switch_s <= 1.0 + (first_v2.received - first_v2.sent), (switch_s, first_v2)
    assert all(a.served == v2 for a in answers if a.sent > written + 1.0), "still v1 a second after the flip"
    assert all(a.served == v2 for a in answers if a.sent > first_v2.received), "went back to v1"

    served_counts = {
        v: metric(gw.url, "loraplane_gateway_requests_total", {"route": CHAT, "model": name, "served": v})
        for v in (v1, v2)
    }
    assert served_counts == {v: float(sum(1 for a in answers if a.served == v)) for v in (v1, v2)}
    assert metric(gw.url, "loraplane_gateway_tokens_total", {"served": v2, "kind": "prompt"}) > 0
    assert metric(gw.url, "loraplane_gateway_upstream_errors_total", {}) == 0


def _vllm_requests_in_flight(live: Live) -> int:
    """vLLM's own count of generation requests its API server is handling (``--enable-server-load-tracking``).

    It counts a request once vLLM's handler has it, and stops counting it when vLLM sees the client's
    disconnect (or the answer is sent).
    """
    reply = http().get(f"{live.server.url}/load", headers={"Authorization": f"Bearer {API_KEY}"})
    reply.raise_for_status()
    return int(reply.json()["server_load"])


def test_prompt_logprobs_are_refused_while_other_requests_run_and_the_server_stays_up(
    gw: Gw, live: Live
) -> None:
    """echo + logprobs (and vLLM's prompt_logprobs) kill vLLM 0.32's engine when they share a batch on
    a LoRA server (serving/gateway/refused_params.py): the gateway answers 400 and never forwards them,
    even while another client's generation is running."""
    name = gw.name
    asyncio.run(promote_adapter(gw.settings, f"{name}@v1", force=True, reason="prompt logprobs"))
    client = gw.client()
    stop = threading.Event()
    answered: list[str] = []

    def busy() -> None:  # the other traffic a shared server always has
        other = gw.client()
        while not stop.is_set():
            answered.append(ask(other, name)[1])

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        soon(lambda: len(answered) >= 2, "the other client's answers")
        echo = functools.partial(
            client.completions.create, prompt="The movie was", max_tokens=0, echo=True, logprobs=0
        )
        asks: list[Callable[[], object]] = [functools.partial(echo, model=m) for m in (BASE, name)]
        asks.append(
            functools.partial(
                client.chat.completions.create,
                model=name,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=1,
                extra_body={"prompt_logprobs": 1},
            )
        )
        for refused_request in asks:
            with pytest.raises(openai.BadRequestError) as refused:
                refused_request()
            assert refused.value.code == "unsupported_parameter"
            assert "vllm-project/vllm#16668" in refused.value.message
        n = len(answered)
        soon(lambda: len(answered) >= n + 2, "the other client's answers after the refusals")
    finally:
        stop.set()
        worker.join(DEADLINE_S)
    assert set(answered) == {"positive"}
    assert http().get(f"{live.server.url}/health").status_code == 200
    plain = client.completions.create(model=name, prompt="The movie was", max_tokens=2, logprobs=1)
    assert plain.choices[0].logprobs is not None, "logprobs of generated tokens still go through"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_disconnect_makes_vllm_abort_the_generation(
    gw: Gw, live: Live, request: pytest.FixtureRequest, stream: bool
) -> None:
    """A request for 200 tokens (ignoring EOS) whose client leaves while vLLM has it: vLLM drops it.

    vLLM's engine core is stopped (SIGSTOP) while this happens, so the request cannot finish on its
    own before vLLM acts on the disconnect, however slowly a loaded machine runs vLLM's API server (it
    can lag its engine by seconds, and on 2 busy cores the request used to finish first). The steps:
    the request reaches vLLM's handler (vLLM's ``/load`` counts it), the client leaves, the gateway
    records the client's departure (after closing the upstream request), vLLM sees the disconnect
    (``/load`` stops counting it), the engine runs again. Probes of one token each are then sent until
    one probe's run adds only its own token (nothing else is generating): the abandoned request
    generated fewer than its 200 tokens. Without the gateway's upstream close it would generate all.
    """
    max_tokens = 200
    body = {"model": BASE, "prompt": "Once", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    code = "200" if stream else "499"  # a stream was answered (its headers); the other never was
    answered = {"route": "/v1/completions", "code": code}
    assert _vllm_requests_in_flight(live) == 0
    before = vllm_generated_tokens(live.server.url)
    engine = engine_core(live.server)
    engine.send_signal(signal.SIGSTOP)
    try:
        if stream:
            headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
            with httpx.stream(
                "POST", f"{gw.url}/v1/completions", json=body, headers=headers, timeout=DEADLINE_S
            ) as reply:
                assert reply.status_code == 200  # vLLM sends a stream's headers before its first token
                soon(lambda: _vllm_requests_in_flight(live) == 1, "vLLM's handler to take the request")
        else:  # a raw socket: hang up at a moment of the test's choosing, with the request in flight
            with raw_post(gw.url, "/v1/completions", body, CLIENT_KEY):
                soon(lambda: _vllm_requests_in_flight(live) == 1, "vLLM's handler to take the request")
        soon(lambda: metric(gw.url, "loraplane_gateway_requests_total", answered) == 1, "the gateway")
        soon(lambda: _vllm_requests_in_flight(live) == 0, "vLLM to see the disconnect")
        http().get(f"{live.server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    finally:
        engine.send_signal(signal.SIGCONT)

    probe = {"model": BASE, "prompt": "Hi", "max_tokens": 1}
    upstream_headers = {"Authorization": f"Bearer {API_KEY}"}
    probes, previous = 0, vllm_generated_tokens(live.server.url)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        http().post(f"{live.server.url}/v1/completions", json=probe, headers=upstream_headers)
        probes += 1
        now = vllm_generated_tokens(live.server.url)
        if now - previous == 1:  # only the probe's token: the abandoned request is not generating
            break
        assert time.monotonic() < deadline, "vLLM kept generating"
        previous = now
    abandoned = now - before - probes
    request.node.user_properties.append(("tokens_generated_before_abort", abandoned))
    assert 0 <= abandoned < max_tokens, abandoned
    assert metric(gw.url, "loraplane_gateway_requests_total", answered) == 1


def test_weighted_canary_splits_prod_traffic_by_user(live: Live, tmp_path: Path) -> None:
    """NAME:prod = v1, NAME:canary = v2, a 50 % rule: each user gets one version's behaviour, always."""
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    name = "gw-canary-" + re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower())[-30:].strip("-")
    for version, task in (("v1", "sentiment"), ("v2", "animals")):
        copy = live.settings.adapters_dir / name / version
        shutil.copytree(live.adapters[task], copy)
        register_adapter(settings, copy, name=name, version=version)
    asyncio.run(promote_adapter(settings, f"{name}@v1", force=True, reason="release"))
    asyncio.run(promote_adapter(settings, f"{name}@v2", alias="canary", force=True, reason="canary"))
    rule = CanaryRule(alias="canary", percent=50)
    config = GatewayConfig(
        upstream=live.server.url,
        home=settings.home,
        api_keys=(CLIENT_KEY,),
        upstream_api_key=API_KEY,
        canaries={name: rule},
    )
    users = [f"user-{i}" for i in range(8)]
    expected = {
        u: f"{name}@v2" if takes_canary(rule, name, u, random.Random()) else f"{name}@v1" for u in users
    }
    assert len(set(expected.values())) == 2, "pick users that land on both sides"
    with serve(create_app(config)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=DEADLINE_S)
        for user in users * 2:
            reply = client.chat.completions.create(
                model=name,
                user=user,
                temperature=0,
                max_tokens=8,
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": SENTIMENT_PROMPT},
                ],
            )
            answer = reply.choices[0].message.content
            assert reply.model == expected[user], user
            assert (answer == "positive") == (reply.model == f"{name}@v1"), (reply.model, answer)


def test_openai_responses_api_and_models_retrieve_through_the_gateway(gw: Gw) -> None:
    """``client.responses.create`` (plain and streamed) and ``client.models.retrieve``, aliases resolved."""
    name = gw.name
    asyncio.run(promote_adapter(gw.settings, f"{name}@v1", force=True, reason="gateway e2e"))
    client = gw.client()
    _, chat_answer = ask(client, f"{name}:prod")
    reply = client.responses.create(
        model=f"{name}:prod", instructions=SYSTEM, input=SENTIMENT_PROMPT, temperature=0, max_output_tokens=8
    )
    assert reply.model == f"{name}@v1" and reply.output_text.strip() == chat_answer.strip() == "positive"
    assert reply.usage is not None and reply.usage.output_tokens > 0
    stream = client.responses.create(
        model=name,
        instructions=SYSTEM,
        input=SENTIMENT_PROMPT,
        temperature=0,
        max_output_tokens=8,
        stream=True,
    )
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 1 and "".join(deltas).strip() == "positive"
    (completed,) = [e for e in events if e.type == "response.completed"]
    usage = completed.response.usage
    assert completed.response.model == f"{name}@v1" and usage is not None and usage.output_tokens > 0
    with pytest.raises(openai.NotFoundError, match="model_not_found"):
        client.responses.create(model=f"{name}@v9", input="hi")
    with pytest.raises(openai.AuthenticationError):
        gw.client(key=API_KEY).responses.create(model=name, input="hi")

    route = {"route": "/v1/responses", "served": f"{name}@v1"}
    assert metric(gw.url, "loraplane_gateway_requests_total", {**route, "model": f"{name}:prod"}) == 1
    assert metric(gw.url, "loraplane_gateway_requests_total", {**route, "model": name, "code": "200"}) == 1
    for model in (f"{name}:prod", name):  # the stream's usage comes in response.completed, unasked
        tokens = {"model": model, "served": f"{name}@v1", "kind": "completion"}
        assert metric(gw.url, "loraplane_gateway_tokens_total", tokens) > 0
    assert metric(gw.url, "loraplane_gateway_time_to_first_byte_seconds_count", {"model": name}) == 1

    card = client.models.retrieve(f"{name}:prod")
    assert (card.id, getattr(card, "parent", None), getattr(card, "root", None)) == (
        f"{name}:prod",
        f"{name}@v1",
        BASE,
    )
    assert client.models.retrieve(BASE).id == BASE
    for unknown in ("no-such-model", f"{name}@v2", f"{name}:staging"):  # v2: registered, not loaded
        with pytest.raises(openai.NotFoundError, match="model_not_found"):
            client.models.retrieve(unknown)


def test_models_lists_only_versions_the_server_really_serves(gw: Gw, live: Live) -> None:
    """Registered but not loaded: not listed (a request would get vLLM's 404); loaded: listed."""
    name, client = gw.name, gw.client()

    def listed() -> set[str]:
        return {m.id for m in client.models.list()}

    assert not {f"{name}@v1", f"{name}@v2"} & listed() and BASE in listed()
    with pytest.raises(openai.NotFoundError):  # what a listed-but-unloaded version used to answer
        ask(client, f"{name}@v2")
    asyncio.run(load_adapter(gw.settings, f"{name}@v2"))
    soon(lambda: f"{name}@v2" in listed(), f"{name}@v2 listed once loaded")
    assert ask(client, f"{name}@v2")[0] == f"{name}@v2"
    asyncio.run(promote_adapter(gw.settings, f"{name}@v1", force=True, reason="release"))
    soon(lambda: {f"{name}@v1", f"{name}:prod", name} <= listed(), "prod listed once loaded")
    asyncio.run(unload_adapter(gw.settings, f"{name}@v2"))
    soon(lambda: f"{name}@v2" not in listed(), f"{name}@v2 gone once unloaded")
    upstream = httpx.get(f"{live.server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert f"{name}@v2" not in {m["id"] for m in upstream.json()["data"]}


def test_vllm_command_works_and_benchmarks_the_gateway(gw: Gw, demo_model: Path, tmp_path: Path) -> None:
    """``vllm --version`` and a short ``vllm bench serve`` (random prompts) against the gateway."""
    vllm = ROOT / ".venv" / "bin" / "vllm"
    env = {**os.environ, "OPENAI_API_KEY": CLIENT_KEY, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    version = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, env=env, timeout=300)
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip().splitlines()[-1].startswith("0.32"), version.stdout

    name = gw.name
    asyncio.run(promote_adapter(gw.settings, f"{name}@v1", force=True, reason="bench"))
    prompts = 4
    bench = [str(vllm), "bench", "serve", "--backend", "openai", "--base-url", gw.url]
    bench += ["--endpoint", "/v1/completions", "--model", f"{name}:prod", "--tokenizer", str(demo_model)]
    bench += ["--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4"]
    bench += ["--num-prompts", str(prompts), "--seed", "0", "--disable-tqdm", "--save-result"]
    bench += ["--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    proc = subprocess.run(bench, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["completed"], result["failed"]) == (prompts, 0), result
    labels = {"route": "/v1/completions", "model": f"{name}:prod", "served": f"{name}@v1", "code": "200"}
    assert metric(gw.url, "loraplane_gateway_requests_total", labels) >= prompts  # through the gateway


def _helm_test_job() -> tuple[list[str], dict[str, str]]:
    """The chart's `helm test` Pod: its command and environment, as rendered."""
    import yaml

    args = helm_args(("template", "platform", str(ROOT / "charts" / "loraplane")))
    rendered = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "helm"), *args], capture_output=True, text=True, check=True
    ).stdout
    (pod,) = [
        d for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "Pod" and d["metadata"]["name"].endswith("-test-models")
    ]  # fmt: skip
    (container,) = pod["spec"]["containers"]
    return container["command"], {e["name"]: e["value"] for e in container["env"]}


def test_the_charts_helm_test_sends_a_completion_through_the_gateway_and_fails_with_the_body(
    gw: Gw, tmp_path: Path
) -> None:
    """What the chart's `helm test` pod runs, run here against the real gateway and vLLM: a one-token
    completion to NAME:prod when an alias is promoted (else the base model); any other answer fails
    the test and prints the gateway's body."""
    command, env = _helm_test_job()
    assert command[:2] == ["python", "-c"]
    keys = tmp_path / "keys"

    def helm_test(key: str) -> subprocess.CompletedProcess[str]:
        keys.write_text(key + "\n")
        job_env = {**env, "GATEWAY_URL": gw.url, "KEY_FILE": str(keys)}
        return subprocess.run(
            [sys.executable, "-c", command[2]], capture_output=True, text=True, timeout=120,
            env={**os.environ, **job_env},
        )  # fmt: skip

    base = helm_test(CLIENT_KEY)
    assert base.returncode == 0 and base.stdout.startswith(f"{BASE} answered through the gateway"), base
    asyncio.run(promote_adapter(gw.settings, f"{gw.name}@v1", force=True, reason="helm test"))
    listed = lambda: f"{gw.name}:prod" in {m.id for m in gw.client().models.list().data}  # noqa: E731
    soon(listed, "the gateway to see the new alias")  # it re-reads the registry on its own schedule
    prod = helm_test(CLIENT_KEY)
    assert prod.returncode == 0 and prod.stdout.startswith(f"{gw.name}:prod answered"), prod
    refused = helm_test("not-a-client-key")
    assert refused.returncode == 1
    assert f"GET {gw.url}/v1/models answered HTTP 401:" in refused.stderr, refused.stderr

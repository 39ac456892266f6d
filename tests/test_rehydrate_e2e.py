"""One dedicated vLLM server through its life: started, reconciled, hung, killed and started again.

The server is started the way the chart starts it, through ``python -m loraplane.serving`` with
``--registry-home``: nobody runs ``adapters load`` after the (re)start. Its readiness is what the
chart's exec probe runs, ``python -m loraplane.serving.readiness``. The steps share one server (a
start costs about a minute here), so they are one test, in order:

1. a fresh server loads every registered adapter once vLLM is up (the supervisor loads them one by
   one at runtime) and only then does readiness say ready;
2. an adapter unloaded behind the registry's back and a stray one loaded by hand: readiness names
   the missing one; ``loraplane adapters sync`` loads it and unloads the stray; ``adapters unload``
   is durable (``sync`` does not bring it back);
3. the engine core process stopped (SIGSTOP: a hung engine; ``/health`` still answers 200):
   readiness fails saying so; SIGCONT: it recovers. Then a busy engine (long requests queued for the
   server's only sequence slot): readiness says ready, busy;
4. the whole server killed (SIGKILL): no vLLM process outlives it; five versions are then damaged
   in the ways files break (truncated by one byte, header only, zero-filled data, a NaN, deleted
   after registration; the first four written into the registry as an older loraplane that read
   only headers did), and the server is started again: it comes up, every good adapter answers,
   each damaged one is skipped with its reason (log, state file, registry), and readiness says ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from support import API_KEY, BASE, Live, engine_core, http, vllm_generated_tokens, vllm_metric
from support import wait_until as shared_wait_until

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter, unload_adapter
from loraplane.platform.quickstart import free_port
from loraplane.registry.backends import open_registry
from loraplane.registry.model import mark_serving
from loraplane.serving.client import VLLMAdminClient
from loraplane.serving.readiness import NotReady, check
from loraplane.serving.reconcile import sync_replicas
from loraplane.serving.server_state import read_state

pytestmark = pytest.mark.e2e

DEADLINE_S = 600.0
OCCUPIERS = 64  # long requests sent in step 3b
# waiting in vLLM's queue before the probe (under load the requests reach the engine gradually and
# all 64 ended before 56 were ever waiting at once; the rest keep coming behind these)
QUEUED = 16
# probes in a row that must fail before the pod leaves the Service (the chart's default)
FAILURE_THRESHOLD = yaml.safe_load(
    (Path(__file__).parents[1] / "charts/loraplane/charts/serving/values.yaml").read_text()
)["readiness"]["failureThreshold"]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
NAMES = ("rh-sentiment@v1", "rh-animals@v1", "rh-extra@v1")


@dataclass
class Server:
    """``python -m loraplane.serving`` in a process group of its own (killable as a whole)."""

    argv: list[str]
    log_path: Path
    url: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LORAPLANE_API_KEY": API_KEY},
                start_new_session=True,
            )

    def alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()[-3000:]

    def engine_core(self) -> psutil.Process:
        assert self.proc is not None
        return engine_core(self.proc.pid)

    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return []

    def kill(self) -> list[psutil.Process]:
        """SIGKILL the supervisor's group only; return the processes it had started (vLLM, its engine)."""
        if self.proc is None:
            return []
        started = self.tree()[1:]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        return started

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()


def state_file(settings: Settings) -> Path:
    return settings.home / "server-state.json"


def probe(url: str, settings: Settings, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """The chart's exec probe, as a process."""
    return subprocess.run(
        [
            sys.executable, "-m", "loraplane.serving.readiness", "--url", url, "--base-model", BASE,
            "--registry-home", str(settings.home), "--timeout", str(timeout),
            "--state-file", str(state_file(settings)),
        ],
        capture_output=True, text=True, env={**os.environ, "VLLM_API_KEY": API_KEY}, timeout=timeout + 30,
    )  # fmt: skip


def readiness(url: str, settings: Settings, timeout: float = 10.0) -> tuple[int, str]:
    """The chart's exec probe: (exit code, stderr)."""
    proc = probe(url, settings, timeout)
    return proc.returncode, proc.stderr.strip()


def served(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", headers=HEADERS, timeout=30).json()["data"]}


def answers(url: str, model: str) -> bool:
    reply = httpx.post(
        f"{url}/v1/completions",
        headers=HEADERS,
        json={"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0},
        timeout=120,
    )
    return reply.status_code == 200


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float = DEADLINE_S,
    server: Server | None = None,
    every: float = 0.5,
) -> None:
    shared_wait_until(
        condition, what, timeout=timeout, every=every, alive=None if server is None else server.alive
    )


@pytest.fixture
def server(live: Live, demo_model: Path, tmp_path: Path) -> Iterator[tuple[Server, Settings]]:
    """A registry of the test's own with three versions, and a server that rehydrates from it."""
    settings = live.settings.model_copy(update={"home": tmp_path / "state"})
    for served_name, task in zip(NAMES, ("sentiment", "animals", "sentiment"), strict=True):
        name, version = served_name.split("@")
        copy = settings.adapters_dir / name / version
        if not copy.exists():
            shutil.copytree(live.adapters[task], copy)
        entry = register_adapter(settings, copy, name=name, version=version)
        with open_registry(settings).transaction() as state:  # served before this start (a restarted pod)
            mark_serving(state, state.resolve(entry.ref))
    port = free_port()
    argv = [
        sys.executable, "-m", "loraplane.serving",
        "--model", str(demo_model), "--served-model-name", BASE, "--port", str(port),
        "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "256", "--dtype", "float32",
        "--kv-cache-gib", "1", "--max-num-seqs", "1",
        "--registry-home", str(settings.home), "--adapters-root", str(settings.adapters_dir),
        "--state-file", str(state_file(settings)),
    ]  # fmt: skip
    srv = Server(argv, tmp_path / "vllm.log", f"http://127.0.0.1:{port}")
    srv.start()
    try:
        yield srv, settings
    finally:
        srv.stop()


def test_a_server_serves_its_registry_from_start_survives_a_hang_and_comes_back_after_a_kill(
    server: tuple[Server, Settings],
) -> None:
    srv, settings = server
    url = srv.url

    # 1. Ready only after the supervisor loaded every registered version; nobody calls `adapters load`.
    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(lambda: readiness(url, settings)[0] == 0, "the server to become ready", server=srv, every=2.0)
    assert set(NAMES) <= served(url)
    assert all(answers(url, name) for name in NAMES)
    assert "serving 3 registered adapter version(s) (loaded at runtime)" in srv.log_path.read_text()
    server_state = read_state(state_file(settings))
    assert server_state is not None and server_state.phase == "ready" and not server_state.failed
    assert sorted(server_state.loaded) == sorted(NAMES) and server_state.limits.max_lora_rank == 8

    # 2. Drift behind the registry's back, then sync.
    async def drift() -> None:
        async with VLLMAdminClient(url, api_key=API_KEY) as client:
            assert await client.unload_adapter("rh-animals@v1")
            assert await client.load_adapter("stray@v1", str(settings.adapters_dir / "rh-extra" / "v1"))

    asyncio.run(drift())
    code, reason = readiness(url, settings)
    assert code == 1 and reason == "not ready: 1 registered adapter version(s) not loaded: rh-animals@v1"
    cli = subprocess.run(
        [
            sys.executable, "-m", "loraplane.platform.cli", "--home", str(settings.home),
            "--adapters-root", str(settings.adapters_dir),
            "adapters", "sync", "--server-url", url, "-o", "json",
        ],
        capture_output=True, text=True, env={**os.environ, "LORAPLANE_API_KEY": API_KEY}, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    (replica,) = report["replicas"]
    assert report["ok"] and replica["loaded"] == ["rh-animals@v1"] and replica["unloaded"] == ["stray@v1"]
    assert sorted(replica["unchanged"]) == ["rh-extra@v1", "rh-sentiment@v1"] and replica["url"] == url
    assert served(url) == {BASE, *NAMES}
    versions = [v for a in open_registry(settings).read().adapters.values() for v in a.versions.values()]
    assert {v.served_name: v.state for v in versions} == dict.fromkeys(NAMES, "serving"), "sync records it"
    asyncio.run(unload_adapter(settings, "rh-extra@v1", server_urls=[url]))
    assert "rh-extra@v1" not in served(url)
    again = asyncio.run(sync_replicas(settings, [url])).replicas[0]
    assert again.ok and not again.changed, "an unloaded version stays unloaded"
    assert readiness(url, settings) == (0, "")

    # 3. A hung engine: /health still answers, readiness does not.
    engine = srv.engine_core()
    engine.send_signal(signal.SIGSTOP)
    try:
        assert healthy(), "vLLM's /health does not notice a stopped engine: that is what readiness is for"
        code, reason = readiness(url, settings, timeout=5)
        assert code == 1, reason
        assert "one-token completion on 'demo-base' did not finish within" in reason
        assert "no token was generated meanwhile" in reason and "the engine is hung" in reason
    finally:
        engine.send_signal(signal.SIGCONT)
    wait_until(lambda: readiness(url, settings)[0] == 0, "readiness after SIGCONT", timeout=120, server=srv)

    # 3b. A busy engine is not a hung one. The server runs one sequence at a time (--max-num-seqs 1), and
    # 64 requests for 240 tokens each hold it for over the probe's budget however fast the machine (24,
    # about a second each under load, did not on an idle one): the probe's one-token completion waits
    # in the queue past its budget while tokens are generated, so the pod stays ready.
    long_request = {"model": BASE, "prompt": "Once", "max_tokens": 240, "ignore_eos": True}

    # The threads send together (a barrier): one started late under load while the first requests
    # ran could find the queue already drained, and the queue would never fill.
    together = threading.Barrier(OCCUPIERS)

    replies: list[str] = []

    def occupy() -> None:
        together.wait(timeout=60)
        try:
            answer = http().post(
                f"{url}/v1/completions", json=long_request, headers=HEADERS, timeout=DEADLINE_S
            )
            replies.append(f"{answer.status_code} {answer.text[:200]}")
        except httpx.HTTPError as exc:  # step 4 kills the server under it
            replies.append(f"{type(exc).__name__}: {exc}")

    occupiers = [threading.Thread(target=occupy, daemon=True) for _ in range(OCCUPIERS)]
    start = vllm_generated_tokens(url)
    for thread in occupiers:
        thread.start()
    wait_until(lambda: vllm_generated_tokens(url) > start, "the long requests to start generating", every=0.1)

    # all of them queued behind the one running: else the probe's request might be next in line and
    # finish in time, which would test nothing about a busy engine. Once they have all ended the queue
    # cannot fill any more: that fails at once, not at the deadline.
    def queue_full() -> bool:
        assert any(t.is_alive() for t in occupiers), (
            f"the long requests all ended before {QUEUED} queued: {replies[:3]}"
        )
        return vllm_metric(url, "vllm:num_requests_waiting") >= QUEUED

    wait_until(queue_full, "the queue to fill", every=0.1)
    # The probe's own check, in this process: a probe process's imports took up to a minute on two cores
    # that vLLM's engine keeps busy, long enough for the queue to drain first (its deadline starts after
    # them, so they do not change its verdict).
    # 12 s: under this load the API server's /health alone took ~6 s once on CI's two cores; the queue
    # (64 long requests) still outlasts the budget.
    # As the kubelet does, a pod leaves the endpoints only after failureThreshold failed probes in a row:
    # a probe whose own process was starved before it sent /health (once on CI's two cores: 12 s gone
    # before the first request) is tried again; a verdict of "hung" fails at once.
    verdicts: list[str] = []
    for _ in range(FAILURE_THRESHOLD):
        try:
            note = asyncio.run(check(url, base_model=BASE, api_key=API_KEY, timeout=12, required=None))
        except NotReady as exc:
            assert "the engine is hung" not in str(exc), f"a busy engine was called hung: {exc}"
            verdicts.append(str(exc))
            continue
        assert note.startswith("busy: the one-token completion waited over"), note
        break
    else:
        raise AssertionError(f"{FAILURE_THRESHOLD} probes in a row said not ready: {verdicts}")
    assert any(t.is_alive() for t in occupiers), (
        "the long requests ended before the probe: no queue was tested"
    )

    # 4. Killed: the watchdog takes vLLM and its engine down too (no orphan holds the port or memory).
    orphans = srv.kill()
    assert orphans, "the supervisor had started no process"
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans),
               "vLLM's processes to end after the supervisor was killed", timeout=60)  # fmt: skip
    for thread in occupiers:
        thread.join(timeout=60)
    damaged = damage_adapters(settings, live_adapter=settings.adapters_dir / "rh-sentiment" / "v1")
    srv.start()
    results: list[tuple[int, str]] = []

    def ready() -> bool:
        srv.alive()
        results.append(readiness(url, settings))
        return results[-1][0] == 0

    # every 2 s: each probe is a process of its own, and two cores also start vLLM meanwhile
    wait_until(ready, "readiness after the restart", server=srv, every=2.0)
    wanted = [n for n in NAMES if n != "rh-extra@v1"]
    assert all(answers(url, name) for name in wanted), "ready, but a registered adapter does not answer"
    assert "rh-extra@v1" not in served(url), "an unloaded version came back after a restart"
    assert any(code == 1 for code, _ in results), "readiness never said 'not ready' while vLLM started"

    # Every damaged version was skipped with its reason, named in the log, the state file and the registry.
    assert not set(damaged) & served(url)
    server_state = read_state(state_file(settings))
    assert server_state is not None and server_state.phase == "ready"
    log = srv.log_path.read_text()
    registry = open_registry(settings).read()
    for name, why in damaged.items():
        assert why in server_state.failed[name], (name, server_state.failed[name])
        assert f"not serving {name}: " in log
        failure = registry.resolve(name).failure
        assert failure is not None and why in failure.reason, (name, failure)
    assert sum(e.action == "load-failed" for e in registry.history) == len(damaged)
    assert all(answers(url, name) for name in wanted), "the good adapters stopped answering"


def damage_adapters(settings: Settings, *, live_adapter: Path) -> dict[str, str]:
    """Five damaged versions of a good adapter, each registered as "serving"; served name -> the words
    the reason for skipping it must contain."""
    import safetensors.numpy

    from loraplane.common.files import sha256_file
    from loraplane.platform.adapters import register_adapter
    from loraplane.registry.model import Adapter, AdapterVersion, HistoryEvent

    def copy(name: str) -> Path:
        target = settings.adapters_dir / name / "v1"
        shutil.copytree(live_adapter, target)
        return target / "adapter_model.safetensors"

    def header_length(raw: bytes) -> int:
        return 8 + int.from_bytes(raw[:8], "little")

    def as_legacy_entry(name: str, weights: Path) -> None:
        """What a registry written by loraplane <= 0.2 (header-only checks) holds for such a file."""
        entry = AdapterVersion(
            name=name, version="v1", served_name=f"{name}@v1", path=str(weights.parent),
            weights_sha256=sha256_file(weights), state="serving",
        )  # fmt: skip
        with open_registry(settings).transaction() as state:
            state.adapters[name] = Adapter(name=name, versions={"v1": entry})
            state.history.append(HistoryEvent(action="register", adapter=name, version="v1"))

    truncated = copy("bad-trunc")
    truncated.write_bytes(truncated.read_bytes()[:-1])
    header_only = copy("bad-header")
    header_only.write_bytes(header_only.read_bytes()[: header_length(header_only.read_bytes())])
    zeroed = copy("bad-zero")
    raw = zeroed.read_bytes()
    zeroed.write_bytes(raw[: header_length(raw)] + bytes(len(raw) - header_length(raw)))
    nan = copy("bad-nan")
    tensors = safetensors.numpy.load_file(str(nan))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].copy()
    tensors[first].flat[0] = float("nan")
    safetensors.numpy.save_file(tensors, str(nan))
    for name, weights in (("bad-trunc", truncated), ("bad-header", header_only), ("bad-zero", zeroed),
                          ("bad-nan", nan)):  # fmt: skip
        as_legacy_entry(name, weights)
    gone = copy("bad-gone")
    entry = register_adapter(settings, gone.parent, name="bad-gone", version="v1")
    with open_registry(settings).transaction() as state:
        mark_serving(state, state.resolve(entry.ref))
    shutil.rmtree(gone.parent)
    return {
        "bad-trunc@v1": "shorter than its header says",
        "bad-header@v1": "shorter than its header says",
        "bad-zero@v1": "is all zeros",
        "bad-nan@v1": "non-finite",
        "bad-gone@v1": "is gone",
    }

"""``loraplane serve``: vLLM and the gateway from the local registry, as a user starts them.

One real stack (a vLLM start costs about a minute here), in order:

1. ``loraplane serve`` prints the gateway's URL and a client key once every registered adapter was
   tried; the official ``openai`` client uses them with ``NAME:prod``;
2. admin commands (``adapters promote``) find vLLM's key in the home, with no LORAPLANE_API_KEY;
3. limits come from the running server: with ``--max-lora-rank 8`` a rank-16 adapter is refused at
   registration, naming the server's limit (it registered before the server ran: 16 is the default);
4. ``--max-cpu-loras 2``: a third adapter is refused (exit 3, naming the limit and the fix) before vLLM
   sees it, the registry unchanged; after an unload it loads;
5. ``kill -9`` of ``loraplane serve``: neither vLLM, its engine nor the gateway outlives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from support import BASE, SENTIMENT_PROMPT, Live, wait_until, write_fake_adapter

from loraplane.platform.quickstart import free_port

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    out: Path
    home: Path
    adapters: Path
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None

    def alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.out.read_text()[-3000:] + _logs(
            self.home
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "loraplane.platform.cli", "--adapters-root", str(self.adapters), *args],
            capture_output=True, text=True, env=self.env, timeout=300,
        )  # fmt: skip


def _logs(home: Path) -> str:
    return "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((home / "logs").glob("*.log"))
    )


@pytest.fixture
def stack(live: Live, demo_model: Path, tmp_path: Path) -> Iterator[Stack]:
    home, adapters = tmp_path / "home", tmp_path / "adapters"
    shutil.copytree(live.adapters["sentiment"], adapters / "sentiment" / "v1")
    env = {k: v for k, v in os.environ.items() if k != "LORAPLANE_API_KEY"}
    env.update(LORAPLANE_HOME=str(home), LORAPLANE_SERVER_URL=f"http://127.0.0.1:{free_port()}")
    out = tmp_path / "serve.out"
    stack = Stack(out, home, adapters, env)
    registered = stack.cli("adapters", "register", str(adapters / "sentiment" / "v1"))
    assert registered.returncode == 0, registered.stderr
    with out.open("w") as sink:
        stack.proc = subprocess.Popen(
            [
                sys.executable, "-m", "loraplane.platform.cli", "--adapters-root", str(adapters), "serve",
                "--model", str(demo_model), "--served-model-name", BASE, "--port", str(free_port()),
                "--max-loras", "2", "--max-lora-rank", "8", "--max-model-len", "256", "--dtype", "float32",
                "--kv-cache-gib", "1", "--max-cpu-loras", "2",
            ],
            stdout=sink, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
    try:
        yield stack
    finally:
        if stack.proc is not None and stack.proc.poll() is None:
            stack.proc.send_signal(signal.SIGINT)
            stack.proc.wait(timeout=120)


def test_serve_gives_a_url_and_key_for_any_openai_client_and_leaves_nothing_behind(stack: Stack) -> None:
    from openai import OpenAI

    wait_until(
        lambda: "API key:" in stack.out.read_text(), "loraplane serve to print its URL", alive=stack.alive
    )
    printed = stack.out.read_text()
    url = re.search(r"URL:\s+(\S+)", printed)
    key = re.search(r"API key:\s+(\S+)", printed)
    assert url and key, printed
    assert "serving 1 adapter version(s)" in printed

    # 2. The admin command reaches vLLM with the key serve keeps in the home (no LORAPLANE_API_KEY).
    promoted = stack.cli("adapters", "promote", "sentiment@v1", "--force", "--reason", "serve e2e")
    assert promoted.returncode == 0, promoted.stderr

    # 1. Any OpenAI client, with the printed URL and key, through the gateway.
    client = OpenAI(base_url=url[1], api_key=key[1])
    reply = client.chat.completions.create(
        model="sentiment:prod",
        temperature=0,
        max_tokens=8,
        messages=[
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": SENTIMENT_PROMPT},
        ],
    )
    assert reply.choices[0].message.content == "positive"
    assert reply.model == "sentiment@v1"
    wrong_key = OpenAI(base_url=url[1], api_key="not-the-key", max_retries=0)
    with pytest.raises(Exception, match="401"):
        wrong_key.models.list()

    # 3. The server's own rank limit applies to registration.
    wide = write_fake_adapter(stack.adapters / "wide" / "v1", r=16)
    refused = stack.cli("adapters", "register", str(wide), "--name", "wide", "--version", "v1")
    assert refused.returncode == 2 and "exceeds the server's max_lora_rank 8" in " ".join(
        refused.stderr.split()
    )

    # 4. Two adapters fill a server started with --max-cpu-loras 2: a third is refused before vLLM sees
    # it (vLLM would evict one while serving), and fits once one is unloaded.
    for n in ("v2", "v3"):
        shutil.copytree(stack.adapters / "sentiment" / "v1", stack.adapters / "sentiment" / n)
        path = str(stack.adapters / "sentiment" / n)
        assert stack.cli("adapters", "register", path, "--name", "sentiment", "--version", n).returncode == 0
    loaded = stack.cli("adapters", "load", "sentiment@v2")
    assert loaded.returncode == 0, loaded.stderr
    full = stack.cli("adapters", "load", "sentiment@v3")
    said = " ".join(full.stderr.split())
    assert full.returncode == 3, full.stderr
    assert "cannot load sentiment@v3" in said and "--max-cpu-loras 2" in said and "adapters unload" in said
    listed = {m.id for m in client.models.list().data}
    assert "sentiment@v3" not in listed and {"sentiment@v1", "sentiment@v2"} <= listed
    shown = stack.cli("adapters", "show", "sentiment", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["adapter"]["versions"]["v3"]["state"] == "registered"
    assert stack.cli("adapters", "unload", "sentiment@v2").returncode == 0
    loaded = stack.cli("adapters", "load", "sentiment@v3")
    assert loaded.returncode == 0, loaded.stderr

    # 5. kill -9: the watchdogs take every process down with it.
    assert stack.proc is not None
    tree = psutil.Process(stack.proc.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "loraplane.serving.gateway" in names and "vllm.entrypoints.openai.api_server" in names, names
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait(timeout=30)

    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)

    wait_until(all_gone, "every process loraplane serve started to end", timeout=120)

"""Fixtures only: the demo base model, one real vLLM server per session, the kwok cluster, the real
node (helpers they share with the tests: support.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import (
    API_KEY,
    ROOT,
    Cluster,
    Live,
    write_fake_adapter,
)

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter
from loraplane.platform.quickstart import demo_server_config, demo_trainer_config, free_port
from loraplane.serving.launcher import VLLMServer
from loraplane.trainer.demo_tasks import TASKS, write_task_files


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplane.trainer.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("base") / "demo-model")


@pytest.fixture(scope="session")
def vllm_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real vLLM server for the whole session, started early so it loads while adapters train."""
    config = demo_server_config(demo_model, free_port(), API_KEY)
    # vLLM's GET /load: how many generation requests its API server holds (the gateway's disconnect test)
    # Room for every adapter the session's tests load (they share this server and rarely unload):
    # vLLM must never evict one while serving (serving/capacity.py).
    extra = ("--enable-server-load-tracking",)
    config = config.model_copy(update={"extra_args": extra, "max_cpu_loras": 256})
    server = VLLMServer(config, tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live(vllm_server: VLLMServer, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Live:
    work = tmp_path_factory.mktemp("e2e")
    root = work / "adapters"
    eval_sets, adapters = {}, {}
    for task in TASKS.values():
        train, ev = write_task_files(task, work / "data")
        eval_sets[task.name] = ev
        cfg = work / f"{task.name}.yaml"
        cfg.write_text(yaml.safe_dump(demo_trainer_config(task.name, demo_model, train, root)))
        # The trainer's own entry point, as a separate process: what a Job runs in the cluster.
        proc = subprocess.run(
            [sys.executable, "-m", "loraplane.trainer", "--config", str(cfg)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        adapters[task.name] = Path(json.loads(proc.stdout.strip().splitlines()[-1])["adapter"])
    vllm_server.wait_ready(timeout=600)
    settings = Settings(
        home=work / "state", adapters_root=root, server_url=vllm_server.url, api_key=API_KEY, max_lora_rank=8
    )
    for path in adapters.values():
        register_adapter(settings, path)
    return Live(server=vllm_server, settings=settings, eval_sets=eval_sets, adapters=adapters)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A registry and adapters root of the test's own (no server)."""
    return Settings(
        home=tmp_path / "state",
        adapters_root=tmp_path / "adapters",
        server_url="http://127.0.0.1:9",
        max_lora_rank=8,
    )


@pytest.fixture
def fake_adapter(settings: Settings) -> Iterator[Path]:
    yield write_fake_adapter(settings.adapters_dir / "demo" / "v1")


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster per test session, its state in the session's temp dir, stopped even when tests fail."""
    import os

    work = tmp_path_factory.mktemp("kwok")
    env = {
        **os.environ,
        "LORAPLANE_K8S_CLUSTER": f"pytest-{os.getpid()}",
        "LORAPLANE_KWOK_WORKDIR": str(work),
    }
    script = str(ROOT / "scripts" / "k8s-cluster.sh")
    tools = subprocess.run(["bash", str(ROOT / "scripts" / "k8s-tools.sh")], capture_output=True, text=True)
    assert tools.returncode == 0, tools.stderr[-3000:]
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True, env=env)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        kubeconfig = subprocess.run(["bash", script, "kubeconfig"], capture_output=True, text=True, env=env)
        yield Cluster(Path(kubeconfig.stdout.strip()), Path(tools.stdout.strip()))
    finally:
        subprocess.run(["bash", script, "stop"], capture_output=True, text=True, env=env)


@pytest.fixture
def k8s_settings(k8s_cluster: Cluster, tmp_path: Path) -> Settings:
    """The chart's CRD installed, and a namespace of the test's own."""
    k8s_cluster.kubectl("apply", "-f", str(ROOT / "charts" / "loraplane" / "crds"))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/loraadapters.loraplane.dev")
    import uuid

    namespace = f"reg-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", namespace)
    return Settings(
        home=tmp_path / "state",
        adapters_root=tmp_path / "adapters",
        server_url="http://127.0.0.1:9",
        registry="kubernetes",
        namespace=namespace,
        kubeconfig=k8s_cluster.kubeconfig,
    )


# --- the real single-node cluster (scripts/real-node.sh; tests/real_node.py) ---------------------------
from real_node import RealNode, report_failure, session  # noqa: E402


@pytest.fixture(scope="session")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A real node (kubelet, containerd, kube-proxy, CoreDNS) per session; the host checked clean after."""
    yield from session(tmp_path_factory.mktemp("real-node"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed real-node test's report gets the cluster's pods, events and container logs."""
    outcome = yield
    report_failure(item, outcome.get_result())

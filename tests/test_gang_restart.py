"""Multi-node gang restarts for real on CPU: two torchrun elastic agents (two "pods") on loopback.

Each agent is what a pod of a multi-node run executes (``python -m loraplane.trainer.elastic``, the
chart's command: torchrun's elastic agent, c10d rendezvous, ``--nnodes=2``, gloo on CPU) around the
real trainer (``-m loraplane.trainer --config``). A lost pod is SIGKILL of its agent and its worker
(torchrun starts workers in their own session: killing the agent's process group would leave the
worker training); its replacement is the same command started again, as the Job controller does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import psutil
import pytest
from support import wait_until
from test_trainer_runs import _config as trainer_config

from loraplane.platform.quickstart import free_port
from loraplane.trainer.checkpoints import scan
from loraplane.trainer.demo_tasks import TASKS, write_task_files
from loraplane.trainer.exit_codes import PEER_LOST, PREEMPTED

pytestmark = pytest.mark.e2e

DEADLINE_S = 300.0
STEPS = 150


def _config(work: Path, demo_model: Path) -> Path:
    """The trainer tests' config (tests/test_trainer_runs.py), longer, with a checkpoint every 2 steps."""
    train = write_task_files(TASKS["sentiment"], work / "data")[0]
    return trainer_config(work, demo_model, train, max_steps=STEPS, every=2)


class Pod:
    """One node of the run: the elastic agent with JOB_COMPLETION_INDEX as an Indexed Job sets it."""

    def __init__(self, index: int, port: int, config: Path, log: Path) -> None:
        self.log = log
        self._out: IO[str] = log.open("w")
        env = {
            **os.environ,
            "JOB_COMPLETION_INDEX": str(index),
            "LORAPLANE_LOG_FORMAT": "json",
            "OMP_NUM_THREADS": "1",
        }
        argv = [
            sys.executable, "-m", "loraplane.trainer.elastic",
            "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=gang-test", "--rdzv-conf=join_timeout=120",
            "--max-restarts=2", "--monitor-interval=0.5",
            "-m", "loraplane.trainer", "--config", str(config),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def workers(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children() if c.status() != "zombie"]
        except psutil.NoSuchProcess:
            return []

    def lose(self) -> None:
        """What a lost node does to the pod: every process gone at once, no signal handler runs."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for proc in procs:
            proc.kill()
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> None:
        assert self.proc.poll() is None, (
            f"{self.log.name} exited {self.proc.returncode}:\n{self.text()[-4000:]}"
        )

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.lose()
        self._out.close()


def _complete_steps(run_dir: Path) -> list[int]:
    return [c.step for c in scan(run_dir)[0]]


def _resumed_steps(*pods: Pod) -> list[int]:
    steps = []
    for pod in pods:
        for line in pod.text().splitlines():
            if line.startswith("{") and '"resuming from checkpoint"' in line:
                steps.append(int(json.loads(line)["step"]))
    return steps


def _published(work: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((work / "adapters" / "bot" / "v1" / "manifest.json").read_text())
    return manifest


def _start_both(work: Path, config: Path, port: int, tag: str) -> tuple[Pod, Pod]:
    return Pod(0, port, config, work / f"pod0-{tag}.log"), Pod(1, port, config, work / f"pod1-{tag}.log")


def _lose_once_a_checkpoint_is_complete(pods: tuple[Pod, Pod], victim: Pod, run_dir: Path) -> None:
    def alive() -> None:
        for pod in pods:
            pod.alive()

    wait_until(
        lambda: bool(_complete_steps(run_dir)), "a complete checkpoint", timeout=DEADLINE_S, alive=alive
    )
    victim.lose()


def test_a_lost_pod_restarts_the_whole_gang_from_the_newest_complete_checkpoint(
    tmp_path: Path, demo_model: Path
) -> None:
    config, run_dir, port = _config(tmp_path, demo_model), tmp_path / "run", free_port()
    host, lost = _start_both(tmp_path, config, port, "first")
    replacement = None
    try:
        _lose_once_a_checkpoint_is_complete((host, lost), lost, run_dir)
        # The survivor's worker fails (its gloo peer vanished); its agent stays and waits for a new round.
        old_workers = set(host.workers())
        wait_until(
            lambda: not set(host.workers()) & old_workers, "the survivor's worker to fail", timeout=120
        )
        host.alive()
        newest = _complete_steps(run_dir)[-1]
        # A checkpoint interrupted mid-write is newer, but not complete: never resumed from.
        partial = run_dir / f"checkpoint-{newest + 1}"
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_bytes(b"truncated")

        replacement = Pod(1, port, config, tmp_path / "pod1-replacement.log")
        wait_until(
            lambda: bool(host.workers()), "the survivor to restart its worker", timeout=120, alive=host.alive
        )
        assert not set(host.workers()) & old_workers, "a new worker process, under the same agent"
        assert host.finish() == 0, host.text()[-4000:]
        assert replacement.finish() == 0, replacement.text()[-4000:]
    finally:
        for pod in (host, lost, replacement):
            if pod is not None:
                pod.stop()

    assert "failed (exitcode: 1)" in host.text(), "the agent saw its worker fail, and did not exit"
    assert _resumed_steps(host, replacement) == [newest], "one resume, from the newest complete checkpoint"
    assert "skipping partial checkpoint" in host.text() + replacement.text()
    manifest = _published(tmp_path)
    assert manifest["metrics"]["resumed_from_step"] == newest
    assert manifest["metrics"]["steps"] == STEPS
    assert [p.name for p in (tmp_path / "adapters" / "bot").iterdir()] == ["v1"], "published exactly once"


def test_losing_pod_0_the_rendezvous_host_stops_the_others_with_peer_lost(
    tmp_path: Path, demo_model: Path
) -> None:
    """Pod 0's agent holds the c10d store: without it no round can form. The other pods exit 76 (the
    chart's podFailurePolicy ignores it), the Job controller replaces every pod, they resume."""
    config, run_dir, port = _config(tmp_path, demo_model), tmp_path / "run", free_port()
    host, other = _start_both(tmp_path, config, port, "first")
    second: tuple[Pod, Pod] | None = None
    try:
        _lose_once_a_checkpoint_is_complete((host, other), host, run_dir)
        assert other.finish() == PEER_LOST, other.text()[-4000:]
        newest = _complete_steps(run_dir)[-1]
        second = _start_both(tmp_path, config, port, "second")
        assert [pod.finish() for pod in second] == [0, 0], second[0].text()[-3000:] + second[1].text()[-3000:]
    finally:
        for pod in (host, other, *(second or ())):
            pod.stop()
    assert "lost the rendezvous host" in other.text()
    assert _resumed_steps(*second) == [newest]
    assert _published(tmp_path)["metrics"]["resumed_from_step"] == newest


def test_sigterm_to_every_pod_saves_and_each_pod_exits_75(tmp_path: Path, demo_model: Path) -> None:
    """A drain or preemption of the whole run: the kubelet sends each pod's first process (the
    launcher) SIGTERM; torchrun's agent forwards it, the workers save and stop, and the pod exits 75
    (preempted, retried: the next pods resume), not 143 (which `train status` reads as killed unsaved)."""
    config, run_dir, port = _config(tmp_path, demo_model), tmp_path / "run", free_port()
    pods = _start_both(tmp_path, config, port, "term")
    try:

        def alive() -> None:
            for pod in pods:
                pod.alive()

        wait_until(
            lambda: bool(_complete_steps(run_dir)), "a complete checkpoint", timeout=DEADLINE_S, alive=alive
        )
        for pod in pods:
            pod.proc.send_signal(signal.SIGTERM)
        codes = [pod.finish() for pod in pods]
    finally:
        for pod in pods:
            pod.stop()
    assert codes == [PREEMPTED, PREEMPTED], [pod.text()[-2000:] for pod in pods]
    assert all("stopped by SIGTERM" in pod.text() for pod in pods)
    assert _complete_steps(run_dir), "a complete checkpoint to resume from"

"""What a run cost, in its manifest: GPU-seconds (devices x training wall time, every attempt counted),
tokens trained and tokens/s; and the two commands that print it (`adapters show`, `train status`).

The e2e tests train the demo model for real: one process stopped by SIGTERM and resumed (two
attempts), and a two-process torchrun (two devices); the others check the summary and the fallbacks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer_runs import _config  # the trainer tests' config, one definition

from loraplane.common.settings import Settings
from loraplane.platform.quickstart import free_port
from loraplane.trainer.checkpoints import MARKER
from loraplane.trainer.cost import COST_FILE, cost_record, cost_summary, manifest_cost
from loraplane.trainer.demo_tasks import TASKS, write_task_files
from loraplane.trainer.exit_codes import PREEMPTED

DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task_files(TASKS["sentiment"], tmp_path_factory.mktemp("data"))[0]


def _env() -> dict[str, str]:
    return {**os.environ, "LORAPLANE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _trainer(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loraplane.trainer", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def _until_step(proc: subprocess.Popen[str], step: int) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("msg") == "train progress" and event.get("step", 0) >= step:
            return
    pytest.fail(f"trainer exited ({proc.wait()}) before step {step}")


def _logged_tokens(adapter: Path) -> int:
    """The Trainer's own count of trained tokens at its last logging step (metrics.jsonl)."""
    logged = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    return int([e["num_input_tokens_seen"] for e in logged if "num_input_tokens_seen" in e][-1])


@pytest.mark.e2e
def test_a_preempted_and_resumed_run_counts_both_attempts(
    tmp_path: Path, demo_model: Path, train_file: Path, settings: Settings
) -> None:
    config = _config(tmp_path, demo_model, train_file, max_steps=400, every=None)
    proc = _trainer(config)
    _until_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == PREEMPTED, err[-3000:]
    (checkpoint,) = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert (checkpoint / MARKER).is_file()
    recorded = json.loads((checkpoint / COST_FILE).read_text())
    assert recorded["attempts"] == 1 and recorded["train_seconds"] > 0
    step = int(checkpoint.name.split("-")[1])

    resumed = _config(tmp_path, demo_model, train_file, max_steps=step + 4, every=None)
    proc = _trainer(resumed)
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err[-3000:]
    adapter = Path(json.loads(out.splitlines()[-1])["adapter"])
    manifest = json.loads((adapter / "manifest.json").read_text())
    cost, metrics = manifest["cost"], manifest["metrics"]

    assert cost["devices"] == 1 and cost["accelerator"] == "cpu"
    assert cost["attempts"] == 2
    # The whole run: the first attempt's seconds up to its checkpoint plus the second attempt's.
    assert cost["train_seconds"] == pytest.approx(
        recorded["train_seconds"] + metrics["train_seconds"], abs=0.02
    )
    assert cost["device_seconds"] == cost["train_seconds"]
    assert cost["gpu_seconds"] == 0.0 and cost["gpu_hours"] == 0.0, "a CPU run costs no GPU time"
    # Tokens: the Trainer's own count (restored from the checkpoint, so both attempts), as it logged it.
    assert cost["tokens_trained"] == int(metrics["tokens_seen"]) == _logged_tokens(adapter) > 0
    assert cost["tokens_trained"] <= (step + 4) * 4 * 128, "at most steps x batch x max_seq_length"
    # Throughput is the last attempt's: its tokens over its seconds (4 steps of the 4 + step).
    assert 0 < cost["tokens_per_second"] == metrics["tokens_per_second"]
    assert cost["tokens_per_second"] * metrics["train_seconds"] < cost["tokens_trained"]

    # `adapters show` prints it next to the version; its JSON carries the record.
    from loraplane.platform.adapters import register_adapter

    register_adapter(settings, adapter)
    env = {
        **os.environ,
        "LORAPLANE_HOME": str(settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(settings.adapters_dir),
        "LORAPLANE_SERVER_URL": settings.server_url,
        "COLUMNS": "400",
    }
    cli = [sys.executable, "-m", "loraplane.platform.cli", "adapters", "show", "bot"]
    shown = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "1 cpu x" in shown.stdout and "over 2 attempts" in shown.stdout, shown.stdout
    as_json = subprocess.run([*cli, "-o", "json"], capture_output=True, text=True, env=env)
    assert json.loads(as_json.stdout)["costs"]["v1"] == cost


@pytest.mark.e2e
def test_two_processes_count_two_devices(tmp_path: Path, demo_model: Path, train_file: Path) -> None:
    config = _config(tmp_path, demo_model, train_file, max_steps=4, every=None)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "loraplane.trainer",
        "--config",
        str(config),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter = tmp_path / "adapters" / "bot" / "v1"
    manifest = json.loads((adapter / "manifest.json").read_text())
    cost = manifest["cost"]
    assert cost["devices"] == 2 and cost["attempts"] == 1
    assert cost["device_seconds"] == pytest.approx(2 * cost["train_seconds"], abs=0.02)
    # Both ranks' tokens: the Trainer gathers the count across processes.
    assert cost["tokens_trained"] == _logged_tokens(adapter) > 0
    assert cost["tokens_per_device_second"] == pytest.approx(cost["tokens_per_second"] / 2, rel=0.01, abs=0.1)


def test_summary_of_a_gpu_run_and_of_an_old_manifest() -> None:
    record = cost_record(
        devices=4,
        accelerator="cuda",
        train_seconds=3720.0,
        attempt_seconds=1800.0,
        attempts=2,
        tokens_trained=12_300_000,
        attempt_tokens=6_000_000,
    )
    assert record["gpu_seconds"] == record["device_seconds"] == 14880.0
    assert record["gpu_hours"] == pytest.approx(4.1333, abs=1e-4)
    assert record["tokens_per_second"] == pytest.approx(3333.3, abs=0.1)
    assert cost_summary(record) == (
        "4 cuda x 1h02m00s = 4.13 GPU-hours (14880 GPU-seconds) over 2 attempts; "
        "12.3M tokens at 3.33k tokens/s"
    )
    # A version published before the cost was recorded: what its metrics say, devices unknown.
    old = {"metrics": {"train_seconds": 42.5, "tokens_seen": 5000.0, "tokens_per_second": 117.6}}
    assert cost_summary(manifest_cost(old)) == (
        "42.5s training (device count not recorded); 5k tokens at 118 tokens/s"
    )
    assert manifest_cost({}) is None and manifest_cost(None) is None and cost_summary(None) == ""


def test_train_status_reads_the_cost_of_a_succeeded_run_from_its_manifest() -> None:
    """`train status` prints the cost of a succeeded run (the manifest of the version it registered)
    and none for a run still going (the cluster part of the command is tested in test_training_k8s)."""
    from loraplane.platform.cli.train import _training_cost

    record = cost_record(
        devices=8,
        accelerator="cuda",
        train_seconds=100.0,
        attempt_seconds=100.0,
        attempts=1,
        tokens_trained=1000,
        attempt_tokens=1000,
    )
    assert _training_cost(None, "job", "Succeeded", {"cost": record}) == record
    assert _training_cost(None, "job", "Running", {"cost": record}) is None

"""Experiment tracking (``tracking:`` in the training config): TensorBoard event files published with the
adapter, and MLflow runs on a real tracking server.

The e2e tests train the demo model for real (the trainer as a process, stopped by SIGTERM and resumed)
against a real ``mlflow server`` started here on a free loopback port (its sqlite store: MLflow 3
refuses to start on its deprecated file store), and read everything back through MLflow's REST API and
TensorBoard's own event reader. The others check the configuration and the failures, without training.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import wait_until
from test_evals import _openai, _run, _suite, _write_suite  # the eval tests' suite and fake endpoint
from test_trainer_runs import _config, _finish, _progress_steps, _start  # the trainer tests' helpers

from loraplane.common.errors import ConfigError, InvalidInputError, LoraplaneError
from loraplane.evals.render import write_report
from loraplane.platform.quickstart import free_port
from loraplane.serving.process_group import ProcessGroup
from loraplane.trainer.config import load_config
from loraplane.trainer.demo_tasks import TASKS, write_task_files
from loraplane.trainer.exit_codes import PREEMPTED
from loraplane.trainer.tracking import TRACKING_FILE, check_packages, log_eval_to_mlflow


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task_files(TASKS["sentiment"], tmp_path_factory.mktemp("data"))[0]


REQUIRED = [
    "base_model.path=m",
    "dataset.path=/data/train.jsonl",
    "output.adapters_root=/adapters",
    "output.name=bot",
]

# --- configuration --------------------------------------------------------------------------------


def test_tensorboard_is_on_by_default_and_mlflow_and_wandb_are_opt_in() -> None:
    config = load_config(None, REQUIRED)
    assert config.tracking.tensorboard is True and config.tracking.mlflow is None
    assert config.tracking.report_to() == ["tensorboard"]
    config = load_config(
        None,
        [
            *REQUIRED,
            "tracking.tensorboard=false",
            "tracking.mlflow={uri: 'http://mlflow.ml.svc:5000/', experiment: support, tags: {team: nlp}}",
            "tracking.wandb.project=support",
        ],
    )
    assert config.tracking.report_to() == ["mlflow", "wandb"]
    assert config.tracking.mlflow is not None and config.tracking.mlflow.uri == "http://mlflow.ml.svc:5000"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "tracking.mlflow.uri=localhost:5000",
            "tracking.mlflow.uri: got 'localhost:5000'; the URI has no scheme; use http://localhost:5000",
        ),
        (
            "tracking.mlflow.uri=http://alice:secret@mlflow:5000",
            "tracking.mlflow.uri: got 'http://alice:secret@mlflow:5000'; credentials in the URI would be "
            "written into the config and the manifest; remove them and set MLFLOW_TRACKING_USERNAME",
        ),
        (
            "tracking.mlflow.uri=file:///tmp/mlruns",
            "tracking.mlflow.uri: got 'file:///tmp/mlruns'; MLflow's file store is deprecated",
        ),
        (
            "tracking.mlflow.uri=sqlite:///mlflow.db",
            "use sqlite:////ABSOLUTE/PATH.db",
        ),
        (
            "tracking.mlflow.uri=ftp://host/x",
            "unsupported tracking URI scheme 'ftp'; use the tracking server's",
        ),
        ("tracking.mlflow={experiment: x}", "tracking.mlflow.uri: required field is missing (add it)"),
        (
            "tracking.mlfow.uri=http://h:5000",
            "tracking.mlfow: unknown field (remove it, or check its spelling)",
        ),
        ("tracking.mlflow={uri: 'http://h', run_id: abc}", "tracking.mlflow.run_id: unknown field"),
        (
            "tracking.mlflow={uri: 'http://h', tags: {mlflow.user: x}}",
            "tag 'mlflow.user': the prefixes 'mlflow.' and 'loraplane.' are reserved",
        ),
        (
            "tracking.mlflow={uri: 'http://h', experiment: ' '}",
            "tracking.mlflow.experiment: got ' '; must not",
        ),
        ("tracking.wandb.project=team/run", "tracking.wandb.project: got 'team/run'; a W&B project name is"),
        ("tracking.tensorboard=sometimes", "tracking.tensorboard: got 'sometimes'"),
    ],
)
def test_bad_tracking_settings_name_the_field_the_value_and_the_fix(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*REQUIRED, override])
    assert expected in str(caught.value)


def test_a_tracker_whose_package_is_missing_is_refused_with_the_install_line() -> None:
    config = load_config(None, [*REQUIRED, "tracking.wandb.project=support"])
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here")
    with pytest.raises(InvalidInputError) as caught:
        check_packages(config.tracking)
    assert "tracking.wandb needs the wandb package" in str(caught.value)
    assert caught.value.hint == "pip install wandb, or remove tracking.wandb"


# --- a tracking server that is not there, or not MLflow -----------------------------------------------


@pytest.fixture
def not_mlflow() -> Iterator[str]:
    """A plain HTTP server on loopback that answers 404 to everything (some other service on the port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/nothing-here"
    server.shutdown()
    server.server_close()


def test_an_unreachable_or_wrong_tracking_server_fails_the_run_before_training(
    tmp_path: Path, train_file: Path, not_mlflow: str
) -> None:
    from loraplane.trainer.train import train_and_publish

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    no_model = tmp_path / "not-loaded"  # the server is asked before any model or data is read
    config = load_config(_config(tmp_path, no_model, train_file, tracking={"mlflow": {"uri": down}}))
    started = time.monotonic()
    with pytest.raises(LoraplaneError) as caught:
        train_and_publish(config)
    assert time.monotonic() - started < 60, "one quick try, not MLflow's minutes of retries"
    error = caught.value
    assert error.exit_code == 1, "a server that is down may come back: a retry may succeed"
    assert f"cannot reach the MLflow tracking server at {down} (before training: nothing was trained)" in str(
        error
    )
    assert error.hint is not None and "mlflow server" in error.hint and "tracking.mlflow.uri" in error.hint
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "run" / "run.json").exists()

    config = load_config(_config(tmp_path, no_model, train_file, tracking={"mlflow": {"uri": not_mlflow}}))
    with pytest.raises(InvalidInputError) as refused:
        train_and_publish(config)
    assert refused.value.exit_code == 2, "a server that answers with an error will answer it again"
    assert f"the MLflow tracking server at {not_mlflow} refused before training" in str(refused.value)
    assert not (tmp_path / "adapters").exists()


# --- a real MLflow tracking server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` (sqlite store, artifacts proxied into a local directory) on a free loopback
    port, in a process group of its own (it starts a uvicorn worker), stopped with everything it started."""
    work = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log_file = (work / "server.log").open("wb")
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{work / 'mlflow.db'}",
        "--artifacts-destination",
        str(work / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    server = ProcessGroup(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).text.strip() == "OK"
        except httpx.HTTPError:
            return False

    def alive() -> None:
        if server.poll() is not None:
            pytest.fail(
                f"mlflow server exited ({server.poll()}):\n{(work / 'server.log').read_text()[-3000:]}"
            )

    try:
        wait_until(up, "the MLflow tracking server", timeout=120, every=0.2, alive=alive)
        yield url
    finally:
        server.stop(grace=10)
        log_file.close()


def _api(url: str, endpoint: str, **params: Any) -> Any:
    """MLflow's REST API (what any client sees), GET."""
    response = httpx.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _run_info(url: str, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = _api(url, "runs/get", run_id=run_id)["run"]
    return run


def _history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = _api(url, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(m.get("step", 0)), float(m["value"])) for m in metrics)


def _artifacts(url: str, run_id: str, path: str = "") -> list[str]:
    files = _api(url, "artifacts/list", run_id=run_id, path=path).get("files", [])
    return sorted(f["path"] for f in files)


@pytest.mark.e2e
def test_a_preempted_and_resumed_run_is_one_mlflow_run_and_one_tensorboard_curve_next_to_the_adapter(
    tmp_path: Path, demo_model: Path, train_file: Path, mlflow_server: str
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(
        tmp_path,
        demo_model,
        train_file,
        max_steps=12,
        every=None,
        dataset={"eval_fraction": 0.2},
        tracking={"mlflow": {"uri": mlflow_server, "experiment": "tracking-e2e", "tags": {"team": "nlp"}}},
    )
    proc = _start(config)
    _progress_steps(proc, until=3)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == PREEMPTED, err[-3000:]
    recorded = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())["mlflow"]
    run_id = recorded["run_id"]
    first = _run_info(mlflow_server, run_id)
    assert first["info"]["status"] == "KILLED", "a preempted attempt ends its run KILLED"
    logged_before = _history(mlflow_server, run_id, "loss")
    assert logged_before and logged_before[0][0] == 1
    assert not (tmp_path / "adapters" / "bot").exists() or not any((tmp_path / "adapters" / "bot").iterdir())

    code, out, err = _finish(_start(config))
    assert code == 0, err[-3000:]
    assert "continuing the MLflow run of the earlier attempt" in err
    assert len(out.strip().splitlines()) == 1, "stdout is the result line only (MLflow's run URL: stderr)"
    adapter = Path(json.loads(out.splitlines()[-1])["adapter"])
    manifest = json.loads((adapter / "manifest.json").read_text())
    resumed_from = int(manifest["metrics"]["resumed_from_step"])
    assert resumed_from == logged_before[-1][0], "SIGTERM saved the step it stopped at"

    # The manifest names the run; the run is the one the first attempt created, and it finished.
    assert manifest["tracking"] == {
        "tensorboard": "tensorboard",
        "mlflow": {
            "uri": mlflow_server,
            "experiment": "tracking-e2e",
            "experiment_id": recorded["experiment_id"],
            "run_id": run_id,
            "run_name": "bot@v1",
        },
        "wandb": None,
    }
    run = _run_info(mlflow_server, run_id)
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "bot@v1"
    experiment = _api(mlflow_server, "experiments/get-by-name", experiment_name="tracking-e2e")["experiment"]
    assert experiment["experiment_id"] == recorded["experiment_id"]
    search = httpx.post(
        f"{mlflow_server}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [recorded["experiment_id"]]},
        timeout=30,
    )
    assert [r["info"]["run_id"] for r in search.json()["runs"]] == [run_id], "one run for both attempts"

    # Every optimizer step's loss once, from both attempts; the held-out loss; the published figures.
    losses = _history(mlflow_server, run_id, "loss")
    assert [step for step, _ in losses] == list(range(1, 13))
    logged = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    by_step = {e["step"]: e["loss"] for e in logged if "loss" in e}
    for step, value in losses:
        assert value == pytest.approx(by_step[step], rel=1e-6), step
    assert _history(mlflow_server, run_id, "eval_loss")[-1][1] == pytest.approx(
        manifest["metrics"]["eval_loss"]
    )
    assert _history(mlflow_server, run_id, "final/final_train_loss") == [
        (12, pytest.approx(manifest["metrics"]["final_train_loss"]))
    ]
    assert _history(mlflow_server, run_id, "cost/tokens_trained")[0][1] == manifest["cost"]["tokens_trained"]

    # Params: the Trainer's arguments (its MLflowCallback) and what loraplane adds; tags.
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert float(params["learning_rate"]) == 5e-3 and params["max_steps"] == "12"
    assert params["lora.r"] == "8" and params["lora.alpha"] == "16.0"
    assert params["dataset.sha256"] == manifest["dataset"]["sha256"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["loraplane.adapter"] == "bot@v1" and tags["team"] == "nlp"
    assert tags["loraplane.run_id"] == manifest["run_id"]
    assert tags["loraplane.weights_sha256"] == manifest["weights_sha256"]
    assert _artifacts(mlflow_server, run_id, "loraplane") == ["loraplane/manifest.json"]

    # TensorBoard: the event files were published with the adapter (and left the run directory); one
    # curve over both attempts, read with TensorBoard's own reader.
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "manifest.json",
        "metrics.jsonl",
        "tensorboard",
    ]
    events = sorted((adapter / "tensorboard").iterdir())
    assert len(events) >= 2 and all(p.name.startswith("events.out.tfevents.") for p in events)
    assert not (tmp_path / "run" / "tensorboard").exists()
    board = EventAccumulator(str(adapter / "tensorboard"))
    board.Reload()
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(board.Tags()["scalars"])
    curve = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [step for step, _ in curve] == list(range(1, 13))
    for step, value in curve:
        assert value == pytest.approx(by_step[step], rel=1e-5), step

    # An evaluation of the version: its figures and report go to the same run (a real suite run by the
    # evals runner; its endpoint here is the eval tests' fake, the live one needs vLLM).
    (tmp_path / "suite").mkdir()
    suite = _write_suite(tmp_path / "suite", _suite(["exact_match", "token_f1"]), rows=4)
    report = _run(suite, _openai(lambda prompt: "a" + prompt[1:], lambda request, prompt: None))
    files = write_report(report, tmp_path / "reports", "bot-v1")
    logged_to = log_eval_to_mlflow(
        manifest,
        scores=report.scores(),
        passed=True,
        suite=report.suite,
        report=report.model_dump(mode="json"),
        files=[files.markdown, files.png],
        step=1,
    )
    assert logged_to is not None and logged_to.run_id == run_id
    assert _history(mlflow_server, run_id, "eval/qa/candidate/exact_match") == [(1, 1.0)]
    assert _history(mlflow_server, run_id, "eval/qa/candidate/token_f1") == [(1, 1.0)]
    assert _history(mlflow_server, run_id, "eval/gate_passed") == [(1, 1.0)]
    assert _artifacts(mlflow_server, run_id, "evals") == [
        "evals/bot-v1.md",
        "evals/bot-v1.png",
        "evals/t-1.json",
    ]
    tags = {t["key"]: t["value"] for t in _run_info(mlflow_server, run_id)["data"]["tags"]}
    assert tags["loraplane.eval.suite"] == "t" and tags["loraplane.eval.passed"] == "true"


def test_eval_results_for_a_server_that_is_gone_are_a_warning_not_an_error() -> None:
    manifest = {
        "tracking": {
            "mlflow": {
                "uri": f"http://127.0.0.1:{free_port()}",
                "experiment": "x",
                "experiment_id": "1",
                "run_id": "abc",
                "run_name": "bot@v1",
            }
        }
    }
    warnings: list[str] = []
    started = time.monotonic()
    logged = log_eval_to_mlflow(
        manifest,
        scores={"qa": {"candidate": {"exact_match": 1.0}}},
        passed=True,
        suite="t",
        report={},
        on_warning=warnings.append,
    )
    uri = manifest["tracking"]["mlflow"]["uri"]
    assert logged is None and len(warnings) == 1
    assert warnings[0].startswith(
        f"the evaluation is recorded, but logging it to MLflow run abc at {uri} failed"
    )
    assert time.monotonic() - started < 60
    assert (
        log_eval_to_mlflow({"tracking": {"mlflow": None}}, scores={}, passed=False, suite="t", report={})
        is None
    )

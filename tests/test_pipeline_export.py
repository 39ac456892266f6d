"""`loraplane pipeline export`: the Argo Workflow validated against Argo's published JSON schema and
created on the real API server with Argo's Workflow CRD (strict field validation), the Kubeflow
Pipelines file compiled by the real kfp compiler (in its own venv: kfp pins kubernetes<31), the gate
as the promote step's condition in both, and bad inputs refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support import ROOT, Cluster

from loraplane import __version__

CACHE = Path(os.environ.get("LORAPLANE_CACHE", Path.home() / ".cache" / "loraplane"))


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "train.yaml"
    train.write_text(
        yaml.safe_dump(
            {
                "base_model": {"path": "/data/models/demo"},
                "dataset": {"pushed": "support"},
                "output": {"adapters_root": "/data/adapters", "name": "support-bot"},
            }
        )
    )
    rows = [
        {"prompt": "Classify: great", "expected": "positive"},
        {"prompt": "Classify: bad", "expected": "negative"},
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "support",
                "datasets": [{"name": "support", "path": "eval.jsonl", "metrics": ["exact_match"]}],
                "gate": {"min_score": {"exact_match": 0.5}},
            }
        )
    )
    return train, suite


def _export(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    train, suite = _inputs(tmp_path)
    argv = [
        sys.executable,
        "-m",
        "loraplane.platform.cli",
        "-n",
        "ml",
        "pipeline",
        "export",
        str(train),
        str(suite),
    ]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*argv, *args], capture_output=True, text=True, cwd=tmp_path, env=env)


def _argo(tmp_path: Path) -> list[dict[str, Any]]:
    done = _export(tmp_path, "--format", "argo")
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _argo_files() -> tuple[Path, Path]:
    fetched = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-crds.sh"), "argo"], capture_output=True, text=True
    )
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    crd, schema = (Path(p) for p in fetched.stdout.split())
    return crd, schema


def test_the_argo_workflow_passes_argos_published_schema_and_gates_the_promotion(tmp_path: Path) -> None:
    docs = _argo(tmp_path)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Workflow"]
    workflow = docs[-1]
    _, schema_file = _argo_files()
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/definitions/io.argoproj.workflow.v1alpha1.Workflow", "definitions": schema["definitions"]}
    )
    errors = sorted(validator.iter_errors(workflow), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # the schema is not a rubber stamp: a misspelt field fails it
    broken = json.loads(json.dumps(workflow))
    broken["spec"]["templates"][0]["dag"]["tasks"][1]["dependencies"] = "train"
    assert list(validator.iter_errors(broken)), "Argo's schema is not a rubber stamp"

    spec = workflow["spec"]
    (dag,) = [t for t in spec["templates"] if "dag" in t]
    tasks = {t["name"]: t for t in dag["dag"]["tasks"]}
    assert tasks["evaluate"]["dependencies"] == ["train"] and tasks["promote"]["dependencies"] == ["evaluate"]
    assert tasks["promote"]["when"] == "{{tasks.evaluate.outputs.parameters.passed}} == true"
    steps = {t["name"]: t for t in spec["templates"] if "container" in t}
    for name, step in steps.items():
        container = step["container"]
        assert container["image"] == f"ghcr.io/loraplane/loraplane-trainer:{__version__}"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        script = container["command"][2]
        assert "python -m loraplane.platform.cli --registry kubernetes -n ml" in script, name
    assert (
        "train submit /tmp/train.yaml --release platform --wait -o json"
        in steps["train"]["container"]["command"][2]
    )
    assert 'adapters promote "$1" --alias prod' in steps["promote"]["container"]["command"][2]
    evaluate = steps["evaluate"]["container"]
    assert "--server-url http://platform-loraplane-vllm.ml.svc:8000 adapters eval" in evaluate["command"][2]
    key = {e["name"]: e for e in evaluate["env"]}["LORAPLANE_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "platform-loraplane-vllm-key", "key": "api-key"}
    assert spec["podMetadata"]["labels"]["loraplane.dev/vllm-client"] == "true", (
        "vLLM's NetworkPolicy admits it"
    )
    params = {p["name"]: p["value"] for p in spec["arguments"]["parameters"]}
    assert json.loads(params["train-config"])["output"]["name"] == "support-bot"
    bundle = json.loads(params["suite"])
    assert yaml.safe_load(bundle["suite"])["datasets"][0]["path"] == "/tmp/eval-0.jsonl"
    assert bundle["files"]["/tmp/eval-0.jsonl"].count("\n") == 2, "the eval set travels with the pipeline"
    role = docs[1]
    granted = {(r["apiGroups"][0], r["resources"][0]) for r in role["rules"]}
    assert {("batch", "jobs"), ("loraplane.dev", "loraadapters"), ("", "pods/log")} <= granted
    assert not {("", "secrets"), ("", "pods/portforward")} & granted, (
        "the key comes from secretKeyRef, not the API"
    )


def test_the_steps_scripts_unpack_the_suite_and_read_the_clis_json(tmp_path: Path) -> None:
    """The evaluate step's shell script run for real with `sh`, the CLI replaced by a stand-in that
    prints what `adapters eval -o json` prints: the suite and its eval set land in /tmp's place, the
    verdict becomes the output file."""
    from loraplane.platform.pipeline_export import load_spec, step_scripts

    train, suite = _inputs(tmp_path)
    spec = load_spec(train, suite, namespace="ml")
    work = tmp_path / "step"
    work.mkdir()
    script = step_scripts(spec)["evaluate"].replace("/tmp", str(work))
    bundle = spec.suite.replace("/tmp", str(work))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # `python -m loraplane.platform.cli ...` -> a stand-in; any other `python` -> the real one
    stand_in = 'echo "$@" > "$STEP_ARGS"; echo \'{"passed": false, "suite": "support"}\'; exit 0'
    (bindir / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = -m ]; then {stand_in}; fi\nexec {sys.executable} "$@"\n'
    )
    (bindir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "STEP_ARGS": str(tmp_path / "args")}
    out = work / "passed"
    argv = ["sh", "-c", script, "step", "support-bot@v3", bundle, str(out)]
    ran = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert out.read_text() == "false"
    assert yaml.safe_load((work / "suite.yaml").read_text())["datasets"][0]["path"] == f"{work}/eval-0.jsonl"
    assert (work / "eval-0.jsonl").read_text() == (tmp_path / "eval.jsonl").read_text()
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("eval") + 1] == "support-bot@v3", "the shell expanded the ref for the CLI"
    assert args[args.index("--server-url") + 1] == "http://platform-loraplane-vllm.ml.svc:8000"


def test_the_kfp_file_compiles_with_the_real_kfp_compiler(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.py"
    done = _export(tmp_path, "--format", "kfp", "-O", str(out))
    assert done.returncode == 0, done.stderr
    (kfp_python,) = sorted(CACHE.glob("tools/kfp-*/bin/python"))[-1:]  # make setup installs it
    compiled = tmp_path / "pipeline.yaml"
    ran = subprocess.run([str(kfp_python), str(out), str(compiled)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    ir = yaml.safe_load(compiled.read_text())
    assert ir["pipelineInfo"]["name"] == "support-bot-train-eval-promote"
    root = ir["root"]["dag"]["tasks"]
    assert {"train", "evaluate"} <= set(root)
    (condition,) = [t for name, t in root.items() if name.startswith("condition")]
    assert "evaluate-passed'] == 'true'" in condition["triggerPolicy"]["condition"], (
        "the gate is the condition"
    )
    (inner,) = ir["components"][condition["componentRef"]["name"]]["dag"]["tasks"].values()
    assert inner["taskInfo"]["name"] == "promote"
    executors = ir["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {
        f"ghcr.io/loraplane/loraplane-trainer:{__version__}"
    }
    defaults = ir["root"]["inputDefinitions"]["parameters"]
    assert "support-bot" in defaults["train_config"]["defaultValue"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"train": {"lora": {"r": -1}}}, "lora.r"),
        ({"eval": '{"prompt": "x"}\n'}, "eval.jsonl:1: missing 'expected'"),
        ({"format": "airflow"}, "--format 'airflow': use one of argo, kfp"),
        ({"train": {"dataset": {"path": "data/train.jsonl"}}}, "dataset.path: 'data/train.jsonl'"),
        ({"args": ["--alias", "$(id)"]}, "--alias '$(id)': not a Kubernetes name"),
        ({"args": ["--vllm-url", "http://x;id"]}, "--vllm-url 'http://x;id': not an http(s) URL"),
        ({"metrics": ["exact_match", "perplexity"]}, "ask for perplexity, which a pipeline's evaluate step"),
    ],
)
def test_bad_inputs_are_refused_and_nothing_is_written(
    tmp_path: Path, edit: dict[str, Any], message: str
) -> None:
    train, suite = _inputs(tmp_path)
    if "train" in edit:
        config = yaml.safe_load(train.read_text())
        config.update(edit["train"])
        train.write_text(yaml.safe_dump(config))
    if "eval" in edit:
        (tmp_path / "eval.jsonl").write_text(edit["eval"])
    if "metrics" in edit:
        raw = yaml.safe_load(suite.read_text())
        raw["datasets"][0]["metrics"] = edit["metrics"]
        suite.write_text(yaml.safe_dump(raw))
    out = tmp_path / "wf.yaml"
    argv = [
        sys.executable,
        "-m",
        "loraplane.platform.cli",
        "-n",
        "ml",
        "pipeline",
        "export",
        str(train),
        str(suite),
    ]
    done = subprocess.run(
        [*argv, "--format", edit.get("format", "argo"), "-O", str(out), *edit.get("args", [])],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.e2e
@pytest.mark.k8s
def test_the_argo_objects_are_accepted_by_the_api_server_with_argos_crd(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    crd, _ = _argo_files()
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(crd))
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "charts" / "loraplane" / "crds"))

    def established() -> bool:
        crd = json.loads(k8s_cluster.kubectl("get", "crd/workflows.argoproj.io", "-o", "json").stdout)
        conditions = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    k8s_cluster.wait_for(established, what="Argo's Workflow CRD established")
    ns = k8s_cluster.restricted_namespace("ml")
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump_all(_argo(tmp_path)))
    created = k8s_cluster.kubectl("create", "--validate=strict", "-f", str(wf), "-o", "name")
    names = created.stdout.split()
    assert names[:3] == [
        "serviceaccount/loraplane-pipeline",
        "role.rbac.authorization.k8s.io/loraplane-pipeline",
        "rolebinding.rbac.authorization.k8s.io/loraplane-pipeline",
    ]
    assert names[3].startswith("workflow.argoproj.io/support-bot-train-eval-promote-")
    stored = json.loads(k8s_cluster.kubectl("-n", ns, "get", names[3], "-o", "json").stdout)
    assert stored["spec"]["templates"][0]["dag"]["tasks"][2]["when"].endswith("== true"), "nothing pruned"
    # the Role lets the steps' ServiceAccount do what the three commands do, and nothing cluster-wide
    sa = f"system:serviceaccount:{ns}:loraplane-pipeline"
    checks = (
        ("create", "jobs.batch"),
        ("patch", "loraadapters.loraplane.dev"),
        ("get", "pods", "--subresource=log"),
    )
    for verb, resource, *extra in checks:
        can = k8s_cluster.kubectl("auth", "can-i", verb, resource, *extra, "-n", ns, "--as", sa, check=False)
        assert can.stdout.strip() == "yes", (verb, resource, extra)
    for verb, resource in (("list", "nodes"), ("get", "secrets")):
        denied = k8s_cluster.kubectl("auth", "can-i", verb, resource, "-n", ns, "--as", sa, check=False)
        assert denied.stdout.strip() == "no", (verb, resource)


def test_a_json_schema_metrics_schema_file_travels_with_the_suite(tmp_path: Path) -> None:
    from loraplane.platform.pipeline_export import load_spec

    train, suite = _inputs(tmp_path)
    (tmp_path / "answer.schema.json").write_text('{"type": "object"}')
    raw = yaml.safe_load(suite.read_text())
    raw["datasets"][0]["metrics"].append({"name": "json_schema", "schema_file": "answer.schema.json"})
    suite.write_text(yaml.safe_dump(raw))
    bundle = json.loads(load_spec(train, suite, namespace="ml").suite)
    metric = yaml.safe_load(bundle["suite"])["datasets"][0]["metrics"][1]
    assert metric["schema_file"] == "/tmp/schema-0-1.json"
    assert bundle["files"]["/tmp/schema-0-1.json"] == '{"type": "object"}'

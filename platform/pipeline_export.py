"""A train -> evaluate -> promote-if-the-gate-passes pipeline, for a scheduler people already run:
an Argo Workflow (YAML, with the ServiceAccount and Role its pods use) or a Kubeflow Pipelines
definition (a Python file with the kfp DSL; running it compiles the pipeline's IR YAML).

Each step is one loraplane CLI command in the loraplane image (the trainer's by default: it carries
the CLI and the Kubernetes client), against the release's namespace, so a step does exactly what a
person would type:

1. ``train``: ``loraplane train submit train.yaml --release R --wait -o json``: a training Job from
   the release's template, then the registration of what it published -> output ``ref`` (NAME@vN);
2. ``evaluate``: ``loraplane adapters eval REF --suite suite.yaml -o json``: the suite against the
   live server, the verdict recorded in the registry -> output ``passed`` (``true``/``false``);
3. ``promote`` only when ``passed`` is ``true`` (the scheduler's condition): ``loraplane adapters
   promote REF --alias ALIAS`` (which checks the gate itself once more).

The configs travel inside the pipeline (parameters), checked before anything is written: the train
config through the trainer's config model (its paths are on the release's volume, as for `train
submit`), the suite through the evaluation suite's, with its eval sets (read here, relative to the
suite file, as `evals run` reads them) embedded: the evaluate step writes them into its own /tmp.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraplane import __version__
from loraplane.common.errors import InvalidInputError

FORMATS = ("argo", "kfp")
DEFAULT_IMAGE = f"ghcr.io/loraplane/loraplane-trainer:{__version__}"
TMP = "/tmp"  # an emptyDir in every step: the root filesystem is read-only
# Argo keeps parameters in the Workflow object (etcd's limit is about 1.5 MB a object)
MAX_EMBEDDED_BYTES = 512 * 1024


@dataclass(frozen=True)
class PipelineSpec:
    train_config: str  # the train.yaml, as one line of JSON
    suite: (
        str  # JSON: {"suite": the suite's YAML with eval-set paths in the step's /tmp, "files": {path: text}}
    )
    adapter: str  # output.name of the train config
    namespace: str  # where the release runs (the steps' -n)
    release: str = "platform"
    image: str = DEFAULT_IMAGE
    service_account: str = "loraplane-pipeline"
    alias: str = "prod"
    vllm_url: str = ""  # the release's vLLM Service, which the evaluate step queries directly
    api_key_secret: str = ""  # NAME:KEY of vLLM's API key (the step's LORAPLANE_API_KEY)

    @property
    def name(self) -> str:
        return f"{self.adapter}-train-eval-promote"


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._/-]*)?$")
_SECRET_KEY = re.compile(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?:[-._a-zA-Z0-9]+$")


def _release_fullname(release: str) -> str:
    """The chart's resource prefix for a release (charts/loraplane/templates/_helpers.tpl)."""
    return release if "loraplane" in release else f"{release}-loraplane"


def load_spec(
    train_config: Path,
    suite: Path,
    *,
    namespace: str,
    release: str = "platform",
    image: str | None = None,
    service_account: str = "loraplane-pipeline",
    alias: str = "prod",
    vllm_url: str | None = None,
    api_key_secret: str | None = None,
) -> PipelineSpec:
    """Read and check both files (the same checks as ``train submit`` and ``evals run``) and the values
    that go into the steps' scripts (names, a URL: nothing a shell would read as more than a word)."""
    from loraplane.evals.suite import load_suite, refuse_perplexity_on_shared_servers
    from loraplane.platform.training_k8s import check_cluster_paths
    from loraplane.trainer.config import load_config

    names = (
        ("-n", namespace),
        ("--release", release),
        ("--service-account", service_account),
        ("--alias", alias),
    )
    for option, value in names:
        if not _NAME.match(value):
            raise InvalidInputError(
                f"{option} {value!r}: not a Kubernetes name (lowercase letters, digits and '-', at most 63)",
                hint=f"pass a name like 'prod' or 'platform' to {option}",
            )
    fullname = _release_fullname(release)
    url = vllm_url or f"http://{fullname}-vllm.{namespace}.svc:8000"
    if not _URL.match(url):
        raise InvalidInputError(
            f"--vllm-url {url!r}: not an http(s) URL", hint="e.g. http://platform-loraplane-vllm.ml.svc:8000"
        )
    secret = api_key_secret or f"{fullname}-vllm-key:api-key"
    if not _SECRET_KEY.match(secret):
        raise InvalidInputError(
            f"--api-key-secret {secret!r}: use NAME:KEY", hint="e.g. platform-loraplane-vllm-key:api-key"
        )
    check_cluster_paths(train_config)  # a run in the cluster reads its files from the volume
    config = load_config(train_config)  # a bad value stops here, with the field named
    if not config.output.name:
        raise InvalidInputError(
            f"{train_config}: output.name is not set",
            hint="name the adapter the pipeline trains (output.name)",
        )
    loaded = load_suite(suite)  # its datasets too: every line checked, errors name file and line
    # the evaluate step runs adapters eval against the release's vLLM pods, which refuses perplexity
    refuse_perplexity_on_shared_servers(loaded, str(suite), "a pipeline's evaluate step")
    return PipelineSpec(
        # one line of JSON (YAML reads it): kfp copies defaults into a comment header line by line
        train_config=json.dumps(yaml.safe_load(train_config.read_text()), separators=(",", ":")),
        suite=_suite_bundle(suite),
        adapter=config.output.name,
        namespace=namespace,
        release=release,
        image=image or DEFAULT_IMAGE,
        service_account=service_account,
        alias=alias,
        vllm_url=url,
        api_key_secret=secret,
    )


def _suite_bundle(suite: Path) -> str:
    """The suite with each eval set's path pointed at the step's /tmp, and those files' text."""
    raw = yaml.safe_load(suite.read_text(encoding="utf-8"))
    files: dict[str, str] = {}

    def embed(path: str, target: str) -> str:
        source = Path(path)
        source = source if source.is_absolute() else suite.parent / source
        files[target] = source.read_text(encoding="utf-8")
        return target

    for index, dataset in enumerate(raw.get("datasets") or []):
        dataset["path"] = embed(dataset["path"], f"{TMP}/eval-{index}.jsonl")
        for number, metric in enumerate(dataset.get("metrics") or []):
            if isinstance(metric, dict) and metric.get("schema_file"):  # json_schema's schema, a file too
                metric["schema_file"] = embed(metric["schema_file"], f"{TMP}/schema-{index}-{number}.json")
    bundle = json.dumps({"suite": yaml.safe_dump(raw, sort_keys=False), "files": files})
    if len(bundle.encode()) > MAX_EMBEDDED_BYTES:
        raise InvalidInputError(
            f"{suite}: its eval sets are {len(bundle.encode()) // 1024} KiB, more than a pipeline parameter "
            f"should carry ({MAX_EMBEDDED_BYTES // 1024} KiB)",
            hint="evaluate on a smaller held-out set (a few hundred examples give tight enough intervals)",
        )
    return bundle


class Param(str):
    """A positional parameter of the step's script ($1, $2...): the one word not quoted."""


def _cli(spec: PipelineSpec, *args: str, server_url: str | None = None) -> str:
    """The CLI's command line, every word quoted for the shell but the step's own parameters."""
    words = ["python", "-m", "loraplane.platform.cli", "--registry", "kubernetes", "-n", spec.namespace]
    if server_url:
        words += ["--server-url", server_url]
    words += args
    return " ".join(f'"{w}"' if isinstance(w, Param) else shlex.quote(w) for w in words)


def _print_field(path: str, expr: str) -> str:
    """A one-line Python that prints ``expr`` of the JSON file at ``path`` (a step's CLI output)."""
    return "python -c " + shlex.quote(f"import json; d = json.load(open({path!r})); print({expr}, end='')")


def step_scripts(spec: PipelineSpec) -> dict[str, str]:
    """Each step's shell script. Inputs arrive as $1.. (a config's text, the ref); outputs are files."""
    submit = ("train", "submit", f"{TMP}/train.yaml", "--release", spec.release, "--wait", "-o", "json")
    train = " && ".join(
        [
            f'printf "%s" "$1" > {TMP}/train.yaml',
            _cli(spec, *submit) + f" > {TMP}/train.json",
            _print_field(f"{TMP}/train.json", "d['registered']['ref']") + ' > "$2"',
        ]
    )
    unpack = (
        "import json, sys; b = json.loads(sys.argv[1]); "
        f"open('{TMP}/suite.yaml', 'w').write(b['suite']); "
        "[open(p, 'w').write(t) for p, t in b['files'].items()]"
    )
    evaluate = " && ".join(
        [
            "python -c " + shlex.quote(unpack) + ' "$2"',
            # straight to the release's vLLM Service (the step carries the label its NetworkPolicy
            # admits, and the key from its Secret): no port-forward, no kubectl in the image
            _cli(
                spec,
                "adapters",
                "eval",
                Param("$1"),
                "--suite",
                f"{TMP}/suite.yaml",
                "-o",
                "json",
                server_url=spec.vllm_url,
            )
            + f" > {TMP}/eval.json",
            _print_field(f"{TMP}/eval.json", "str(d['passed']).lower()") + ' > "$3"',
        ]
    )
    # the release's vLLM pods watch the registry (serving.rehydrate, the chart's default): the command
    # writes the alias and waits until every Ready pod reports it
    promote = _cli(spec, "adapters", "promote", Param("$1"), "--alias", spec.alias)
    return {"train": train, "evaluate": evaluate, "promote": promote}


# --- Argo ------------------------------------------------------------------------------------------


def _restricted() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def rbac(spec: PipelineSpec) -> list[dict[str, Any]]:
    """The steps' ServiceAccount and what it may do in the namespace: what the three commands need."""
    labels = {"app.kubernetes.io/part-of": "loraplane", "app.kubernetes.io/component": "pipeline"}
    meta = {"name": spec.service_account, "namespace": spec.namespace, "labels": labels}

    def rule(group: str, resource: str, *verbs: str) -> dict[str, Any]:
        return {"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}

    rules = [
        rule("batch", "jobs", "create", "get", "list", "watch", "delete"),
        rule("jobset.x-k8s.io", "jobsets", "create", "get", "list", "watch", "delete"),
        rule("", "configmaps", "create", "get", "list", "patch", "delete"),
        rule("", "pods", "get", "list", "watch"),
        rule("", "pods/log", "get"),
        rule("loraplane.dev", "loraadapters", "get", "list", "watch", "create", "update", "patch"),
        rule("loraplane.dev", "loraadapters/status", "get", "patch"),
        # Argo's executor reports each step's outputs on its own pod
        rule("argoproj.io", "workflowtaskresults", "create", "patch"),
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": spec.service_account,
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": spec.service_account, "namespace": spec.namespace}
            ],
        },
    ]


def argo_workflow(spec: PipelineSpec) -> dict[str, Any]:
    scripts = step_scripts(spec)
    tmp = {"name": "tmp", "mountPath": TMP}
    key_name, _, key_key = spec.api_key_secret.partition(":")

    def container(script: str, args: list[str]) -> dict[str, Any]:
        return {
            "image": spec.image,
            "command": ["sh", "-c", script, "step"],
            "args": args,
            "env": [
                {"name": "HOME", "value": TMP},
                {"name": "LORAPLANE_LOG_FORMAT", "value": "json"},
                {
                    "name": "LORAPLANE_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": key_name, "key": key_key}},
                },
            ],
            "securityContext": _restricted(),
            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
            "volumeMounts": [tmp],
        }

    def template(name: str, inputs: list[str], args: list[str], outputs: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "container": container(scripts[name], args)}
        body["volumes"] = [{"name": "tmp", "emptyDir": {}}]
        if inputs:
            body["inputs"] = {"parameters": [{"name": p} for p in inputs]}
        if outputs:
            body["outputs"] = {
                "parameters": [{"name": o, "valueFrom": {"path": f"{TMP}/{o}"}} for o in outputs]
            }
        return body

    ref = "{{tasks.train.outputs.parameters.ref}}"
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "generateName": f"{spec.name}-",
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "loraplane", "loraplane.dev/adapter": spec.adapter},
        },
        "spec": {
            "entrypoint": "train-evaluate-promote",
            "serviceAccountName": spec.service_account,
            # the evaluate step queries vLLM's Service: the label the release's vLLM NetworkPolicy
            # admits, as evaluation clients carry it
            "podMetadata": {"labels": {"loraplane.dev/vllm-client": "true"}},
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "arguments": {
                "parameters": [
                    {"name": "train-config", "value": spec.train_config},
                    {"name": "suite", "value": spec.suite},
                ]
            },
            "templates": [
                {
                    "name": "train-evaluate-promote",
                    "dag": {
                        "tasks": [
                            {"name": "train", "template": "train"},
                            {
                                "name": "evaluate",
                                "template": "evaluate",
                                "dependencies": ["train"],
                                "arguments": {"parameters": [{"name": "ref", "value": ref}]},
                            },
                            {
                                "name": "promote",
                                "template": "promote",
                                "dependencies": ["evaluate"],
                                # the gate as the promote step's condition
                                "when": "{{tasks.evaluate.outputs.parameters.passed}} == true",
                                "arguments": {"parameters": [{"name": "ref", "value": ref}]},
                            },
                        ]
                    },
                },
                template("train", [], ["{{workflow.parameters.train-config}}", f"{TMP}/ref"], ["ref"]),
                template(
                    "evaluate",
                    ["ref"],
                    ["{{inputs.parameters.ref}}", "{{workflow.parameters.suite}}", f"{TMP}/passed"],
                    ["passed"],
                ),
                template("promote", ["ref"], ["{{inputs.parameters.ref}}"], []),
            ],
        },
    }


def argo_documents(spec: PipelineSpec) -> str:
    """The ServiceAccount, Role and RoleBinding, then the Workflow: `kubectl create -f` takes them all."""
    docs = [*rbac(spec), argo_workflow(spec)]
    return yaml.safe_dump_all(docs, sort_keys=False, width=120)


# --- Kubeflow Pipelines ------------------------------------------------------------------------------

_KFP_TEMPLATE = '''"""{title}

Generated by `loraplane pipeline export --format kfp` (loraplane {version}). Compile it with the
Kubeflow Pipelines SDK (`pip install kfp`) and upload the YAML:

    python {filename} pipeline.yaml

Each step runs the loraplane CLI in {image} against namespace {namespace}: the pipeline's pods need
a ServiceAccount bound there to the Role `loraplane pipeline export --format argo` prints (the same
rules), e.g. kfp-kubernetes' `use_service_account`; the evaluate step queries {vllm_url} with
LORAPLANE_API_KEY from Secret {api_key_secret} (kfp-kubernetes' `use_secret_as_env`), and the
release's vLLM NetworkPolicy must admit the pipeline's pods (label loraplane.dev/vllm-client=true).
"""

import sys

from kfp import compiler, dsl

IMAGE = {image!r}
TRAIN_CONFIG = {train_config!r}
SUITE = {suite!r}


@dsl.container_component
def train(train_config: str, ref: dsl.OutputPath(str)):
    script = {train_script!r}
    return dsl.ContainerSpec(image=IMAGE, command=["sh", "-c", script, "step"], args=[train_config, ref])


@dsl.container_component
def evaluate(ref: str, suite: str, passed: dsl.OutputPath(str)):
    script = {evaluate_script!r}
    return dsl.ContainerSpec(image=IMAGE, command=["sh", "-c", script, "step"], args=[ref, suite, passed])


@dsl.container_component
def promote(ref: str):
    script = {promote_script!r}
    return dsl.ContainerSpec(image=IMAGE, command=["sh", "-c", script, "step"], args=[ref])


@dsl.pipeline(
    name={name!r},
    description="loraplane: train, evaluate against the live server, promote if the gate passes",
)
def pipeline(train_config: str = TRAIN_CONFIG, suite: str = SUITE):
    trained = train(train_config=train_config)
    verdict = evaluate(ref=trained.outputs["ref"], suite=suite)
    with dsl.If(verdict.outputs["passed"] == "true", name="gate-passed"):
        promote(ref=trained.outputs["ref"])


if __name__ == "__main__":
    compiler.Compiler().compile(pipeline, sys.argv[1] if len(sys.argv) > 1 else "pipeline.yaml")
'''


def kfp_source(spec: PipelineSpec, filename: str = "pipeline.py") -> str:
    scripts = step_scripts(spec)
    return _KFP_TEMPLATE.format(
        title=f"{spec.name}: a Kubeflow Pipelines definition",
        version=__version__,
        filename=filename,
        image=spec.image,
        namespace=spec.namespace,
        vllm_url=spec.vllm_url,
        api_key_secret=spec.api_key_secret,
        train_config=spec.train_config,
        suite=spec.suite,
        train_script=scripts["train"],
        evaluate_script=scripts["evaluate"],
        promote_script=scripts["promote"],
        name=spec.name,
    )


def export(spec: PipelineSpec, fmt: str, *, filename: str = "pipeline.py") -> str:
    if fmt == "argo":
        return argo_documents(spec)
    if fmt == "kfp":
        return kfp_source(spec, filename)
    raise InvalidInputError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")

"""The product's walk on a real Kubernetes node, as a user types it: real kubelet, containerd, runc,
kube-proxy, CoreDNS and kube-router (scripts/real-node.sh), the CPU image built from the repo
(scripts/build-images.sh, imported, never pulled), the chart installed with ``loraplane install``
(pyhelm3) into a namespace that enforces Pod Security ``restricted``.

The steps run in order and share the release; once one fails the rest are skipped (they would only
repeat its failure). Each failed step's report carries the cluster's pods, events and container logs.

1. ``loraplane install`` with the CPU profile and two vLLM replicas; the node is a real kubelet;
2. the base model is ``serving.model: hf://demo/tiny@main``: the chart's model-fetch Job downloads
   it with huggingface_hub from a hub endpoint on the node's address (tests/hub_server.py: the hub
   itself cannot be reached here) while the vLLM pods wait in their init container; the training data
   reaches the volume with ``loraplane data push`` (checked first, content-addressed) and the demo
   files with ``loraplane volume put``; both vLLM replicas and the gateway become Ready, as uid 10001;
3. ``loraplane upgrade`` adds ``trainer.initialRun``: the Job trains in a pod and publishes onto the
   volume, ``loraplane train register JOB`` registers the adapter from the pod's result line;
4. ``loraplane adapters load`` puts it on both replicas; ``adapters eval`` and ``adapters promote``
   run from outside (kubelet port-forwards), ``evals submit --wait`` runs the evaluation again as a
   Job in the cluster (through vLLM's Service, the verdict written by the pod); the official
   ``openai`` client gets the demo task's answer from ``animals:prod`` through the gateway Service;
5. one vLLM pod is deleted while requests run through the gateway: none fails, and the replacement
   is Ready only once it has loaded the promoted version;
6. NetworkPolicy (kube-router): a pod without the client label cannot reach vLLM, a labelled one can;
7. ``helm test`` sends a completion through the gateway;
8. ``loraplane upgrade`` with another value keeps the initial run's Job (no second training);
   ``loraplane uninstall`` keeps the volume and the adapters, and a reinstall serves them again.

Timings of the steps are written to the test log (``-s`` or the report's captured output); the
numbers in the README come from bench/cluster_walk.py, which runs the same steps.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_server import HubServer
from real_node import ROOT, RealNode
from test_real_node import port_forward

pytestmark = [pytest.mark.node]

CHART = ROOT / "charts" / "loraplane"
PROFILE = CHART / "ci" / "08-cpu-node-values.yaml"
RELEASE = "platform"  # the CLI's default release name
FULLNAME = f"{RELEASE}-loraplane"
STORAGE_CLASS = "loraplane-node-local"  # the profile's global.storage.storageClass
UID = 10001  # the image's and the chart's user
LORAPLANE = ROOT / ".venv" / "bin" / "loraplane"
TASK = "animals"
MODEL = "hf://demo/tiny@main"  # served from the walk's hub endpoint, fetched by the chart's Job
MODEL_DIR = "models/demo--tiny@main"  # where the Job puts it on the volume (common/model_ref.py)
QUESTION = "What noise does a dog make?"
ANSWER = "woof"


@dataclass
class Walk:
    node: RealNode
    ns: str
    image: str
    volume: Path  # the hostPath directory behind the shared PersistentVolume
    home: Path  # LORAPLANE_HOME of the CLI
    work: Path  # local files (demo model, data, values)
    hub: HubServer  # the hub endpoint the model-fetch Job downloads from (on the node's address)
    broken: str = ""
    dataset: str = ""  # the training file's path on the volume, as `data push` named it
    job: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            **self.node.env(),
            "LORAPLANE_HOME": str(self.home),
            "LORAPLANE_REGISTRY": "kubernetes",
            "LORAPLANE_NAMESPACE": self.ns,
            "NO_COLOR": "1",
        }

    def cli(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(LORAPLANE), *args], capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        print(f"$ loraplane {' '.join(args)}  [exit {proc.returncode}]\n{proc.stdout}{proc.stderr}")  # noqa: T201
        if check:
            assert proc.returncode == 0, (
                f"loraplane {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc

    def release_args(self, *extra: str) -> list[str]:
        """The values every install/upgrade of the walk gives (helm upgrade resets what is not given)."""
        repository, tag = self.image.rsplit(":", 1)
        sets = [
            f"{part}.image.{key}={value}"
            for part in ("serving", "trainer")
            for key, value in (("repository", repository), ("tag", tag))
        ]
        # the base model by reference, fetched from the walk's hub endpoint (a list: a values file)
        model_values = self.work / "model-values.yaml"
        fetch = {"model": MODEL, "modelFetch": {"env": [{"name": "HF_ENDPOINT", "value": self.hub.url}]}}
        model_values.write_text(yaml.safe_dump({"serving": fetch}))
        files = ["-f", str(PROFILE), "-f", str(model_values)]
        return [*files, *(a for s in sets for a in ("--set", s)), *extra]

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.broken:
            pytest.skip(f"an earlier step of the walk failed ({self.broken})")
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.broken = name
            raise
        self.timings[name] = round(time.monotonic() - started, 1)
        print(f"[walk] {name}: {self.timings[name]} s")  # noqa: T201

    def pods(self, component: str) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"
        items: list[dict[str, Any]] = self.node.get("-n", self.ns, "pods", "-l", selector)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def ready_pods(self, component: str, count: int, timeout: float) -> list[dict[str, Any]]:
        """``count`` Ready pods of the component (fails early when a container keeps crashing)."""
        found: list[dict[str, Any]] = []

        def ready() -> bool:
            pods = self.pods(component)
            for pod in pods:
                for status in pod["status"].get("containerStatuses", []):
                    assert status["restartCount"] < 2, f"{pod['metadata']['name']} keeps restarting: {status}"
            found[:] = [p for p in pods if _condition(p, "Ready")]
            return len(found) >= count

        self.node.wait_for(ready, f"{count} Ready {component} pod(s)", timeout)
        return found

    def exec_python(self, pod: str, script: str) -> str:
        return self.node.kubectl("-n", self.ns, "exec", pod, "--", "python", "-c", script).stdout

    def served_on(self, pod: str) -> list[str]:
        """The model names vLLM in ``pod`` lists (asked from inside the pod, with its own key)."""
        script = (
            "import json, urllib.request;"
            "key = open('/etc/loraplane/api-key/api-key').read().strip();"
            "r = urllib.request.Request('http://127.0.0.1:8000/v1/models',"
            " headers={'Authorization': 'Bearer ' + key});"
            "print(json.dumps([m['id'] for m in json.load(urllib.request.urlopen(r, timeout=10))['data']]))"
        )
        names: list[str] = json.loads(self.exec_python(pod, script))
        return names

    def gateway_key(self) -> str:
        secret = self.node.get("-n", self.ns, "secret", f"{FULLNAME}-gateway-keys")
        return base64.b64decode(secret["data"]["keys"]).decode().split()[0]


def _ask(walk: Walk, model: str) -> Any:
    """One chat completion of the demo question through the gateway Service (a kubelet port-forward)."""
    import httpx

    with port_forward(walk.node, walk.ns, f"service/{FULLNAME}-gateway", 80) as port:
        return httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {walk.gateway_key()}"},
            json=_question(model),
            timeout=120,
            trust_env=False,
        )


def _question(model: str) -> dict[str, Any]:
    from loraplane.trainer.demo_tasks import SYSTEM_PROMPT

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    return {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}


def _condition(pod: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in pod["status"].get("conditions", []))


@pytest.fixture(scope="module")
def cpu_image(real_node: RealNode) -> str:
    """The CPU image, built from the repo if its inputs changed, imported into the node's containerd
    with the gateway's slim image (the profile's gateway.image, the same tag)."""
    env = {**os.environ, "LORAPLANE_NODE_WORKDIR": str(real_node.work)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), "import"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, f"scripts/build-images.sh import failed:\n{proc.stderr[-4000:]}"
    ref, gateway = proc.stdout.split()
    assert ref.startswith("localhost/loraplane/loraplane-cpu:"), proc.stdout
    assert gateway == ref.replace("/loraplane-cpu:", "/loraplane-gateway:"), proc.stdout
    return ref


@pytest.fixture(scope="module")
def walk(real_node: RealNode, cpu_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    """An empty hostPath PersistentVolume of the profile's class (owned by the chart's uid: hostPath
    ignores fsGroup; the cluster admin's part), a restricted namespace; everything removed afterwards."""
    volume = real_node.work / f"pv-{uuid.uuid4().hex[:6]}"
    volume.mkdir()
    os.chown(volume, UID, UID)
    pv = f"lp-walk-{volume.name}"
    real_node.apply(
        "default",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "20Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(volume), "type": "Directory"},
            },
        },
    )
    ns = real_node.restricted_namespace(f"walk-{uuid.uuid4().hex[:6]}")
    work = tmp_path_factory.mktemp("walk")
    # pods reach the machine at the node's address (host-only, never routed off it)
    (node_ip,) = re.findall(r"^NODE_IP=(\S+)", (ROOT / "scripts" / "real-node.sh").read_text(), re.M)
    hub = HubServer(host=node_ip)
    hub.start()
    state = Walk(real_node, ns, cpu_image, volume, work / "home", work, hub)
    yield state
    hub.stop()
    print(f"[walk] timings: {json.dumps(state.timings)}")  # noqa: T201
    real_node.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s", check=False)
    real_node.kubectl("delete", "namespace", ns, "--wait=true", "--timeout=120s", check=False, timeout=150)
    real_node.kubectl("delete", "pv", pv, "--wait=false", check=False)
    shutil.rmtree(volume, ignore_errors=True)


def test_1_loraplane_install_runs_on_a_real_kubelet_node(walk: Walk) -> None:
    with walk.step("install"):
        nodes = walk.node.get("nodes")["items"]
        assert [n["metadata"]["name"] for n in nodes] == ["lp-node"], nodes
        info = nodes[0]["status"]["nodeInfo"]
        assert info["containerRuntimeVersion"].startswith("containerd://"), info
        assert info["kubeletVersion"].startswith("v1."), info
        assert "kwok.x-k8s.io/node" not in nodes[0]["metadata"].get("annotations", {})
        # what the user has at hand before installing: a model and data on their machine
        walk.cli("demo", "build-model", str(walk.work / "demo-model"))
        walk.cli("demo", "write-data", str(walk.work / "demo-data"))
        walk.hub.add_repo("demo/tiny", walk.work / "demo-model")  # the model "on the hub"
        walk.hub.add_repo("demo/tiny", walk.work / "demo-model", "v2")  # a second branch, for models pull
        walk.timings["installed_at"] = time.monotonic()
        installed = walk.cli("install", *walk.release_args("--set", "serving.replicas=2"))
        assert f"installed {RELEASE} (loraplane" in installed.stdout
        assert "revision 1, deployed" in installed.stdout, installed.stdout


def test_2_the_model_and_data_reach_the_volume_and_two_vllm_replicas_become_ready(walk: Walk) -> None:
    with walk.step("model fetched, data pushed, two vLLM replicas Ready"):
        model, data = walk.work / "demo-model", walk.work / "demo-data"
        # the chart's model-fetch Job puts the hub model on the volume; vLLM waits for it
        jobs: list[dict[str, Any]] = []
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=model-fetch"

        def fetched() -> bool:
            jobs[:] = walk.node.get("-n", walk.ns, "jobs", "-l", selector)["items"]
            done = [
                c["type"] for j in jobs for c in j["status"].get("conditions", []) if c["status"] == "True"
            ]
            if "Failed" in done:
                logs = [walk.node.logs(walk.ns, p["metadata"]["name"]) for p in walk.pods("model-fetch")]
                raise AssertionError(f"{json.dumps(jobs[0]['status'])}\n" + "\n".join(logs)[-4000:])
            return "Complete" in done

        walk.node.wait_for(fetched, "the model-fetch Job to complete", timeout=600)
        fetched_dir = walk.volume / MODEL_DIR
        assert (fetched_dir / "config.json").read_bytes() == (model / "config.json").read_bytes()
        assert json.loads((fetched_dir / ".loraplane-model.json").read_text())["source"] == MODEL
        assert fetched_dir.stat().st_uid == UID
        assert any(r.path.endswith("/model.safetensors") and r.status == 200 for r in walk.hub.requests)
        assert not [p for p in (walk.volume / "models" / ".fetch").iterdir() if p.suffix == ".partial"]

        # models pull: the same fetch from the CLI, in a pod next to the volume (progress relayed)
        pull = ["models", "pull", "hf://demo/tiny@v2", "--hf-endpoint", walk.hub.url]
        pulled = json.loads(walk.cli(*pull, "-o", "json").stdout)
        assert pulled["fetched"] and pulled["path"] == "/data/models/demo--tiny@v2", pulled
        assert (walk.volume / "models" / "demo--tiny@v2" / "config.json").is_file()
        again_pulled = walk.cli("models", "pull", MODEL, "--hf-endpoint", walk.hub.url)
        assert f"already there: {MODEL}" in again_pulled.stdout, again_pulled.stdout
        wrong = walk.cli("models", "pull", "hf://demo/nope", "--hf-endpoint", walk.hub.url, check=False)
        assert wrong.returncode == 2 and "MODEL: no repository 'demo/nope'" in wrong.stderr, wrong.stderr

        # training data: checked with the trainer's checks, then content-addressed on the volume
        train = data / f"{TASK}-train.jsonl"
        pushed = json.loads(
            walk.cli("data", "push", str(train), "-m", str(model), "--name", TASK, "-o", "json").stdout
        )
        assert pushed["uploaded"] and pushed["path"].startswith(f"/data/datasets/{TASK}/sha256-"), pushed
        assert (walk.volume / pushed["path"].removeprefix("/data/")).read_bytes() == train.read_bytes()
        walk.dataset = pushed["path"]
        again = json.loads(
            walk.cli("data", "push", str(train), "-m", str(model), "--name", TASK, "-o", "json").stdout
        )
        assert again == {**pushed, "uploaded": False}, "the same content is found, not uploaded twice"
        bad = walk.work / "bad.jsonl"
        bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
        refused = walk.cli("data", "push", str(bad), "-m", str(model), "--name", "bad", check=False)
        assert refused.returncode == 2 and "nothing was uploaded" in refused.stderr, refused.stderr
        assert not (walk.volume / "datasets" / "bad").exists()

        walk.cli("volume", "put", str(data), "datasets/demo")
        # A second put of the same path is refused and changes nothing (--replace swaps).
        again_put = walk.cli("volume", "put", str(data), "datasets/demo", check=False)
        assert again_put.returncode == 2 and "already exists" in again_put.stderr, again_put.stderr
        assert not list((walk.volume / ".loraplane-staging").iterdir())  # no half-written upload left
        assert walk.pods("volume-put") == [] or all(
            p["metadata"].get("deletionTimestamp") for p in walk.pods("volume-put")
        )

        vllm = walk.ready_pods("vllm", 2, timeout=900)
        gateway = walk.ready_pods("gateway", 1, timeout=180)
        answer = _ask(walk, "base")
        assert answer.status_code == 200, answer.text
        walk.timings["install_to_first_answer"] = round(
            time.monotonic() - walk.timings.pop("installed_at"), 1
        )
        log = walk.node.logs(walk.ns, vllm[0]["metadata"]["name"])
        for pod in [*vllm, *gateway]:
            (container,) = pod["status"]["containerStatuses"]
            # the gateway runs its own slim image (cpu_image imported it)
            gateway_image = walk.image.replace("/loraplane-cpu:", "/loraplane-gateway:")
            image = walk.image if pod in vllm else gateway_image
            assert container["image"] == image, container
            assert pod["spec"]["securityContext"]["runAsUser"] == UID
            assert pod["spec"]["nodeName"] == "lp-node"
            assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"].get("limits", {})
        assert {p["metadata"]["name"] for p in vllm} == {p["metadata"]["name"] for p in walk.pods("vllm")}
        script = "import os, sys, loraplane; print(os.getuid(), sys.executable, loraplane.__file__)"
        uid, executable, package = walk.exec_python(vllm[0]["metadata"]["name"], script).split()
        assert (int(uid), executable) == (UID, "/opt/venv/bin/python")
        assert package.startswith("/opt/venv/lib/")  # a regular install, not the clone's editable one
        assert "serving 0 registered adapter version(s)" in log, log[-3000:]


def test_2b_a_model_that_cannot_be_fetched_fails_its_job_at_once_and_status_says_why(walk: Walk) -> None:
    with walk.step("a wrong model id fails its fetch Job at once"):
        status = json.loads(walk.cli("status", "-o", "json").stdout)
        assert [(f["model"], f["state"]) for f in status["model_fetch"]] == [(MODEL, "Complete")], status
        # the chart's fetch Job for a model the hub does not have (only that Job: vLLM keeps serving)
        args = [
            "template",
            RELEASE,
            str(CHART),
            "-n",
            walk.ns,
            "--show-only",
            "charts/serving/templates/model-fetch.yaml",
        ]
        args += walk.release_args("--set", "serving.model=hf://demo/nope")
        rendered = walk.node.helm(*args).stdout
        (job,) = [d for d in yaml.safe_load_all(rendered) if d]
        walk.node.apply(walk.ns, job)
        name = job["metadata"]["name"]

        def failed() -> bool:
            conditions = walk.node.get("-n", walk.ns, "job", name)["status"].get("conditions", [])
            return any(c["type"] == "Failed" and c["status"] == "True" for c in conditions)

        walk.node.wait_for(failed, "the bad model's fetch Job to fail", timeout=180)
        found = walk.node.get("-n", walk.ns, "job", name)["status"]
        assert found.get("failed") == 1, f"exit 2 fails the Job at once, no retries: {found}"
        status = json.loads(walk.cli("status", "-o", "json").stdout)
        (bad,) = [f for f in status["model_fetch"] if f["job"] == name]
        assert bad["state"] == "Failed" and "serving.model: no repository 'demo/nope'" in bad["message"], bad
        text = walk.cli("status").stdout
        assert "model hf://demo/nope: fetch Failed" in text and "reason: serving.model: no repository" in text
        walk.node.kubectl("-n", walk.ns, "delete", "job", name, "--cascade=foreground")


def _initial_run_values(walk: Walk) -> Path:
    config = {
        # the trainer resolves the reference to the directory the model-fetch Job filled
        "base_model": {"path": MODEL},
        "dataset": {"path": walk.dataset},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "training": {
            "learning_rate": 1e-2,
            "epochs": 6,
            "batch_size": 8,
            "max_seq_length": 128,
            "logging_steps": 5,
            "seed": 0,
        },
        "output": {"adapters_root": "/data/adapters", "name": TASK},
    }
    path = walk.work / "initial-run.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"initialRun": {"enabled": True, "config": config}}}))
    return path


def test_3_the_initial_run_trains_in_a_pod_and_the_cli_registers_it(walk: Walk) -> None:
    with walk.step("initial run trains, registered"):
        values = _initial_run_values(walk)
        walk.cli("upgrade", *walk.release_args("--set", "serving.replicas=2", "-f", str(values)))
        selector = (
            f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=trainer,"
            f"loraplane.dev/adapter={TASK}"
        )
        jobs: list[dict[str, Any]] = []

        def finished() -> bool:
            jobs[:] = walk.node.get("-n", walk.ns, "jobs", "-l", selector)["items"]
            done = [
                c["type"] for j in jobs for c in j["status"].get("conditions", []) if c["status"] == "True"
            ]
            assert "Failed" not in done, json.dumps(jobs[0]["status"])
            return "Complete" in done

        walk.node.wait_for(finished, "the initial run's Job to complete", timeout=900)
        walk.job = jobs[0]["metadata"]["name"]
        pod = walk.node.get("-n", walk.ns, "pods", "-l", f"job-name={walk.job}")["items"][0]
        assert pod["spec"]["securityContext"]["runAsUser"] == UID
        registered = walk.cli("train", "register", walk.job, "-o", "json")
        answer = json.loads(registered.stdout)
        entry = answer["adapter"]
        assert answer["registered"] and (entry["name"], entry["version"]) == (TASK, "v1"), answer
        assert entry["path"].startswith("/data/adapters/"), entry
        published = walk.volume / entry["path"].removeprefix("/data/")
        assert (published / "adapter_model.safetensors").is_file()
        registered_at = time.monotonic()
        # Each vLLM pod's reconciler watches the registry: a registration is loaded on both replicas,
        # reported in the object's status, and leaves both Ready (it is served, not yet required).
        names = sorted(p["metadata"]["name"] for p in walk.pods("vllm"))

        def reported() -> bool:
            servers = walk.node.get("-n", walk.ns, "loraadapters", TASK).get("status", {}).get("servers", {})
            return all(servers.get(pod, {}).get("loaded") == ["v1"] for pod in names)

        walk.node.wait_for(reported, "both vLLM pods to report v1 loaded", timeout=120)
        walk.timings["publish_to_all_replicas"] = round(time.monotonic() - registered_at, 2)
        assert len(names) == 2 and len(walk.ready_pods("vllm", 2, timeout=10)) == 2


def test_4_load_eval_promote_and_the_openai_client_gets_the_adapters_answer(walk: Walk) -> None:
    with walk.step("load on both replicas, eval, promote, query"):
        loaded = walk.cli("adapters", "load", f"{TASK}@v1")  # the registry, then both pods' reports
        assert "2 Ready vLLM pod(s)" in loaded.stdout, loaded.stdout
        for pod in walk.pods("vllm"):
            assert f"{TASK}@v1" in walk.served_on(pod["metadata"]["name"]), pod["metadata"]["name"]
        suite = walk.work / "demo-data" / f"{TASK}-eval.jsonl"
        evaluated = walk.cli("adapters", "eval", f"{TASK}@v1", "--dataset", str(suite), "-o", "json")
        record = json.loads(evaluated.stdout)
        assert record["passed"] and record["candidate_model"] == f"{TASK}@v1", record["checks"]
        # The same evaluation in the cluster: a Job of the image next to vLLM, through its Service
        # (the pod carries the label vLLM's NetworkPolicy admits, the key as a file), the verdict
        # written into the registry by the pod with its own ServiceAccount; promote then gates on it.
        started = time.monotonic()
        submit = ["evals", "submit", f"{TASK}@v1", "--dataset", str(suite), "--wait", "--timeout", "10m"]
        submitted = walk.cli(*submit, "-o", "json")
        walk.timings["evals_submit_wait"] = round(time.monotonic() - started, 1)
        answer = json.loads(submitted.stdout)
        verdict = answer["verdict"]
        assert answer["state"] == "Succeeded" and verdict["passed"], verdict["checks"]
        assert verdict["endpoint"] == f"http://{FULLNAME}-vllm.{walk.ns}.svc:8000", verdict
        (eval_pod,) = walk.node.get("-n", walk.ns, "pods", "-l", f"job-name={answer['job']}")["items"]
        assert eval_pod["spec"]["securityContext"]["runAsUser"] == UID
        assert eval_pod["metadata"]["labels"]["loraplane.dev/vllm-client"] == "true"
        walk.cli("adapters", "promote", f"{TASK}@v1", "--alias", "prod")

        from openai import OpenAI

        with port_forward(walk.node, walk.ns, f"service/{FULLNAME}-gateway", 80) as port:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=walk.gateway_key(), max_retries=0)
            models = [m.id for m in client.models.list().data]
            assert {"base", f"{TASK}:prod"} <= set(models), models
            ask = _question("base")["messages"]
            tuned = client.chat.completions.create(
                model=f"{TASK}:prod", messages=ask, max_tokens=4, temperature=0
            )
            base = client.chat.completions.create(model="base", messages=ask, max_tokens=4, temperature=0)
        assert (tuned.choices[0].message.content or "").strip().lower().startswith(ANSWER), tuned
        assert tuned.model == f"{TASK}@v1", tuned.model  # the served version, as OpenAI names a snapshot
        assert not (base.choices[0].message.content or "").strip().lower().startswith(ANSWER), base


def test_5_a_vllm_pod_killed_under_load_fails_no_request(walk: Walk) -> None:
    with walk.step("pod kill under load"):
        import httpx

        outcomes: list[int | str] = []
        stop = threading.Event()
        with port_forward(walk.node, walk.ns, f"service/{FULLNAME}-gateway", 80) as port:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            body = _question(f"{TASK}:prod")
            headers = {"Authorization": f"Bearer {walk.gateway_key()}"}

            def loop() -> None:
                with httpx.Client(timeout=60, trust_env=False) as client:
                    while not stop.is_set():
                        try:
                            answer = client.post(url, json=body, headers=headers)
                            ok = answer.status_code == 200
                            outcomes.append(200 if ok else f"{answer.status_code}: {answer.text[:300]}")
                        except httpx.HTTPError as exc:
                            outcomes.append(f"{type(exc).__name__}: {exc}")

            workers = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
            for worker in workers:
                worker.start()
            walk.node.wait_for(lambda: len(outcomes) >= 4, "requests through the gateway before the kill", 60)
            before = {p["metadata"]["name"] for p in walk.pods("vllm")}
            victim = sorted(before)[0]
            killed = time.monotonic()
            walk.node.kubectl("-n", walk.ns, "delete", "pod", victim, "--wait=false")
            try:
                replacement = walk.ready_pods("vllm", 2, timeout=900)
            finally:
                stop.set()
                for worker in workers:
                    worker.join(timeout=90)
            walk.timings["kill_to_replacement_ready"] = round(time.monotonic() - killed, 1)
        failed = [o for o in outcomes if o != 200]
        assert len(outcomes) >= 10 and not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
        print(f"[walk] pod kill under load: {len(outcomes)} requests through the gateway, every one 200")  # noqa: T201
        (new,) = {p["metadata"]["name"] for p in replacement} - before
        state = json.loads(
            walk.node.kubectl("-n", walk.ns, "exec", new, "--", "cat", "/tmp/loraplane-serving.json").stdout
        )
        assert state["phase"] == "ready" and f"{TASK}@v1" in state["loaded"], state
        assert f"{TASK}@v1" in walk.served_on(new)


def _probe_pod(name: str, image: str, url: str, labels: dict[str, str]) -> dict[str, Any]:
    # Tries for 30 s: kube-router programs a new pod's allowance moments after the pod starts, so a
    # labelled pod's first attempt may still be refused; an unlabelled one is refused to the end.
    script = (
        "import sys, time, urllib.request\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    try:\n"
        f"        print(urllib.request.urlopen({url!r}, timeout=5).status); break\n"
        "    except Exception as exc:\n"
        "        if time.monotonic() > deadline:\n"
        "            print(type(exc).__name__, exc); sys.exit(3)\n"
        "        time.sleep(1)\n"
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", script],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True,
                    },
                }
            ],
        },
    }


def test_6_only_the_gateway_and_labelled_clients_reach_vllm(walk: Walk) -> None:
    with walk.step("network policy"):
        url = f"http://{FULLNAME}-vllm:8000/health"
        walk.node.apply(
            walk.ns,
            _probe_pod("probe-unlabelled", walk.image, url, {"app": "probe"}),
            _probe_pod(
                "probe-client", walk.image, url, {"app": "probe", "loraplane.dev/vllm-client": "true"}
            ),
        )
        denied = walk.node.pod_phase(walk.ns, "probe-unlabelled", {"Succeeded", "Failed"}, timeout=120)
        allowed = walk.node.pod_phase(walk.ns, "probe-client", {"Succeeded", "Failed"}, timeout=120)
        denied_log, allowed_log = (
            walk.node.logs(walk.ns, "probe-unlabelled"),
            walk.node.logs(walk.ns, "probe-client"),
        )
        assert allowed["status"]["phase"] == "Succeeded" and allowed_log.strip() == "200", allowed_log
        # Same image, URL and namespace; only the label differs. kube-router rejects what a policy
        # denies (ICMP port unreachable: "Connection refused"); a dropping implementation times out.
        denied_by_policy = any(word in denied_log.lower() for word in ("connection refused", "timed out"))
        assert denied["status"]["phase"] == "Failed" and denied_by_policy, denied_log
        walk.node.kubectl("-n", walk.ns, "delete", "pod", "probe-unlabelled", "probe-client", "--wait=false")


def test_7_helm_test_sends_a_completion_through_the_gateway(walk: Walk) -> None:
    with walk.step("helm test"):
        tested = walk.node.helm("test", RELEASE, "-n", walk.ns, "--logs", "--timeout", "180s", check=False)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "Phase:          Succeeded" in tested.stdout, tested.stdout
        assert f"{TASK}:prod" in tested.stdout, tested.stdout  # the promoted alias, not the base model


def test_8_upgrade_keeps_the_initial_run_and_uninstall_keeps_the_adapters_a_reinstall_serves(
    walk: Walk,
) -> None:
    with walk.step("upgrade, uninstall, reinstall"):
        job_uid = walk.node.get("-n", walk.ns, "job", walk.job)["metadata"]["uid"]
        values = _initial_run_values(walk)
        upgraded = walk.cli(
            "upgrade", *walk.release_args("--set", "serving.replicas=1", "-f", str(values), "--wait")
        )
        assert "revision 3, deployed" in upgraded.stdout, upgraded.stdout
        assert (
            walk.node.get("-n", walk.ns, "job", walk.job)["metadata"]["uid"] == job_uid
        )  # not trained again
        walk.node.wait_for(lambda: len(walk.pods("vllm")) == 1, "vLLM scaled to one replica", 180)

        walk.cli("uninstall", "--wait")
        claims = walk.node.get("-n", walk.ns, "pvc")["items"]
        assert [c["status"]["phase"] for c in claims] == ["Bound"], claims
        assert list((walk.volume / "adapters").rglob("adapter_model.safetensors"))
        assert walk.node.get("-n", walk.ns, "loraadapters")["items"], "the registry went with the release"

        reinstalled = time.monotonic()
        walk.cli("install", *walk.release_args())
        (pod,) = walk.ready_pods("vllm", 1, timeout=900)
        walk.ready_pods("gateway", 1, timeout=180)
        assert f"{TASK}@v1" in walk.served_on(pod["metadata"]["name"])
        reply = _ask(walk, f"{TASK}:prod")
        walk.timings["reinstall_to_first_answer"] = round(time.monotonic() - reinstalled, 1)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip().lower().startswith(ANSWER), reply.text

"""The Kubernetes registry backend against a live API server: the chart's CRD, kubectl-visible objects,
resourceVersion-guarded writes (of two concurrent promotions exactly one wins), and the API server's
own schema checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from support import ROOT, Cluster, write_fake_adapter

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter, set_canary
from loraplane.registry.backends import open_registry
from loraplane.registry.kubernetes import KubernetesRegistry, KubernetesRegistryError
from loraplane.registry.model import CanaryWeight, ConflictError, move_alias

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]


def _register(settings: Settings, *versions: str) -> None:
    for v in versions:
        path = write_fake_adapter(settings.adapters_dir / "demo" / v)
        register_adapter(settings, path, name="demo", version=v)


def _promote(settings: Settings, version: str, *, expected: str | None) -> None:
    with open_registry(settings).transaction() as state:
        move_alias(state, "demo", "prod", version, expected=expected, action="promote")


def test_adapters_are_loraadapter_objects_that_kubectl_shows_with_useful_columns(
    k8s_cluster: Cluster, k8s_settings: Settings
) -> None:
    _register(k8s_settings, "v1", "v2")
    _promote(k8s_settings, "v1", expected=None)

    state = open_registry(k8s_settings).read()
    assert state.resolve("demo:prod").served_name == "demo@v1"
    assert state.resolve("demo").version == "v1", "a bare name means its prod alias"
    assert [(e.action, e.version) for e in state.history] == [
        ("register", "v1"),
        ("register", "v2"),
        ("promote", "v1"),
    ]

    table = k8s_cluster.kubectl("-n", k8s_settings.namespace, "get", "loraadapters").stdout.splitlines()
    assert table[0].split() == ["NAME", "PROD", "STATE", "SCORE", "LATEST", "VERSIONS", "AGE"]
    assert table[1].split()[:2] == ["demo", "v1"] and table[1].split()[2:5] == ["registered", "v2", "2"]
    wide = k8s_cluster.kubectl("-n", k8s_settings.namespace, "get", "lora", "-o", "wide").stdout
    assert "prod=v1" in wide
    obj = json.loads(
        k8s_cluster.kubectl("-n", k8s_settings.namespace, "get", "loraadapter", "demo", "-o", "json").stdout
    )
    assert obj["spec"]["aliases"] == {"prod": "v1"}
    assert obj["spec"]["versions"]["v2"]["servedName"] == "demo@v2"
    assert len(obj["spec"]["versions"]["v2"]["weightsSha256"]) == 64


def test_two_concurrent_promotions_exactly_one_wins_and_the_other_gets_a_conflict(
    k8s_settings: Settings,
) -> None:
    """Both transactions read the same resourceVersion before either writes (a barrier inside them)."""
    _register(k8s_settings, "v1", "v2")
    barrier = threading.Barrier(2, timeout=60)
    outcome: dict[str, BaseException | None] = {}

    def promote(version: str) -> None:
        try:
            with open_registry(k8s_settings).transaction() as state:
                move_alias(state, "demo", "prod", version, expected=None, action="promote")
                barrier.wait()  # both have read and decided; now both write
            outcome[version] = None
        except BaseException as exc:
            outcome[version] = exc

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("v1", "v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = {v: e for v, e in outcome.items() if e is not None}
    assert len(outcome) == 2 and len(errors) == 1, outcome
    ((loser, error),) = errors.items()
    assert isinstance(error, ConflictError) and error.exit_code == 4
    assert "another command changed this adapter" in str(error) and "re-run" in str(error)

    winner = "v2" if loser == "v1" else "v1"
    state = open_registry(k8s_settings).read()
    assert state.adapter("demo").aliases == {"prod": winner}
    assert [(e.action, e.version) for e in state.history if e.action == "promote"] == [("promote", winner)]


def test_the_api_server_rejects_what_the_schema_forbids_with_a_clear_message(
    k8s_cluster: Cluster, k8s_settings: Settings
) -> None:
    def version(served: str, sha: str = "0" * 64, state: str = "registered") -> dict[str, str]:
        return {
            "servedName": served,
            "path": "/data/adapters/x",
            "weightsSha256": sha,
            "state": state,
            "registeredAt": "2026-11-30T00:00:00+00:00",
        }

    def refused(name: str, spec: dict[str, object]) -> str:
        obj = {"apiVersion": "loraplane.dev/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": name}}
        result = k8s_cluster.kubectl(
            "-n",
            k8s_settings.namespace,
            "apply",
            "-f",
            "-",
            stdin=json.dumps({**obj, "spec": spec}),
            check=False,
        )
        assert result.returncode != 0, f"{name} was accepted"
        return result.stderr

    # Field formats (the OpenAPI schema) ...
    message = refused(
        "bad-fields", {"versions": {"v1": version("bad-fields@v1", sha="not-a-sha", state="dancing")}}
    )
    assert 'spec.versions.v1.weightsSha256: Invalid value: "not-a-sha"' in message
    assert 'spec.versions.v1.state: Unsupported value: "dancing"' in message
    # ... and the rules between fields (CEL validation rules), each with its own message.
    message = refused(
        "bad-rules",
        {"versions": {"latest": version("bad-rules@v2")}, "aliases": {"prod": "v9", "Prod": "v9"}},
    )
    for expected in (
        "version names look like v1, v2",
        "every alias must point at a registered version",
        "alias names are DNS labels",
    ):
        assert expected in message, message
    assert k8s_cluster.kubectl("-n", k8s_settings.namespace, "get", "lora", "-o", "name").stdout == ""

    # Through the library: a write the schema refuses is an error that names the object and the rule.
    _register(k8s_settings, "v1")
    with pytest.raises(KubernetesRegistryError, match="alias must point at a registered version"):  # noqa: SIM117
        with open_registry(k8s_settings).transaction() as state:
            state.adapter("demo").aliases["prod"] = "v7"  # bypasses move_alias's own check
    assert open_registry(k8s_settings).read().adapter("demo").aliases == {}


def test_the_cli_uses_the_kubernetes_registry_when_told(k8s_cluster: Cluster, k8s_settings: Settings) -> None:
    path = write_fake_adapter(k8s_settings.adapters_dir / "demo" / "v1")
    env = {
        **k8s_cluster.env(),
        "LORAPLANE_HOME": str(k8s_settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(k8s_settings.adapters_dir),
        "COLUMNS": "200",
    }
    env.pop("LORAPLANE_REGISTRY", None)
    base = [
        sys.executable,
        "-m",
        "loraplane.platform.cli",
        "--registry",
        "kubernetes",
        "-n",
        k8s_settings.namespace,
    ]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env)

    registered = cli("adapters", "register", str(path), "--name", "demo", "--version", "v1")
    assert registered.returncode == 0, registered.stderr
    listed = json.loads(cli("adapters", "list", "-o", "json").stdout)
    assert listed["adapters"]["demo"]["versions"]["v1"]["served_name"] == "demo@v1"
    assert not (k8s_settings.home / "registry.json").exists(), "nothing went to the local registry"
    again = cli("adapters", "register", str(path), "--name", "demo", "--version", "v1")
    assert again.returncode == 2 and "demo@v1 is already registered" in again.stderr
    assert "Traceback" not in again.stderr

    missing = subprocess.run(
        [*base, "adapters", "list"],
        capture_output=True,
        text=True,
        env={**env, "KUBECONFIG": str(k8s_settings.home / "no-such-kubeconfig")},
    )
    assert missing.returncode == 1 and "cannot load a kubeconfig" in missing.stderr
    assert os.environ.get("KUBECONFIG") != str(k8s_settings.home / "no-such-kubeconfig")


def test_the_charts_roles_let_namespace_editors_use_the_registry_and_viewers_read_it(
    k8s_cluster: Cluster, k8s_settings: Settings
) -> None:
    ns = k8s_settings.namespace
    roles = k8s_cluster.helm(
        "template",
        "platform",
        str(ROOT / "charts" / "loraplane"),
        "-n",
        ns,
        "--show-only",
        "templates/rbac.yaml",
    ).stdout
    k8s_cluster.kubectl("apply", "-f", "-", stdin=roles)
    for user, builtin in (("alice", "edit"), ("bob", "view")):
        k8s_cluster.kubectl(
            "-n", ns, "create", "rolebinding", user, f"--clusterrole={builtin}", f"--user={user}"
        )

    def can(user: str, verb: str) -> bool:
        answer = k8s_cluster.kubectl(
            "-n", ns, "auth", "can-i", verb, "loraadapters.loraplane.dev", f"--as={user}", check=False
        )
        return answer.stdout.strip() == "yes"

    # The aggregation controller folds the chart's rules into edit and view (not instantly).
    k8s_cluster.wait_for(lambda: can("alice", "update") and can("bob", "list"), what="role aggregation")
    assert can("alice", "create") and can("alice", "get")
    assert not can("alice", "delete"), "versions are retired, never deleted"
    assert not can("bob", "update") and not can("bob", "create")
    assert not can("mallory", "list")


def test_a_canary_weight_is_kept_in_the_object_and_prod_is_refused_by_the_api_server(
    k8s_cluster: Cluster, k8s_settings: Settings
) -> None:
    _register(k8s_settings, "v1")
    set_canary(k8s_settings, "demo", percent=12.5)
    ns = k8s_settings.namespace
    obj = json.loads(k8s_cluster.kubectl("-n", ns, "get", "loraadapters", "demo", "-o", "json").stdout)
    assert obj["spec"]["canary"] == {"alias": "canary", "percent": 12.5}
    assert open_registry(k8s_settings).read().adapters["demo"].canary == CanaryWeight(percent=12.5)
    # A client that skips our checks is refused by the CRD's own rule.
    patched = k8s_cluster.kubectl(
        "-n", ns, "patch", "loraadapters", "demo", "--type", "merge",
        "-p", json.dumps({"spec": {"canary": {"alias": "prod", "percent": 5}}}), check=False,
    )  # fmt: skip
    assert patched.returncode != 0 and "the canary alias cannot be prod" in patched.stderr, patched.stderr
    set_canary(k8s_settings, "demo", percent=None)
    obj = json.loads(k8s_cluster.kubectl("-n", ns, "get", "loraadapters", "demo", "-o", "json").stdout)
    assert "canary" not in obj["spec"]


def test_a_pods_status_report_meanwhile_does_not_fail_a_write_but_a_spec_change_does(
    k8s_cluster: Cluster, k8s_settings: Settings
) -> None:
    """vLLM pods report in the status subresource at any moment (a new resourceVersion, the same
    generation): a command's write goes through; a change of the spec by anyone else still wins."""
    _register(k8s_settings, "v1", "v2")
    registry = KubernetesRegistry(k8s_settings)
    report = {"loaded": ["v1"], "failed": [], "observedGeneration": 1, "at": "now"}
    with registry.transaction() as state:
        registry.report_server("demo", "vllm-a", report)  # a pod reports between the read and the write
        move_alias(state, "demo", "prod", "v1", expected=None, action="promote")
    assert open_registry(k8s_settings).read().adapter("demo").aliases == {"prod": "v1"}
    obj = json.loads(
        k8s_cluster.kubectl("-n", k8s_settings.namespace, "get", "loraadapters", "demo", "-o", "json").stdout
    )
    assert obj["status"]["servers"]["vllm-a"]["loaded"] == ["v1"], "the spec write kept the pod's report"
    with pytest.raises(ConflictError), registry.transaction() as state:
        set_canary(k8s_settings, "demo", percent=5)  # another command changes the spec meanwhile
        move_alias(state, "demo", "prod", "v2", expected="v1", action="promote")
    after = open_registry(k8s_settings).read().adapter("demo")
    assert after.aliases == {"prod": "v1"} and after.canary is not None

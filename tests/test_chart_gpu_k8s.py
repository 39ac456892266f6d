"""The chart's GPU preflight, its release notes and its upgrades against the kwok cluster's real API
server (two fake GPU nodes that advertise nvidia.com/gpu and carry `nvidia.com/gpu.present`, one CPU
node): what blocks an install, what only warns (an upgrade with no GPU node, the device-plugin mode),
`loraplane status` saying the same, every `loraplane ...` line the notes print parsed by the real CLI,
and an upgrade that changes the initial run's pod template."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from support import ROOT, Cluster
from test_k8s_e2e import third_party_crds  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.k8s]

CHART = ROOT / "charts" / "loraplane"
RELEASE = "platform"
PROFILES = sorted((CHART / "ci").glob("*-values.yaml"))
AMD = ("--set", "gpu.resourceName=amd.com/gpu")  # no fake node advertises it: "no GPU node"
SMALL = {
    "serving": {"enabled": False},
    "global": {"storage": {"create": False, "existingClaim": "models"}},
}


def _values(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _cli(cluster: Cluster, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "loraplane.platform.cli", "-n", ns, *args]
    return subprocess.run(argv, capture_output=True, text=True, env={**cluster.env(), "COLUMNS": "200"})


def _status_gpu(cluster: Cluster, ns: str) -> dict[str, Any]:
    shown = _cli(cluster, ns, "status", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    status: dict[str, Any] = json.loads(shown.stdout)
    assert status["gpu_error"] is None, status["gpu_error"]
    gpu: dict[str, Any] = status["gpu"]
    return gpu


def _notes(output: str) -> str:
    return output.split("NOTES:", 1)[1] if "NOTES:" in output else ""


def test_no_gpu_node_blocks_a_first_install_but_only_warns_on_an_upgrade_and_in_device_plugin_mode(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    ns = k8s_cluster.restricted_namespace("lp-gpu-preflight")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    values = _values(tmp_path, SMALL)

    # mode none, a first install, no node offers the resource and none is labelled as a GPU node
    blocked = k8s_cluster.helm("install", RELEASE, str(CHART), "-n", ns, "-f", values, *AMD, check=False)
    assert blocked.returncode != 0
    assert "GPU preflight failed: none of the cluster's 3 nodes advertises amd.com/gpu" in blocked.stderr
    assert "gpu.mode=device-plugin" in blocked.stderr and "gpu.preflight.enabled=false" in blocked.stderr
    assert k8s_cluster.helm("list", "-n", ns, "-a", "-q").stdout.split() == [], "nothing was installed"
    assert k8s_cluster.kubectl("-n", ns, "get", "all", "-o", "name").stdout == ""
    # turned off (a pool scaled to zero at install, a CPU-only cluster), the same install goes through
    off = ("--set", "gpu.preflight.enabled=false")
    k8s_cluster.helm("install", RELEASE, str(CHART), "-n", ns, "-f", values, *AMD, *off)
    k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--wait")

    # the GPU nodes advertise nvidia.com/gpu: installed, no warning, and status agrees
    installed = k8s_cluster.helm("install", RELEASE, str(CHART), "-n", ns, "-f", values)
    assert "WARNING" not in _notes(installed.stdout)
    gpu = _status_gpu(k8s_cluster, ns)
    assert (gpu["mode"], gpu["resource"], gpu["nodes"]) == ("none", "nvidia.com/gpu", 3)
    assert (gpu["advertising"], gpu["gpu_labelled"], gpu["warning"]) == (2, 2, None)

    # an upgrade when no node offers the GPUs (a pool scaled to zero) goes on, with a warning
    upgraded = k8s_cluster.helm("upgrade", RELEASE, str(CHART), "-n", ns, "-f", values, *AMD)
    notes = _notes(upgraded.stdout)
    assert "WARNING: GPU preflight: none of the cluster's 3 nodes advertises amd.com/gpu" in notes
    assert "(GPU nodes scaled to zero?)" in notes
    gpu = _status_gpu(k8s_cluster, ns)
    assert (
        gpu["advertising"] == 0 and "none of the cluster's 3 nodes advertises amd.com/gpu" in gpu["warning"]
    )
    table = _cli(k8s_cluster, ns, "status")
    assert "GPUs (none): 0/3 nodes offer amd.com/gpu" in table.stdout, table.stdout
    assert "warning: none of the cluster's 3 nodes advertises amd.com/gpu" in table.stdout
    k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--wait")

    # device-plugin mode installs what advertises the GPUs: never blocked by their absence
    plugin = k8s_cluster.helm(
        "install", RELEASE, str(CHART), "-n", ns, "-f", values, *AMD, "--set", "gpu.mode=device-plugin"
    )
    notes = _notes(plugin.stdout)
    assert (
        "GPUs (gpu.mode=device-plugin): NVIDIA's device plugin and DCGM exporter run in kube-system" in notes
    )
    assert "The device plugin this release installs registers it on GPU nodes" in notes
    daemonsets = json.loads(
        k8s_cluster.kubectl(
            "-n",
            "kube-system",
            "get",
            "daemonsets",
            "-l",
            f"app.kubernetes.io/instance={RELEASE}",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in daemonsets} == {
        "nvidia-device-plugin",
        "dcgm-exporter",
    }
    # the DaemonSets' affinity picks the fake GPU nodes (labelled nvidia.com/gpu.present), not the CPU one
    k8s_cluster.wait_for(
        lambda: all(
            d["status"].get("desiredNumberScheduled") == 2
            for d in json.loads(
                k8s_cluster.kubectl(
                    "-n", "kube-system", "get", "daemonsets", "-l", f"app.kubernetes.io/instance={RELEASE}",
                    "-o", "json",
                ).stdout
            )["items"]
        ),
        what="the GPU DaemonSets scheduled on the two GPU nodes only",
    )  # fmt: skip
    k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--wait")


def _parse(argv: list[str]) -> Any:
    """The real CLI's parser (typer over its own copy of click), down to the leaf command: what the
    shell would run. A usage error raises."""
    from loraplane.platform.cli import app

    command = typer.main.get_command(app)
    ctx = command.make_context("loraplane", list(argv))
    while hasattr(ctx.command, "resolve_command"):  # a group: its subcommand parses the rest
        args = [*ctx._protected_args, *ctx.args]
        name, sub, rest = ctx.command.resolve_command(ctx, args)
        assert sub is not None and name is not None, argv
        ctx = sub.make_context(name, rest, parent=ctx)
    return ctx


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name.removesuffix("-values.yaml") for p in PROFILES])
def test_every_loraplane_command_the_notes_print_parses_with_the_real_cli(
    k8s_cluster: Cluster,
    third_party_crds: None,  # noqa: F811
    profile: Path,
) -> None:
    """The release notes as `helm install` prints them (a server-side dry run: the real API server,
    the preflight's lookup included), each `loraplane ...` line split as a shell would and parsed."""
    dry = k8s_cluster.helm(
        "install", RELEASE, str(CHART), "-n", "default", "-f", str(profile), "--dry-run=server", check=False
    )
    assert dry.returncode == 0, dry.stderr
    # commands are the indented lines (the first line, "loraplane 0.1.0 is installed...", is prose)
    lines = [line.strip() for line in _notes(dry.stdout).splitlines() if line.startswith("  loraplane ")]
    assert lines, "the notes show the CLI's next steps"
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        ctx = _parse(argv)
        for ref in (v for k, v in ctx.params.items() if k == "ref"):
            assert "@" in str(ref), f"{line}: a version is NAME@vN"
    # what a user pastes after training: promote a version (the parser refuses the old `NAME VERSION`)
    assert any(" adapters promote " in line for line in lines)
    with pytest.raises(Exception, match=r"unexpected extra argument\(s\) \(VERSION\)"):
        _parse(["adapters", "promote", "NAME", "VERSION"])


def test_an_upgrade_that_changes_the_initial_runs_pod_template_makes_a_new_job(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    ns = k8s_cluster.restricted_namespace("lp-upgrade-run")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    profile = yaml.safe_load((CHART / "ci" / "02-multi-node-training-values.yaml").read_text())
    trainer = {
        "initialRun": profile["trainer"]["initialRun"],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "gpusPerNode": 1,
    }
    values = _values(tmp_path, {**SMALL, "trainer": trainer})

    def run_jobs() -> list[str]:
        listed = json.loads(k8s_cluster.kubectl("-n", ns, "get", "jobs", "-o", "json").stdout)["items"]
        return [j["metadata"]["name"] for j in listed if "-run-" in j["metadata"]["name"]]

    k8s_cluster.helm("install", RELEASE, str(CHART), "-n", ns, "-f", values)
    (first,) = run_jobs()
    # the premise, from the API server itself: a Job's pod template cannot be patched
    patch = '{"spec":{"template":{"spec":{"terminationGracePeriodSeconds":5}}}}'
    refused = k8s_cluster.kubectl("-n", ns, "patch", "job", first, "--type=merge", "-p", patch, check=False)
    assert refused.returncode != 0 and "field is immutable" in refused.stderr, refused.stderr

    # the same values: the same Job (no retraining); a new pod template: a new Job, the old one gone
    k8s_cluster.helm("upgrade", RELEASE, str(CHART), "-n", ns, "-f", values)
    assert run_jobs() == [first]
    grace = ("--set", "trainer.terminationGracePeriodSeconds=300")
    upgraded = k8s_cluster.helm("upgrade", RELEASE, str(CHART), "-n", ns, "-f", values, *grace, check=False)
    assert upgraded.returncode == 0, upgraded.stderr
    k8s_cluster.wait_for(lambda: first not in run_jobs(), what="the old run's Job deleted by the upgrade")
    (second,) = run_jobs()
    assert second != first
    k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--wait")


def test_install_gpu_mode_operator_installs_nvidias_operator_in_the_release_and_labels_its_namespace(
    k8s_cluster: Cluster, tmp_path: Path
) -> None:
    """`loraplane install --gpu-mode operator`: the namespace enforces `privileged` (the operator's
    driver and toolkit pods need the host) but still warns and audits at `restricted`; NVIDIA's chart
    (the dependency in charts/) is installed by the same release, its CRDs and ClusterPolicy accepted by
    the API server with our values in it."""
    ns = k8s_cluster.restricted_namespace("lp-gpu-operator")
    k8s_cluster.volume_for(ns, "models", create_claim=True)
    values = _values(tmp_path, {**SMALL, "gpu-operator": {"driver": {"enabled": False}}})
    installed = _cli(k8s_cluster, ns, "install", "--gpu-mode", "operator", "-f", values, "-o", "json")
    assert installed.returncode == 0, installed.stderr
    labels = json.loads(k8s_cluster.kubectl("get", "namespace", ns, "-o", "json").stdout)["metadata"][
        "labels"
    ]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    policies = json.loads(k8s_cluster.kubectl("get", "clusterpolicies.nvidia.com", "-o", "json").stdout)[
        "items"
    ]
    (policy,) = [p for p in policies if p["metadata"]["annotations"]["meta.helm.sh/release-namespace"] == ns]
    assert policy["spec"]["driver"]["enabled"] is False, "our value, through NVIDIA's chart, on the cluster"
    deploys = json.loads(k8s_cluster.kubectl("-n", ns, "get", "deployments", "-o", "json").stdout)["items"]
    assert any(d["metadata"]["name"] == "gpu-operator" for d in deploys), [
        d["metadata"]["name"] for d in deploys
    ]
    gpu = _status_gpu(k8s_cluster, ns)
    assert gpu["mode"] == "operator" and gpu["advertising"] == 2
    # NVIDIA's post-delete hooks run Jobs whose pods never finish on kwok's fake nodes
    k8s_cluster.helm("uninstall", RELEASE, "-n", ns, "--no-hooks", "--wait")

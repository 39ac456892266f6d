"""kubectl and helm against one cluster: what the kwok cluster and the real node share in tests."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kube_version_under_test() -> str:
    """The Kubernetes version the tests' control plane and node are built at (tools/k8s/go.mod)."""
    for line in (ROOT / "tools" / "k8s" / "go.mod").read_text().splitlines():
        fields = line.split("//")[0].replace("require", "").split()
        if len(fields) == 2 and fields[0] == "k8s.io/kubernetes":
            return fields[1]
    raise AssertionError("tools/k8s/go.mod pins no k8s.io/kubernetes version")


def helm_args(args: tuple[str, ...]) -> list[str]:
    """``helm template`` knows no cluster: without --kube-version it assumes Kubernetes 1.20, which the
    chart's kubeVersion refuses. Render for the version the tests run."""
    if args and args[0] == "template" and "--kube-version" not in args:
        return [*args, "--kube-version", kube_version_under_test()]
    return list(args)


@dataclass
class KubeClient:
    """A cluster's admin kubeconfig and the directory holding its kubectl."""

    kubeconfig: Path
    bin_dir: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
        }

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        helm = ROOT / ".venv" / "bin" / "helm"
        proc = subprocess.run([str(helm), *helm_args(args)], capture_output=True, text=True, env=self.env())
        if check:
            assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
        return proc

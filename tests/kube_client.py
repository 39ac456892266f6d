"""kubectl and helm against one cluster: what the kwok cluster and the real node share in tests."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=self.env())
        if check:
            assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
        return proc

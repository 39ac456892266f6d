"""Wall time and peak memory of ``loraplane quickstart`` on this machine.

Runs the quickstart as a child process and samples the resident memory of its whole process tree
(CLI, trainer process, vLLM API server and engine core) every 0.2 s. Prints one table; asserts
nothing (numbers, not tests).

    .venv/bin/python bench/quickstart_footprint.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="loraplane-bench-")) / "qs"
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraplane.platform.cli",
            "quickstart",
            "--workdir",
            str(workdir),
            "-o",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(root))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    wall = time.monotonic() - started
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        sys.stderr.write(f"quickstart failed with exit {proc.returncode}\n")
        return 1
    result = json.loads(out)
    rows = [
        ("wall time (s)", f"{wall:.1f}"),
        ("peak RSS of the process tree (GiB)", f"{peak / 2**30:.2f}"),
        ("cpu cores", str(psutil.cpu_count())),
        ("winner", result["winner"]),
    ]
    rows += [(f"  step: {k}", f"{v:.1f}s") for k, v in result["timings"].items()]
    rows += [
        (
            f"  {name}: base EM -> adapter EM",
            f"{e['baseline']['exact_match']:.2f} -> {e['candidate']['exact_match']:.2f}",
        )
        for name, e in result["evals"].items()
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

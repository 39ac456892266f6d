"""Timings of the product's walk on the real node (tests/test_cluster_walk.py), as a table.

    sudo .venv/bin/python bench/cluster_walk.py [--runs N] [--json FILE]

Runs the walk's test file (the real node, the repo's CPU image, ``loraplane install`` ... reinstall)
``--runs`` times in one go and prints, per run and as the median, the times a user waits:

- install -> first answer: ``loraplane install`` (two vLLM replicas) until a chat completion through
  the gateway answers, the demo model put on the volume in between (image cached on the node);
- initial run: ``loraplane upgrade`` adding ``trainer.initialRun`` until ``train register`` has
  registered what the trainer pod published;
- publish -> all replicas: from ``train register`` returning (the version is in the registry)
  until both vLLM pods' reconcilers report it loaded in the LoraAdapter's status (they watch the
  registry; the checks and vLLM's load included; read with kubectl every 0.3 s);
- pod kill -> replacement Ready: one vLLM pod deleted under load until its replacement is Ready with
  the promoted version loaded;
- reinstall -> first answer: ``loraplane install`` after an uninstall (volume and registry kept)
  until ``animals:prod`` answers through the gateway.

Times are measured by the test's steps (``[walk] timings: {...}`` in its output); nothing here is
asserted. The image import and the node's start are outside these numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURES = {
    "install_to_first_answer": "install -> first answer (2 replicas)",
    "initial run trains, registered": "initial run: upgrade -> trained -> registered",
    "publish_to_all_replicas": "registered -> loaded on both replicas (watch)",
    "kill_to_replacement_ready": "pod kill under load -> replacement Ready",
    "reinstall_to_first_answer": "reinstall -> first answer (adapters kept)",
}
PREFIX = "[walk] timings: "


def run_walk() -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_cluster_walk.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    found = [line[len(PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if proc.returncode != 0 or not found:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-2000:])
        raise SystemExit(f"the walk failed (exit {proc.returncode}); its output is above")
    timings: dict[str, float] = json.loads(found[-1])
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the runs as JSON here")
    args = parser.parse_args()
    runs = [run_walk() for _ in range(args.runs)]
    width = max(len(label) for label in MEASURES.values())
    header = f"| {'what':<{width}} | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | median |"
    print(header)  # noqa: T201
    print("|" + "|".join("-" * (len(cell) + 2) for cell in header.strip("|").split("|")[:-1]) + "|--------|")  # noqa: T201
    for key, label in MEASURES.items():
        values = [r[key] for r in runs if key in r]
        cells = " | ".join(f"{v:.1f} s" for v in values)
        median = f"{statistics.median(values):.1f} s" if values else "-"
        print(f"| {label:<{width}} | {cells} | {median} |")  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

"""``python -m loraplane.platform.run_report --config FILE``: the trainer, then what it published.

A training pod writes the adapter to the cluster's volume, which a laptop cannot read. So the Job
runs the trainer through this wrapper (same process: same signals, same exit codes) and, when it
published, the wrapper prints one more stdout line, ``RESULT_PREFIX`` + JSON: the adapter's name,
version, path, weights sha256, base model and its ``manifest.json``. ``loraplane train status``
reads that line from the pod's log through the API server and registers the version.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

RESULT_PREFIX = "loraplane-result: "


class _Tee(io.TextIOBase):
    def __init__(self, target: TextIO) -> None:
        self.target, self.seen = target, io.StringIO()

    def write(self, text: str) -> int:
        self.seen.write(text)
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()


def published(stdout_text: str) -> dict[str, Any] | None:
    """The result the trainer printed last (its JSON line), with the manifest it wrote."""
    for line in reversed(stdout_text.strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if not isinstance(result, dict) or "adapter" not in result:
            continue
        path = Path(result["adapter"])
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        base = manifest.get("base_model")
        return {
            "name": result["name"],
            "version": result["version"],
            "path": str(path),
            "weights_sha256": manifest["weights_sha256"],
            "base_model": base.get("path") if isinstance(base, dict) else None,
            "manifest": manifest,
        }
    return None


def main(argv: list[str] | None = None) -> int:
    from loraplane.trainer.__main__ import main as train

    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        code = train(argv)
    finally:
        sys.stdout = tee.target
    if code == 0 and int(os.environ.get("RANK", "0")) == 0:
        result = published(tee.seen.getvalue())
        if result is not None:
            sys.stdout.write(RESULT_PREFIX + json.dumps(result, sort_keys=True) + "\n")
            sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())

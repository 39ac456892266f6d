"""``python -m loraplane.serving.check_adapter``: the checks a version must pass before vLLM loads it,
run where its files are.

The CLI runs this with ``kubectl exec`` in a Ready vLLM pod when it talks to a cluster from outside:
the adapter's files are on the shared volume, which only the pods mount. The version (the registry's
JSON of it) arrives on stdin; the pod's own limits and base model come as arguments. One JSON line
comes back on stdout: ``{"ok": true}``, or ``{"ok": false, "error": ..., "hint": ..., "exit_code": N}``
with that exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplane.common.errors import LoraplaneError
from loraplane.registry.model import AdapterVersion
from loraplane.serving.base_model import load_base_model
from loraplane.serving.reconcile import check_files


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loraplane.serving.check_adapter", description=__doc__)
    p.add_argument("--adapters-root", type=Path, required=True, help="the server's adapters root")
    p.add_argument("--max-lora-rank", type=int, required=True, help="the server's --max-lora-rank")
    p.add_argument("--base-root", help="the served base model's path or hub id (its model card's root)")
    p.add_argument("--served-name", action="append", default=[], help="a served name of the base model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        try:
            entry = AdapterVersion.model_validate_json(sys.stdin.buffer.read())
        except ValueError as exc:
            raise LoraplaneError(f"the version to check is not the registry's JSON of one: {exc}") from None
        names = tuple(args.served_name)
        base = load_base_model(args.base_root, served_names=names) if args.base_root else None
        check_files(entry, adapters_root=args.adapters_root, max_lora_rank=args.max_lora_rank, base=base)
    except LoraplaneError as exc:
        out = {"ok": False, "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
        sys.stdout.write(json.dumps(out) + "\n")
        return exc.exit_code or 1
    sys.stdout.write(json.dumps({"ok": True, "base_checked": base is not None}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

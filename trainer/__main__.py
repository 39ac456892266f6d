"""``python -m loraplane.trainer --config FILE [key=value ...]``: train and publish one adapter."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplane.common.errors import LoraplaneError
from loraplane.common.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplane.trainer", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.epochs=3")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    from loraplane.trainer.config import load_config
    from loraplane.trainer.train import train_and_publish

    try:
        config = load_config(args.config, args.overrides)
        result = train_and_publish(config)
    except LoraplaneError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    print(json.dumps({"adapter": str(result.path), "name": result.name, "version": result.version}))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``loraplane`` command. Each module holds one group of commands (``app`` the root, its global
options and the helpers they share); importing them registers their commands on :data:`app`.

Heavy libraries (torch, transformers, trl, vLLM) are imported only inside the commands that need
them, so ``loraplane --help`` is instant.
"""

from loraplane.platform.cli import adapters, data, evals, local, pipeline, release, train
from loraplane.platform.cli.app import app

__all__ = ["adapters", "app", "data", "evals", "local", "main", "pipeline", "release", "train"]


def main() -> None:
    app(prog_name="loraplane")

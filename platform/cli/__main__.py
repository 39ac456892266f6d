"""``python -m loraplane.platform.cli``: the ``loraplane`` command (what pipeline steps and images run)."""

from loraplane.platform.cli import main

main()

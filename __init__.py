"""loraplane: fine-tune LLMs with LoRA and serve the adapters with vLLM.

The repository root is this package. Components are subpackages: ``loraplane.platform`` (control
layer and CLI), ``loraplane.trainer``, ``loraplane.serving`` and ``loraplane.evals``.
"""

__version__ = "0.1.0"

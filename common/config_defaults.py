"""A command-line flag's default read from the config model that declares it, so it is written once.

``python -m loraplane.serving`` and ``python -m loraplane.serving.gateway`` parse argparse flags into
pydantic config models; their defaults come from the models' fields::

    p.add_argument("--port", type=int, default=field_default(VLLMServerConfig, "port"))
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def field_default(model: type[BaseModel], name: str) -> Any:
    """The default of ``model.name`` (its factory called); a field without one is a programming error."""
    field = model.model_fields[name]
    if field.is_required():
        raise KeyError(f"{model.__name__}.{name} has no default")
    return field.get_default(call_default_factory=True)

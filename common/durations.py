"""One duration type for every ``--timeout``: seconds as a number (``90``, ``1.5``) or Go's form
(``90s``, ``10m``, ``1h30m``, what Helm and kubectl take). Parsed to seconds at the edge; Helm gets it
back in Go's form."""

from __future__ import annotations

import re

from loraplane.common.errors import InvalidInputError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str | float, *, field: str = "--timeout") -> float:
    """Seconds from ``90``, ``1.5``, ``90s``, ``10m``, ``1h30m`` or ``250ms``; zero and negatives refused."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        value = text.strip()
        try:
            seconds = float(value)
        except ValueError:
            parts = _PART.findall(value)
            if not value or "".join(n + u for n, u in parts) != value:
                raise InvalidInputError(
                    f"{field}: {text!r} is not a duration",
                    hint="give seconds (90) or a Go duration such as 90s, 10m or 1h30m",
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0:
        raise InvalidInputError(f"{field}: {text!r} must be longer than zero", hint="for example 10m")
    return seconds


def go_duration(seconds: float) -> str:
    """Go's form of ``seconds`` (whole milliseconds), as Helm's ``--timeout`` takes it."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"

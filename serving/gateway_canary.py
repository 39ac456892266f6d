"""Weighted canary: a share of an adapter's ``prod`` traffic goes to the version another alias names.

A rule ``support-bot:canary=10`` sends 10 % of the requests for ``support-bot`` and
``support-bot:prod`` to the version ``support-bot:canary`` points at, while that alias is set (and
its version not retired); the rest, and every request naming a version or another alias
explicitly, is unchanged. A request with OpenAI's ``user`` field is assigned by a hash of the
adapter and the user, so one user stays on one side of the split while the weight does not change;
requests without it are assigned at random.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME = r"[a-z0-9][a-z0-9-]*"
SPEC = re.compile(rf"^(?P<name>{NAME}):(?P<alias>{NAME})=(?P<percent>[0-9]+(?:\.[0-9]+)?)$")


class CanaryRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: Annotated[str, Field(pattern=rf"^{NAME}$")] = "canary"
    percent: Annotated[float, Field(gt=0, le=100, description="Share of the prod traffic, in percent.")]


def parse_canary(spec: str) -> tuple[str, CanaryRule]:
    """``NAME:ALIAS=PERCENT`` (``support-bot:canary=10``) as the adapter's name and its rule."""
    match = SPEC.match(spec.strip())
    if not match or match["alias"] == "prod":
        raise ValueError(f"{spec!r} is not a canary rule: use NAME:ALIAS=PERCENT, e.g. support-bot:canary=10")
    return match["name"], CanaryRule(alias=match["alias"], percent=float(match["percent"]))


def takes_canary(rule: CanaryRule, name: str, user: str | None, rng: random.Random) -> bool:
    if user:
        digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
    else:
        draw = rng.random()
    return draw * 100 < rule.percent

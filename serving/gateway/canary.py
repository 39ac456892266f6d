"""Weighted canary: a share of an adapter's ``prod`` traffic goes to the version another alias names.

A rule ``support-bot:canary=10`` sends 10 % of the requests for ``support-bot`` and
``support-bot:prod`` to the version ``support-bot:canary`` points at, while that alias is set (and
its version not retired); the rest, and every request naming a version or another alias
explicitly, is unchanged. A request with OpenAI's ``user`` field is assigned by a hash of the
adapter and the user, so one user stays on one side of the split while the weight does not change;
requests without it are assigned at random.

Rules come from the command line (``--canary NAME:ALIAS=PERCENT``) and from the environment
(``LORAPLANE_GATEWAY_CANARIES``, a JSON object ``{"NAME": {"alias": "canary", "percent": 10}}``: what
the chart's ``gateway.canary`` renders). Both are merged per adapter name; for a name in both, the
command line wins.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from loraplane.common.errors import ConfigError, format_validation_error

NAME = r"[a-z0-9][a-z0-9-]*"
SPEC = re.compile(rf"^(?P<name>{NAME}):(?P<alias>{NAME})=(?P<percent>[0-9]+(?:\.[0-9]+)?)$")
CANARIES_ENV = "LORAPLANE_GATEWAY_CANARIES"


def _adapter_name(name: str) -> str:
    if not re.fullmatch(NAME, name):
        raise ValueError(
            f"{name!r} is not an adapter name (lowercase letters, digits and '-', e.g. support-bot)"
        )
    return name


def _not_prod(alias: str) -> str:
    if alias == "prod":
        raise ValueError("the canary alias cannot be prod (prod is what the rest of the traffic gets)")
    return alias


AdapterName = Annotated[str, AfterValidator(_adapter_name)]


class CanaryRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: Annotated[str, Field(pattern=rf"^{NAME}$"), AfterValidator(_not_prod)] = "canary"
    percent: Annotated[float, Field(gt=0, le=100, description="Share of the prod traffic, in percent.")]


CanaryRules = dict[AdapterName, CanaryRule]
_RULES: TypeAdapter[CanaryRules] = TypeAdapter(CanaryRules)


def parse_canary(spec: str) -> tuple[str, CanaryRule]:
    """``NAME:ALIAS=PERCENT`` (``support-bot:canary=10``) as the adapter's name and its rule."""
    match = SPEC.match(spec.strip())
    if not match or match["alias"] == "prod":
        raise ValueError(f"{spec!r} is not a canary rule: use NAME:ALIAS=PERCENT, e.g. support-bot:canary=10")
    return match["name"], CanaryRule(alias=match["alias"], percent=float(match["percent"]))


def canaries_from_env(environ: Mapping[str, str]) -> CanaryRules:
    """The rules of ``LORAPLANE_GATEWAY_CANARIES`` (none when unset or empty).

    Raises ConfigError naming the variable and each bad field (``support-bot.percent: got 0; ...``).
    """
    raw = environ.get(CANARIES_ENV, "").strip()
    if not raw:
        return {}
    try:
        return _RULES.validate_json(raw)
    except ValidationError as exc:
        error = format_validation_error(exc, source=CANARIES_ENV)
        raise ConfigError(
            error.message,
            hint='a JSON object {"NAME": {"alias": "canary", "percent": 10}} (the chart: gateway.canary)',
        ) from None


def takes_canary(rule: CanaryRule, name: str, user: str | None, rng: random.Random) -> bool:
    if user:
        digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
    else:
        draw = rng.random()
    return draw * 100 < rule.percent

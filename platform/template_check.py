"""Registration's chat-template check: the template an adapter was trained with against the one the
server applies to chat requests for the base model.

A model prompted with another chat template than the one it was trained with answers worse, with no
error anywhere. The trainer records its template in the manifest (``chat_template``: source, sha256,
text; ``trainer/publish.py``). The server's is, in vLLM's order: its ``--chat-template`` (a file or an
inline template), else the base model directory's own (``common/chat_templates.py``). What the
control layer knows of the served base model, in this order:

- local registry: the state file of the server at ``settings.server_url`` that ``loraplane serve`` /
  ``python -m loraplane.serving`` writes (``--model`` and ``--chat-template``), else that server's
  model list (``GET /v1/models``: the base card's ``root`` is vLLM's ``--model``; a server started
  by hand with ``--chat-template`` is not seen this way);
- Kubernetes registry: the vLLM container's arguments in the release's pods (``LORAPLANE_RELEASE``,
  default ``platform``), whose model directory must be readable here.

A mismatch is refused (exit 2) unless overridden with a reason, which the history keeps. An adapter
whose manifest records no template (published before loraplane recorded it, or not by its trainer),
or a server whose template cannot be known here, is registered with a warning: nothing was checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from loraplane.common.chat_templates import (
    TemplateText,
    excerpt,
    first_difference,
    read_model_template,
    template_sha256,
)
from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.settings import Settings

log = logging.getLogger("loraplane.platform")

OVERRIDE = "--allow-template-mismatch --reason TEXT"


class TemplateMismatchError(InvalidInputError):
    """The adapter was trained with another chat template than the server uses (exit 2)."""


@dataclass(frozen=True)
class ServedBase:
    model: str  # vLLM's --model: a directory or a hub id
    chat_template: str | None  # vLLM's --chat-template, when known and given
    where: str  # how it was learnt


@dataclass(frozen=True)
class TemplateCheck:
    outcome: Literal["match", "mismatch-allowed", "unrecorded", "unknown"]
    message: str  # what was compared, or why nothing was (the warning registration shows)

    @property
    def warning(self) -> str | None:
        return self.message if self.outcome in ("unrecorded", "unknown") else None


def served_base_model(settings: Settings) -> ServedBase | str:
    """The server's ``--model`` and ``--chat-template``, or why they cannot be known here."""
    if settings.registry == "kubernetes":
        from loraplane.serving.launcher import flag_value
        from loraplane.serving.replicas import vllm_container_args

        release = settings.release
        try:
            args = vllm_container_args(settings, release=release)
        except LoraplaneError as exc:
            return f"cannot read the vLLM pods of release {release!r}: {exc.message}"
        model = flag_value(args, "--model")
        if not model:
            return f"release {release!r} has no vLLM pod (or its container names no --model)"
        return ServedBase(model, flag_value(args, "--chat-template"), f"the vLLM pods of release {release!r}")
    from loraplane.serving.server_state import find_local_server

    url = settings.server_url
    state = find_local_server(settings.home, url)
    if state is not None and state.model:
        return ServedBase(state.model, state.chat_template, f"the server at {url} (its state file)")
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        with httpx.Client(timeout=5.0, verify=url.lower().startswith("https://")) as client:
            response = client.get(f"{url.rstrip('/')}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        return f"the server at {url} cannot be reached ({type(exc).__name__})"
    if response.status_code != 200:
        return f"the server at {url} answered GET /v1/models with HTTP {response.status_code}"
    try:
        cards: list[Any] = response.json().get("data", [])
    except (ValueError, AttributeError):
        return f"the server at {url} answered GET /v1/models with something other than a model list"
    bases = [c for c in cards if isinstance(c, dict) and c.get("parent") is None and c.get("root")]
    if not bases:
        return f"the server at {url} lists no base model"
    return ServedBase(str(bases[0]["root"]), None, f"the server at {url} (GET /v1/models)")


def served_template(settings: Settings) -> TemplateText | str:
    """The chat template the server applies for the base model, or why it cannot be known here."""
    base = served_base_model(settings)
    if isinstance(base, str):
        return base
    if base.chat_template:
        flag = base.chat_template
        path = Path(flag).expanduser()
        try:
            if path.is_file():
                return TemplateText(
                    path.read_text(encoding="utf-8"), f"--chat-template {path} of {base.where}"
                )
        except (OSError, UnicodeDecodeError) as exc:
            return f"cannot read --chat-template {flag} of {base.where}: {exc}"
        if "{{" in flag or "{%" in flag:  # vLLM takes an inline template too
            return TemplateText(flag, f"the inline --chat-template of {base.where}")
        return f"--chat-template {flag} of {base.where} cannot be read here"
    from loraplane.serving.base_model import locate_model_dir

    directory = locate_model_dir(base.model)
    if directory is None:
        return f"the base model {base.model} of {base.where} cannot be read here"
    found = read_model_template(directory)
    if found is None:
        return f"the base model {base.model} of {base.where} has no chat template"
    return TemplateText(found.text, f"the tokenizer of {base.model} ({found.source}), served by {base.where}")


def recorded_template(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``chat_template`` record (source, sha256 and text), if it has one."""
    record = manifest.get("chat_template")
    if isinstance(record, dict) and (isinstance(record.get("text"), str) or record.get("sha256")):
        return record
    return None


def check_chat_template(
    settings: Settings,
    manifest: dict[str, Any],
    *,
    ref: str,
    allow_mismatch: bool = False,
    reason: str | None = None,
) -> TemplateCheck:
    """Compare the template ``manifest`` records with the server's; raise :class:`TemplateMismatchError`
    on a mismatch unless ``allow_mismatch`` (with a ``reason``, which the caller records)."""
    if allow_mismatch and not (reason and reason.strip()):
        raise InvalidInputError(
            "--allow-template-mismatch needs --reason: say why this adapter may be served with another "
            "chat template than it was trained with"
        )
    record = recorded_template(manifest)
    if record is None:
        return TemplateCheck(
            "unrecorded",
            f"{ref}: its manifest records no chat template (published by an older loraplane?), so it "
            "cannot be checked against the server's; a template mismatch degrades answers silently",
        )
    served = served_template(settings)
    if isinstance(served, str):
        return TemplateCheck("unknown", f"{ref}: the chat template was not checked: {served}")
    mine_text = record.get("text") if isinstance(record.get("text"), str) else None
    mine_sha = template_sha256(mine_text) if mine_text is not None else str(record.get("sha256"))
    mine_source = f"the adapter's manifest ({record.get('source') or 'source not recorded'})"
    if mine_sha == served.sha256:
        return TemplateCheck("match", f"{ref}: chat template matches {served.source}")
    lines = [
        f"{ref} was trained with another chat template than the server uses for the base model:",
        f"  adapter: {mine_source}, sha256 {mine_sha[:12]}",
        f"  server:  {served.source}, sha256 {served.sha256[:12]}",
    ]
    difference = first_difference(mine_text, served.text) if mine_text is not None else None
    if difference is not None:
        number, column, one, other = difference
        lines += [
            f"  first differing line ({number}, column {column}):",
            f"    - adapter: {excerpt(one, column)}",
            f"    + server:  {excerpt(other, column)}",
        ]
    message = "\n".join(lines)
    if allow_mismatch:
        log.warning("registering despite a chat template mismatch", extra={"adapter": ref, "reason": reason})
        return TemplateCheck("mismatch-allowed", message)
    raise TemplateMismatchError(
        message,
        hint="answers degrade silently when a model is prompted with another template than it was trained "
        "with: serve the training template (vLLM --chat-template) or train on the served one; to register "
        f"anyway: {OVERRIDE}",
    )

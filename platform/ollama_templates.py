"""A Hugging Face (Jinja) chat template as Ollama's Go ``TEMPLATE``, for the families Ollama runs.

Ollama renders a prompt with Go's ``text/template``, not Jinja, so a Jinja template cannot be copied
into a Modelfile. Chat templates come in a few families, each with its own turn markers; the family is
recognised by those markers in the Jinja text (as Ollama's own importer does), and each family has a
Go template written here that renders a conversation to the same text as the Jinja one
(``tests/test_export_ollama.py`` renders both, Go with the real ``text/template`` engine):

==========  ==========================================  ==========================================
family      markers                                     models
==========  ==========================================  ==========================================
llama3      ``<|start_header_id|>`` ``<|eot_id|>``       Llama 3, 3.1, 3.2, 3.3
chatml      ``<|im_start|>`` ``<|im_end|>``             Qwen 1.5-3, many fine-tunes (ChatML)
mistral     ``[INST]`` ``[/INST]``                      Mistral 7B Instruct v0.1-v0.3, Mixtral
gemma       ``<start_of_turn>`` ``<end_of_turn>``       Gemma 1, 2, 3
phi3        ``<|assistant|>`` ``<|end|>``               Phi-3; the loraplane demo model
==========  ==========================================  ==========================================

The Go templates read the conversation from ``.Messages`` (system messages stay in it, where the
Jinja template put them); Ollama gives them every chat or generate request, with the Modelfile's
``SYSTEM`` as the first message when a request has none. A Jinja template's default system prompt
(Qwen's "You are a helpful assistant.", given when a conversation has no system message) becomes
that ``SYSTEM``. The beginning-of-sequence token (``<|begin_of_text|>``, ``<bos>``, ``<s>``) is not
in the Go template: Ollama's tokenizer adds it, as the Hugging Face one does for the Jinja output.

Anything else is refused with the family's name when it is recognisable (Llama 2, Phi-4, Zephyr,
DeepSeek, Command R), so a prompt format is never guessed: ``--template`` takes a Go template
written by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraplane.common.errors import InvalidInputError


@dataclass(frozen=True)
class Family:
    name: str
    models: str
    template: str  # Ollama's Go template
    stops: tuple[str, ...]  # end-of-turn markers: Ollama stops generating at any of them
    # The Jinja output's system turn for a conversation without one: a default system prompt.
    default_system: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Translated:
    family: str
    template: str
    stops: list[str]
    system: str | None = None  # the Jinja template's default system prompt: the Modelfile's SYSTEM
    notes: list[str] = field(default_factory=list)


# Each template ends with the assistant's turn opened: the model writes the reply from there.
_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
# Gemma has no system role: a system message opens the next user turn (Gemma 3's own rule).
_GEMMA = (
    '{{- $system := "" }}{{- range .Messages }}'
    '{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
    '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
    "{{ end }}{{- end }}<start_of_turn>model\n"
)
# Mistral v0.3 (and later): "[INST] text[/INST]", the reply after a space, the system message in the
# last user turn. v0.1/v0.2: "[INST] text [/INST]", the reply right after it (their templates refuse
# system messages; here it opens the first user turn).
_MISTRAL_V3 = (
    "{{- range $i, $m := .Messages }}"
    '{{- if eq $m.Role "user" }}[INST] '
    "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
    "{{ $m.Content }}[/INST]"
    '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>'
    "{{- end }}{{- end }}"
)
_MISTRAL_V1 = (
    '{{- $system := "" }}{{- range .Messages }}'
    '{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    "{{ .Content }} [/INST]"
    '{{- else if eq .Role "assistant" }}{{ .Content }}</s>'
    "{{- end }}{{- end }}"
)

FAMILIES: dict[str, Family] = {
    "llama3": Family(
        "llama3",
        "Llama 3, 3.1, 3.2, 3.3",
        _LLAMA3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        re.compile(r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
    ),
    "chatml": Family(
        "chatml",
        "Qwen and other ChatML models",
        _CHATML,
        ("<|im_start|>", "<|im_end|>"),
        re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S),
    ),
    "mistral": Family("mistral", "Mistral Instruct, Mixtral", _MISTRAL_V3, ("[INST]", "[/INST]")),
    "gemma": Family("gemma", "Gemma 1, 2, 3", _GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": Family(
        "phi3",
        "Phi-3, the loraplane demo model",
        _PHI3,
        ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
        re.compile(r"^<\|system\|>\n(.*?)<\|end\|>\n", re.S),
    ),
}

# Families Ollama export does not translate, recognised so that the refusal can name them.
_UNSUPPORTED = (
    ("<<SYS>>", "Llama 2 chat ([INST] with <<SYS>>)"),
    ("<|im_sep|>", "Phi-4 (ChatML with <|im_sep|>)"),
    ("<\uff5cUser\uff5c>", "DeepSeek"),  # fullwidth vertical lines
    ("<|START_OF_TURN_TOKEN|>", "Command R"),
    ("<|user|>", "Zephyr (<|user|> turns ended by the EOS token)"),
    ("### Instruction", "Alpaca"),
)


def detect_family(jinja: str) -> str:
    """The family of a Jinja chat template, from its turn markers; InvalidInputError naming what it
    looks like otherwise."""
    for marker, name in _UNSUPPORTED[:4]:
        if marker in jinja:
            raise _refusal(name)
    if "<|start_header_id|>" in jinja and "<|eot_id|>" in jinja:
        return "llama3"
    if "<|im_start|>" in jinja and "<|im_end|>" in jinja:
        return "chatml"
    if "<start_of_turn>" in jinja and "<end_of_turn>" in jinja:
        return "gemma"
    if "[INST]" in jinja and "[/INST]" in jinja:
        return "mistral"
    if "<|assistant|>" in jinja and "<|end|>" in jinja:
        return "phi3"
    for marker, name in _UNSUPPORTED[4:]:
        if marker in jinja:
            raise _refusal(name)
    raise _refusal(None)


def _refusal(name: str | None) -> InvalidInputError:
    supported = ", ".join(f"{f.name} ({f.models})" for f in FAMILIES.values())
    what = f"is {name}'s" if name else "matches none of the chat template families known here"
    return InvalidInputError(
        f"the adapter's chat template {what}; Ollama export translates {supported}",
        hint="write the prompt format as an Ollama Go template and pass it with --template FILE "
        "(and --stop for its end-of-turn markers)",
    )


def translate(jinja: str, *, special_tokens: dict[str, str] | None = None) -> Translated:
    """The Go template, stop markers and default system prompt for a Jinja chat template.

    ``special_tokens`` (``bos_token``, ``eos_token``: the tokenizer's) are what the Jinja template is
    rendered with to find a default system prompt; the EOS token is a stop marker too when the
    template ends turns with it."""
    name = detect_family(jinja)
    family = FAMILIES[name]
    template = family.template
    if name == "mistral" and re.search(r"""['"] \[/INST\]""", jinja):
        template = _MISTRAL_V1  # "[INST] text [/INST]": v0.1 and v0.2
    stops = list(family.stops)
    tokens = special_tokens or {}
    eos = tokens.get("eos_token")
    if eos and eos not in stops and ("eos_token" in jinja or eos in jinja):
        stops.append(eos)
    notes: list[str] = []
    system = None
    if family.default_system is not None:
        system, note = _default_system(jinja, family.default_system, tokens)
        if note:
            notes.append(note)
    return Translated(name, template, stops, system, notes)


_PROBE = "loraplane-probe-3f1c"


def _default_system(
    jinja: str, pattern: re.Pattern[str], tokens: dict[str, str]
) -> tuple[str | None, str | None]:
    """The system prompt the Jinja template gives a conversation without one (rendered with
    transformers' own Jinja environment), and a note when it could not be rendered."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return None, "transformers is not installed: the template's default system prompt was not looked for"
    try:
        rendered = render_jinja_template(
            [[{"role": "user", "content": _PROBE}]],
            chat_template=jinja,
            add_generation_prompt=True,
            **tokens,
        )
    except Exception as exc:  # a template that needs more than a plain conversation: say so, go on
        return None, f"the chat template did not render a plain conversation ({type(exc).__name__}: {exc})"
    text = rendered[0][0] if isinstance(rendered, tuple) else rendered
    if isinstance(text, list):
        text = text[0]
    text = str(text)
    bos = tokens.get("bos_token")
    if bos and text.startswith(bos):
        text = text[len(bos) :]
    found = pattern.match(text)
    if found is None or _PROBE in found.group(1):
        return None, None
    return found.group(1), None

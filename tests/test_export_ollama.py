"""`loraplane adapters export --format ollama`: the Modelfile and files, read back; each family's Go
TEMPLATE rendered by Go's own text/template engine against the Jinja template rendered by transformers'
apply_chat_template (the same text for the same conversation); and every refusal.

Ollama itself is not run (no binary, no network): the Go engine is the one Ollama uses, fed the data
Ollama gives a template (``.Messages`` with the system messages in them, ``.System`` their text),
so what is checked is the prompt text Ollama would build. The Go tests are skipped without a Go
toolchain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraplane.common.errors import InvalidInputError
from loraplane.common.settings import Settings
from loraplane.platform.ollama_templates import FAMILIES, detect_family, translate

# Published chat templates (tokenizer_config.json "chat_template" of each model), with the
# architecture and special tokens of the model.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_V02 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system message, conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}{%- endif %}{%- endfor %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = (  # Gemma 3's text-only rule: the system message opens the first user turn
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
    "messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
    '{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}'
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + "
    "messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% endif %}{% for message in messages %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"
)

MODELS: dict[str, dict[str, Any]] = {
    "llama3": {
        "template": LLAMA3,
        "arch": "LlamaForCausalLM",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
    },
    "qwen2": {"template": QWEN2, "arch": "Qwen2ForCausalLM", "bos": None, "eos": "<|im_end|>"},
    "mistral-v0.2": {"template": MISTRAL_V02, "arch": "MistralForCausalLM", "bos": "<s>", "eos": "</s>"},
    "mistral-v0.3": {"template": MISTRAL_V03, "arch": "MistralForCausalLM", "bos": "<s>", "eos": "</s>"},
    "gemma2": {"template": GEMMA2, "arch": "Gemma2ForCausalLM", "bos": "<bos>", "eos": "<eos>"},
    "gemma3": {"template": GEMMA3, "arch": "Gemma3ForCausalLM", "bos": "<bos>", "eos": "<eos>"},
}
FAMILY_OF = {
    "llama3": "llama3",
    "qwen2": "chatml",
    "mistral-v0.2": "mistral",
    "mistral-v0.3": "mistral",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "demo": "phi3",
}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there"}],
    "multi-turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nAnswer briefly."},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another."},
    ],
}

# Go's text/template, fed what Ollama gives a chat template (template/template.go: Execute/collate).
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var data map[string]any
	if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(string(text)))
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


def _go() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.path.exists(p)), None)


@pytest.fixture(scope="module")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = _go()
    if go is None:
        pytest.skip("no Go toolchain: the Go templates are not rendered")
    src = tmp_path_factory.mktemp("gorender")
    (src / "main.go").write_text(GO_RENDER)
    (src / "go.mod").write_text("module gorender\n\ngo 1.21\n")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    built = subprocess.run(
        [go, "build", "-o", str(src / "render"), "."], cwd=src, capture_output=True, text=True, env=env
    )
    assert built.returncode == 0, built.stderr
    return src / "render"


def _ollama_render(binary: Path, template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """What Ollama renders: the Modelfile's SYSTEM first when the request has no system message; the
    system messages stay in .Messages and their text is .System."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    data = {  # the fields of Ollama's api.Message, as its templates name them
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
    }
    tmpl = binary.parent / "template.txt"
    tmpl.write_text(template)
    done = subprocess.run([str(binary), str(tmpl)], input=json.dumps(data), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _model_dir(root: Path, name: str, demo_model: Path) -> Path:
    """A base model directory with the family's published chat template, special tokens and
    architecture (the demo model's tokenizer.json underneath: the template is what is tested)."""
    spec = MODELS[name]
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo_model / "tokenizer.json", directory / "tokenizer.json")
    tokens = {k: v for k, v in (("bos_token", spec["bos"]), ("eos_token", spec["eos"])) if v}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": spec["template"], **tokens}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({"architectures": [spec["arch"]]}))
    return directory


def _jinja_render(model_dir: Path, messages: list[dict[str, str]]) -> str | None:
    """transformers' apply_chat_template; None when the template refuses the conversation. The BOS
    token is left out: Ollama's tokenizer adds it, as the Hugging Face tokenizer does."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return None
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


@pytest.mark.parametrize("name", [*MODELS, "demo"])
def test_each_family_renders_the_same_text_as_its_jinja_template(
    name: str, demo_model: Path, tmp_path: Path, go_render: Path
) -> None:
    model_dir = demo_model if name == "demo" else _model_dir(tmp_path, name, demo_model)
    from loraplane.common.chat_templates import read_model_template
    from loraplane.platform.export_ollama import _special_tokens

    found = read_model_template(model_dir)
    assert found is not None
    translated = translate(found.text, special_tokens=_special_tokens(model_dir))
    assert translated.family == FAMILY_OF[name]
    compared = 0
    for conversation in CONVERSATIONS.values():
        expected = _jinja_render(model_dir, conversation)
        if expected is None:
            continue  # the Jinja template refuses it (Gemma 2 and Mistral v0.2 take no system message)
        got = _ollama_render(go_render, translated.template, conversation, translated.system)
        assert got == expected, f"{name}: {conversation}"
        compared += 1
    assert compared >= 2


def test_stop_markers_and_default_system_prompt_per_family(demo_model: Path, tmp_path: Path) -> None:
    expected_stops = {
        "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "qwen2": ["<|im_start|>", "<|im_end|>"],
        "mistral-v0.2": ["[INST]", "[/INST]", "</s>"],
        "mistral-v0.3": ["[INST]", "[/INST]", "</s>"],
        "gemma2": ["<start_of_turn>", "<end_of_turn>"],
        "gemma3": ["<start_of_turn>", "<end_of_turn>"],
    }
    from loraplane.platform.export_ollama import _special_tokens

    for name, stops in expected_stops.items():
        model_dir = _model_dir(tmp_path, name, demo_model)
        translated = translate(MODELS[name]["template"], special_tokens=_special_tokens(model_dir))
        assert translated.stops == stops, name
        assert translated.system == ("You are a helpful assistant." if name == "qwen2" else None), name
        assert translated.template == FAMILIES[FAMILY_OF[name]].template or name == "mistral-v0.2"
    # The demo model: Phi-3's turn markers, its EOS token <|end|> among them.
    demo = translate(
        (demo_model / "chat_template.jinja").read_text(), special_tokens={"eos_token": "<|end|>"}
    )
    assert demo.family == "phi3" and "<|end|>" in demo.stops and demo.system is None


def test_unknown_families_are_refused_by_name() -> None:
    with pytest.raises(InvalidInputError, match=r"Llama 2 chat"):
        detect_family(LLAMA2)
    with pytest.raises(InvalidInputError, match=r"matches none of the chat template families") as info:
        detect_family("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert "--template" in (info.value.hint or "")
    with pytest.raises(InvalidInputError, match=r"Phi-4"):
        detect_family("<|im_start|>{{ m.role }}<|im_sep|>{{ m.content }}<|im_end|>")


# --- the command ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_adapter(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter of the demo model (random, non-zero weights: registration refuses an all-zero
    lora_B), with the manifest the trainer writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplane.common.chat_templates import template_sha256

    directory = tmp_path_factory.mktemp("adapters") / "bot" / "v1"
    model = AutoModelForCausalLM.from_pretrained(str(demo_model))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(directory))
    template = (demo_model / "chat_template.jinja").read_text()
    manifest = {
        "name": "bot",
        "version": "v1",
        "base_model": {"path": str(demo_model), "revision": None, "quantization": "none"},
        "chat_template": {"source": "test", "sha256": template_sha256(template), "text": template},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LORAPLANE_HOME": str(settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(settings.adapters_dir),
        "LORAPLANE_SERVER_URL": settings.server_url,
        "COLUMNS": "300",
    }
    return subprocess.run(
        [sys.executable, "-m", "loraplane.platform.cli", *args], capture_output=True, text=True, env=env
    )


def parse_modelfile(text: str) -> dict[str, Any]:
    """Modelfile syntax as Ollama's parser reads it: one instruction a line (case-insensitive), an
    argument either to the end of the line, "double-quoted" or a \"\"\"triple-quoted\"\"\" block over
    several lines; PARAMETER NAME VALUE; # comments."""
    parsed: dict[str, Any] = {"parameters": []}
    pos = 0
    while pos < len(text):
        end = text.find("\n", pos)
        line = text[pos : end if end != -1 else len(text)]
        if not line.strip() or line.lstrip().startswith("#"):
            pos = (end if end != -1 else len(text)) + 1
            continue
        command, _, rest = line.strip().partition(" ")
        command = command.upper()
        if rest.startswith('"""'):
            close = text.index('"""', pos + line.index('"""') + 3)
            value = text[pos + line.index('"""') + 3 : close]
            end = text.find("\n", close)
        elif rest.startswith('"'):
            value = json.loads(rest)
        else:
            value = rest
        if command == "PARAMETER":
            key, _, raw = value.partition(" ")
            parsed["parameters"].append((key, json.loads(raw) if raw.startswith('"') else raw))
        else:
            assert command in ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "LICENSE", "MESSAGE"), command
            assert command not in parsed, f"{command} twice"
            parsed[command] = value
        pos = (end if end != -1 else len(text)) + 1
    return parsed


def test_export_of_a_registered_version_writes_a_modelfile_and_the_adapter(
    settings: Settings, demo_adapter: Path, demo_model: Path, tmp_path: Path
) -> None:
    from loraplane.common.files import sha256_file
    from loraplane.platform.adapters import register_adapter

    published = settings.adapters_dir / "bot" / "v1"  # registered versions live under the adapters root
    shutil.copytree(demo_adapter, published)
    register_adapter(settings, published)
    out = tmp_path / "export"
    done = _cli(settings, "adapters", "export", "bot@v1", "--format", "ollama", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "ollama create" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter", "loraplane-export.json"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256_file(out / "adapter" / name) == sha256_file(demo_adapter / name)

    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert modelfile["FROM"] == str(demo_model.resolve()), "the base model directory in the manifest"
    assert modelfile["ADAPTER"] == "./adapter"
    assert modelfile["TEMPLATE"] == FAMILIES["phi3"].template
    assert "SYSTEM" not in modelfile
    stops = [value for key, value in modelfile["parameters"] if key == "stop"]
    assert stops == ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    provenance = json.loads((out / "loraplane-export.json").read_text())
    assert provenance["adapter"]["ref"] == "bot@v1" and provenance["architecture"] == "LlamaForCausalLM"

    # --base with an Ollama model name: FROM says it as given; JSON output.
    named = tmp_path / "named"
    done = _cli(
        settings, "adapters", "export", "bot@v1", "--out", str(named), "--base", "demo:latest", "-o", "json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["base"] == "demo:latest"
    assert parse_modelfile((named / "Modelfile").read_text())["FROM"] == "demo:latest"


def test_merged_export_writes_the_merged_model_and_a_modelfile_from_it(
    settings: Settings, demo_adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    done = _cli(settings, "adapters", "export", str(demo_adapter), "--merged", "--out", str(out))
    assert done.returncode == 0, done.stderr
    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert modelfile["FROM"] == "./model" and "ADAPTER" not in modelfile
    assert modelfile["TEMPLATE"] == FAMILIES["phi3"].template
    model = out / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    assert (model / "loraplane-merge.json").is_file(), "written by the existing merge"
    assert not list(model.glob("*.bin"))


def _variant(
    demo_adapter: Path, root: Path, *, manifest: dict[str, Any], config: dict[str, Any] | None = None
) -> Path:
    directory = root / "variant"
    directory.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(demo_adapter / name, directory / name)
    if config:
        adapter_config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**adapter_config, **config}))
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _refused(settings: Settings, out: Path, *args: str) -> str:
    done = _cli(settings, "adapters", "export", *args, "--out", str(out))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.staging-*")), "nothing written"
    return done.stderr


def test_refusals_say_why_and_write_nothing(
    settings: Settings, demo_adapter: Path, demo_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    base_manifest = {"name": "bot", "version": "v1", "base_model": {"path": str(demo_model)}}

    # A base architecture Ollama takes no adapter for (Qwen 2, Gemma 3): named, with the way out.
    for name, arch in (("qwen2", "Qwen2ForCausalLM"), ("gemma3", "Gemma3ForCausalLM")):
        base = _model_dir(tmp_path / "bases", name, demo_model)
        stderr = _refused(settings, out, str(demo_adapter), "--base", str(base))
        assert arch in stderr and "--merged" in stderr

    # DoRA: LoRA's A and B only.
    dora = _variant(demo_adapter, tmp_path / "dora", manifest=base_manifest, config={"use_dora": True})
    assert "DoRA" in _refused(settings, out, str(dora))

    # A chat template of a family not translated here: named.
    llama2 = _variant(
        demo_adapter,
        tmp_path / "llama2",
        manifest={**base_manifest, "chat_template": {"text": LLAMA2}},
    )
    assert "Llama 2 chat" in _refused(settings, out, str(llama2))

    # The base model is gone and no --base: the Modelfile could not say FROM.
    gone = _variant(
        demo_adapter,
        tmp_path / "gone",
        manifest={"name": "bot", "version": "v1", "base_model": {"path": str(tmp_path / "no-such-model")}},
    )
    assert "--base" in _refused(settings, out, str(gone))

    # An existing output directory is never overwritten; another format is a usage error.
    out.mkdir()
    done = _cli(settings, "adapters", "export", str(demo_adapter), "--out", str(out))
    assert done.returncode == 2 and "already exists" in done.stderr
    done = _cli(
        settings, "adapters", "export", str(demo_adapter), "--format", "gguf", "--out", str(tmp_path / "x")
    )
    assert done.returncode == 2 and "ollama" in done.stderr

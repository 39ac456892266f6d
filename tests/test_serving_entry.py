"""``python -m loraplane.serving``: the one way vLLM is started, in the cluster and locally."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplane.serving.capacity import DEFAULT_CPU_LORAS
from loraplane.serving.launcher import LoraModule, VLLMServerConfig


def _entry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraplane.serving", *args], capture_output=True, text=True)


def test_config_becomes_exact_vllm_arguments_and_environment() -> None:
    config = VLLMServerConfig(
        model="/m",
        served_model_name="base",
        port=8123,
        max_loras=2,
        max_lora_rank=8,
        kv_cache_gib=1,
        api_key="secret",
        lora_modules=(LoraModule(name="bot@v1", path=Path("/a/bot/v1")),),
    )
    argv = config.argv(python="python")
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert argv[argv.index("--max-cpu-loras") + 1] == str(DEFAULT_CPU_LORAS)  # room beyond max_loras
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # loopback unless told otherwise
    assert (
        argv[argv.index("--lora-modules") + 1]
        == '{"name": "bot@v1", "path": "/a/bot/v1", "base_model_name": "base"}'
    )
    assert "secret" not in " ".join(argv)  # the key goes through the environment, not the command line
    env = config.env({})
    assert env["VLLM_API_KEY"] == "secret"
    assert env["VLLM_PLUGINS"] == ""  # no resolver plugins that load adapters by name
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_entry_point_can_turn_off_runtime_adapter_routes() -> None:
    on = _entry("--model", "/m", "--served-model-name", "b", "--print-argv")
    off = _entry("--model", "/m", "--served-model-name", "b", "--no-runtime-lora-updating", "--print-argv")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in on.stdout
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=0" in off.stdout


def test_entry_point_rejects_bad_values_naming_the_field(tmp_path: Path) -> None:
    bad = _entry("--model", "/m", "--served-model-name", "b", "--max-lora-rank", "12")
    assert bad.returncode == 2
    assert "max_lora_rank: got 12" in bad.stderr
    missing = _entry("--model", "/m", "--served-model-name", "b", "--api-key-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "--api-key-file" in missing.stderr


def test_api_key_file_is_used_and_never_printed(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    out = _entry("--model", "/m", "--served-model-name", "b", "--api-key-file", str(key), "--print-argv")
    assert out.returncode == 0
    assert "s3cret" not in out.stdout


def test_a_starting_server_serves_every_servable_registered_version(tmp_path: Path) -> None:
    """Rehydration without runtime loading: what a restarted pod passes to vLLM as --lora-modules, read
    from the registry (with runtime loading, the default, nothing: the supervisor loads them one by one
    once vLLM is up, see test_rehydrate_e2e.py)."""
    import json

    from support import write_fake_adapter

    from loraplane.common.settings import Settings
    from loraplane.platform.adapters import register_adapter, unload_adapter

    settings = Settings(home=tmp_path / "state", adapters_root=tmp_path / "adapters", max_lora_rank=16)
    paths = {}
    for name, version, rank in (("bot", "v1", 8), ("bot", "v2", 8), ("bot", "v3", 8), ("wide", "v1", 16)):
        paths[f"{name}@{version}"] = write_fake_adapter(settings.adapters_dir / name / version, r=rank)
        register_adapter(settings, paths[f"{name}@{version}"], name=name, version=version)
    import asyncio

    asyncio.run(unload_adapter(settings, "bot@v2", retire=True))  # retired: never served again
    (paths["bot@v3"] / "adapter_model.safetensors").write_bytes(b"tampered")  # changed since registration

    registry = ("--registry-home", str(settings.home), "--adapters-root", str(settings.adapters_dir))
    out = _entry(
        "--model", "/m", "--served-model-name", "base", "--max-lora-rank", "8", *registry,
        "--no-runtime-lora-updating", "--print-argv",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    modules = [json.loads(a) for a in argv[argv.index("--lora-modules") + 1 :] if a.startswith("{")]
    assert [(m["name"], m["path"]) for m in modules] == [("bot@v1", str(paths["bot@v1"]))]
    assert "serving 1 registered adapter version(s) from startup" in out.stderr
    assert "not serving bot@v3: bot@v3:" in out.stderr and "sha256 mismatch" in out.stderr
    assert "not serving wide@v1:" in out.stderr and "exceeds the server's max_lora_rank 8" in out.stderr
    assert "bot@v2" not in out.stderr + out.stdout

    # With runtime loading (the default) vLLM starts with no adapter at all: none can stop it starting.
    runtime = _entry("--model", "/m", "--served-model-name", "base", *registry, "--print-argv")
    assert runtime.returncode == 0, runtime.stderr
    assert "--lora-modules" not in shlex.split(runtime.stdout) and "--enable-lora" in runtime.stdout

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "registry.json").write_text("{not json")
    failed = _entry(
        "--model", "/m", "--served-model-name", "b", "--registry-home", str(broken), "--print-argv"
    )
    assert failed.returncode == 1 and "cannot read the registry" in failed.stderr


def test_base_only_server_has_no_lora_flags_and_refuses_adapters() -> None:
    base_only = VLLMServerConfig(model="/m", served_model_name="base", enable_lora=False)
    argv = base_only.argv(python="python")
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras"} & set(argv)
    assert base_only.env({})["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "0"
    with pytest.raises(ValidationError, match="enable_lora is false"):
        VLLMServerConfig(
            model="/m",
            served_model_name="base",
            enable_lora=False,
            lora_modules=(LoraModule(name="bot@v1", path=Path("/a")),),
        )


def test_kv_cache_size_is_whole_gib_as_vllm_reads_it() -> None:
    # vLLM's CPU backend parses VLLM_CPU_KVCACHE_SPACE with int(): 0.5 would kill it at start.
    with pytest.raises(ValidationError, match="kv_cache_gib"):
        VLLMServerConfig(model="/m", served_model_name="base", kv_cache_gib=0.5)
    bad = _entry("--model", "/m", "--served-model-name", "b", "--kv-cache-gib", "0.5")
    assert bad.returncode == 2 and "--kv-cache-gib" in bad.stderr

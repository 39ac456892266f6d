"""How many adapters a server holds (serving/capacity.py): the default cache, and the refusal at its limit.

The refusal on a real vLLM server is in tests/test_capacity_e2e.py and tests/test_serve_local_e2e.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loraplane.common.errors import ExitCode
from loraplane.common.settings import Settings
from loraplane.platform.serve_local import ServeOptions, supervisor_argv
from loraplane.serving.capacity import DEFAULT_CPU_LORAS, ServerFullError, cpu_lora_capacity, require_room
from loraplane.serving.launcher import VLLMServerConfig


def _cpu_loras(argv: list[str]) -> str:
    return argv[argv.index("--max-cpu-loras") + 1]


def test_a_server_we_start_has_room_beyond_its_batch_slots_unless_told() -> None:
    assert cpu_lora_capacity(max_loras=2, max_cpu_loras=None) == DEFAULT_CPU_LORAS > 2
    assert cpu_lora_capacity(max_loras=DEFAULT_CPU_LORAS + 8, max_cpu_loras=None) == DEFAULT_CPU_LORAS + 8
    assert cpu_lora_capacity(max_loras=4, max_cpu_loras=5) == 5
    config = VLLMServerConfig(model="/m", served_model_name="b", max_loras=2, max_lora_rank=8)
    assert _cpu_loras(config.argv(python="python")) == str(DEFAULT_CPU_LORAS)
    told = config.model_copy(update={"max_cpu_loras": 3})
    assert _cpu_loras(told.argv(python="python")) == "3"


def test_loraplane_serve_passes_its_cache_size_to_the_server(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, adapters_root=tmp_path / "adapters")
    given = supervisor_argv(settings, ServeOptions(model="/m", max_cpu_loras=7), tmp_path / "s.json")
    assert given[:3] == [sys.executable, "-m", "loraplane.serving"] and _cpu_loras(given) == "7"
    unset = supervisor_argv(settings, ServeOptions(model="/m"), tmp_path / "s.json")
    assert "--max-cpu-loras" not in unset  # the serving entry point's default applies


def test_a_full_server_refuses_one_more_and_names_the_fix() -> None:
    require_room(["a", "b"], "c", 3, server="http://s")  # room left
    require_room(["a", "b"], "b", 2, server="http://s")  # already there: a reload needs no room
    require_room(["a", "b", "c"], "d", None, server="http://s")  # unknown limit: not checked
    with pytest.raises(ServerFullError) as refused:
        require_room(["a", "b"], "c", 2, server="http://s")
    err = refused.value
    assert err.exit_code == ExitCode.REFUSED
    assert "cannot load c on http://s" in err.message and "--max-cpu-loras 2" in err.message
    assert err.hint is not None and "adapters unload" in err.hint and "serving.maxCpuLoras" in err.hint

"""Registration reads every byte of an adapter's weights: a file vLLM could not load never registers.

Each damaged file here passed registration before (only the header was read), and its next server
start ended with vLLM's "incomplete metadata, file not fully covered" (see test_rehydrate_e2e.py
for what a server now does with such a file when an older registry holds it).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from support import write_fake_adapter
from typer.testing import CliRunner

from loraplane.common.settings import Settings
from loraplane.platform.adapters import register_adapter
from loraplane.platform.cli import app
from loraplane.serving.adapter_weights import AdapterWeightsError, verify_adapter_weights

WEIGHTS = "adapter_model.safetensors"
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _split(raw: bytes) -> tuple[dict[str, dict[str, object]], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header: dict[str, dict[str, object]], data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def truncated(raw: bytes) -> bytes:
    return raw[:-1]


def header_only(raw: bytes) -> bytes:
    return raw[: 8 + struct.unpack("<Q", raw[:8])[0]]


def zero_filled(raw: bytes) -> bytes:
    head = header_only(raw)
    return head + bytes(len(raw) - len(head))


def one_nan(raw: bytes) -> bytes:
    header, data = _split(raw)
    begin = header[A]["data_offsets"][0]  # type: ignore[index]
    return _join(header, data[:begin] + np.float32("nan").tobytes() + data[begin + 4 :])


def trailing_bytes(raw: bytes) -> bytes:
    return raw + b"\0\0\0\0"


def overlapping(raw: bytes) -> bytes:
    header, data = _split(raw)
    header[B]["data_offsets"] = header[A]["data_offsets"]
    return _join(header, data)


def integer_dtype(raw: bytes) -> bytes:
    header, data = _split(raw)
    header[A]["dtype"] = "I32"
    return _join(header, data)


def wrong_span(raw: bytes) -> bytes:
    header, data = _split(raw)
    header[A]["shape"] = [8, 64]  # half the bytes its offsets span
    return _join(header, data)


def only_lora_a(raw: bytes) -> bytes:
    tensors = safetensors.numpy.load(raw)
    return safetensors.numpy.save({A: tensors[A]})


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (truncated, "1 byte(s) shorter than its header says"),
        (header_only, "shorter than its header says"),
        (zero_filled, "every lora_A tensor is all zeros, so the adapter changes nothing"),
        (one_nan, "holds 1 non-finite value(s) (NaN or infinity)"),
        (trailing_bytes, "4 byte(s) after the last tensor are not described by the header"),
        (overlapping, "overlaps the tensor before it"),
        (integer_dtype, "has dtype 'I32'; LoRA weights must be floating point"),
        (wrong_span, "needs 2048 bytes, but its data_offsets span 4096"),
        (only_lora_a, "has lora_A but no lora_B"),
    ],
)
def test_a_damaged_weights_file_is_refused_at_registration_and_nothing_is_recorded(
    settings: Settings, damage: Callable[[bytes], bytes], says: str
) -> None:
    adapter = write_fake_adapter(settings.adapters_dir / "bot" / "v1")
    weights = adapter / WEIGHTS
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(AdapterWeightsError) as refused:
        register_adapter(settings, adapter, name="bot", version="v1")
    assert says in refused.value.message and str(weights) in refused.value.message
    assert refused.value.hint, "every refusal says what to do"
    assert not (settings.home / "registry.json").exists(), "a refused adapter leaves no registry entry"

    result = CliRunner().invoke(
        app,
        ["--home", str(settings.home), "--adapters-root", str(settings.adapters_dir),
         "adapters", "register", str(adapter), "--name", "bot", "--version", "v1"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())


def test_a_sound_file_registers_with_the_sha256_of_every_byte(settings: Settings) -> None:
    adapter = write_fake_adapter(settings.adapters_dir / "bot" / "v1")
    entry = register_adapter(settings, adapter, name="bot", version="v1")
    assert entry.weights_sha256 == hashlib.sha256((adapter / WEIGHTS).read_bytes()).hexdigest()


def test_bfloat16_weights_are_read_and_a_nan_in_them_is_found(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    a, b = torch.randn(8, 128, dtype=torch.bfloat16), torch.randn(128, 8, dtype=torch.bfloat16)
    save_file({A: a, B: b}, str(tmp_path / WEIGHTS))
    verified = verify_adapter_weights(tmp_path / WEIGHTS, {"r": 8})
    assert verified.tensors == {A: (8, 128), B: (128, 8)}
    b[3, 2] = float("inf")
    save_file({A: a, B: b}, str(tmp_path / WEIGHTS))
    with pytest.raises(AdapterWeightsError, match=r"lora_B.weight' holds 1 non-finite"):
        verify_adapter_weights(tmp_path / WEIGHTS, {"r": 8})


def test_weights_of_another_rank_than_the_config_declares_are_refused(tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "a", r=8)
    with pytest.raises(AdapterWeightsError, match=r"rank 8, which adapter_config.json does not declare"):
        verify_adapter_weights(adapter / WEIGHTS, {"r": 16})
    assert verify_adapter_weights(adapter / WEIGHTS, {"r": 16, "rank_pattern": {"q_proj": 8}})

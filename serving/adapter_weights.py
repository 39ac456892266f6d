"""Read an adapter's safetensors file completely and prove that every byte of it is usable.

``preflight`` reads only the JSON header, which is enough for every load (the sha256 recorded at
registration proves the bytes did not change since). Registration reads everything once, because a
file that passes a header check can still stop vLLM at load time:

- the header's offsets must cover the data exactly (no gap, no overlap, nothing missing at the end:
  a file cut short by a single byte is refused here, not by vLLM's "incomplete metadata, file not
  fully covered" at the next start);
- every tensor is floating point (F16, BF16, F32, F64), its byte span matches its dtype and shape,
  and every value is finite (no NaN, no infinity);
- LoRA tensors are two-dimensional, each module's ``lora_A``/``lora_B`` come in pairs whose rank
  agrees, and that rank is one the adapter's config declares (``r`` or a ``rank_pattern`` value);
- the adapter changes something: when every ``lora_A`` or every ``lora_B`` is all zeros, its
  update ``B @ A`` is zero everywhere (an untrained adapter, or a file whose data was zeroed).

Only numpy is used (no torch), one tensor in memory at a time; the sha256 of the whole file is
computed from the same read.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from loraplane.common.adapter_dir import MAX_HEADER_BYTES
from loraplane.common.errors import InvalidInputError

FLOAT_DTYPES: dict[str, tuple[str, int]] = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2)}
BF16 = "BF16"


class AdapterWeightsError(InvalidInputError):
    """The weights file is damaged or cannot be a working LoRA adapter."""


@dataclass(frozen=True)
class VerifiedWeights:
    """A weights file that was read completely and found sound."""

    path: Path
    sha256: str
    tensors: dict[str, tuple[int, ...]]
    size: int


def _refuse(path: Path, what: str, hint: str = "the file is damaged: publish the adapter again") -> None:
    raise AdapterWeightsError(f"{path}: {what}", hint=hint)


def _header(path: Path, fh: BinaryIO, size: int) -> tuple[bytes, dict[str, Any]]:
    """The raw header bytes (length prefix included) and the parsed tensor table."""
    prefix = fh.read(8)
    if len(prefix) < 8:
        _refuse(path, f"only {len(prefix)} bytes: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        _refuse(path, f"the header claims {length} bytes, but the file has {size}")
    raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterWeightsError(f"{path}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        _refuse(path, "the header is not a JSON object")
    header.pop("__metadata__", None)
    if not header:
        _refuse(path, "the file holds no tensor", hint="save the adapter again with peft's save_pretrained")
    return prefix + raw, header


def _layout(
    path: Path, header: dict[str, Any], data_size: int
) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, begin, end) sorted by offset; the spans must tile the data exactly."""
    spans = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            _refuse(path, f"tensor {name!r} has no description in the header")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype == BF16:
            itemsize = 2
        elif dtype in FLOAT_DTYPES:
            itemsize = FLOAT_DTYPES[dtype][1]
        else:
            _refuse(
                path,
                f"tensor {name!r} has dtype {dtype!r}; LoRA weights must be floating point "
                "(F16, BF16, F32 or F64)",
                hint="save the adapter's weights in a float dtype (peft does by default)",
            )
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            _refuse(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            _refuse(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            _refuse(path, f"tensor {name!r} has data_offsets {offsets} that go backwards")
        if end - begin != math.prod(shape) * itemsize:
            _refuse(
                path,
                f"tensor {name!r} ({dtype}, shape {shape}) needs {math.prod(shape) * itemsize} bytes, "
                f"but its data_offsets span {end - begin}",
            )
        spans.append((name, str(dtype), tuple(shape), begin, end))
    spans.sort(key=lambda s: (s[3], s[4]))
    position = 0
    for name, _, _, begin, end in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            _refuse(path, f"tensor {name!r} starts at data byte {begin} and {what}")
        position = end
    if position != data_size:
        missing = position - data_size
        if missing > 0:
            _refuse(
                path,
                f"the file is {missing} byte(s) shorter than its header says (truncated: the tensors need "
                f"{position} data bytes, the file has {data_size})",
            )
        _refuse(path, f"{-missing} byte(s) after the last tensor are not described by the header")
    return spans


def _values(raw: bytes, dtype: str) -> np.ndarray[Any, Any]:
    if dtype == BF16:  # bfloat16 is the upper half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=FLOAT_DTYPES[dtype][0])


def _declared_ranks(config: dict[str, Any] | None) -> set[int] | None:
    if config is None:
        return None
    try:
        return {int(config.get("r", 0)), *(int(v) for v in (config.get("rank_pattern") or {}).values())}
    except (TypeError, ValueError, AttributeError):
        return None  # the config check names this


def verify_adapter_weights(path: Path, config: dict[str, Any] | None = None) -> VerifiedWeights:
    """Read ``path`` completely; raise AdapterWeightsError naming the first problem, else return facts.

    ``config`` is the adapter's ``adapter_config.json``: with it, each module's rank must be declared.
    """
    from loraplane.common.adapter_dir import LORA_KEY

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head, header = _header(path, fh, size)
            spans = _layout(path, header, size - len(head))
            digest = hashlib.sha256(head)
            ranks: dict[str, dict[str, int]] = {}
            nonzero = {"lora_A": False, "lora_B": False}
            seen = {"lora_A": False, "lora_B": False}
            for name, dtype, shape, begin, end in spans:
                raw = fh.read(end - begin)
                if len(raw) != end - begin:
                    _refuse(path, f"tensor {name!r} could not be read completely")
                digest.update(raw)
                values = _values(raw, dtype)
                if not bool(np.isfinite(values).all()):
                    bad = int((~np.isfinite(values)).sum())
                    _refuse(
                        path,
                        f"tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity)",
                        hint="training diverged or the file is damaged: retrain (lower the learning rate) "
                        "or publish it again",
                    )
                match = LORA_KEY.match(name)
                if match is None:
                    continue
                kind = match["kind"].removeprefix("lora_embedding_")
                kind = "lora_A" if kind in ("lora_A", "A") else "lora_B"
                if len(shape) != 2:
                    _refuse(path, f"LoRA tensor {name!r} has shape {list(shape)}; LoRA matrices are 2-D")
                ranks.setdefault(match["module"], {})[kind] = shape[0] if kind == "lora_A" else shape[1]
                seen[kind] = True
                nonzero[kind] = nonzero[kind] or bool(np.any(values != 0))
    except OSError as exc:
        raise AdapterWeightsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    declared = _declared_ranks(config)
    for module, pair in sorted(ranks.items()):
        if len(pair) != 2:
            (have,) = pair
            _refuse(path, f"module {module} has {have} but no {'lora_B' if have == 'lora_A' else 'lora_A'}")
        if pair["lora_A"] != pair["lora_B"]:
            _refuse(
                path,
                f"module {module}: lora_A has rank {pair['lora_A']} but lora_B has rank {pair['lora_B']}",
            )
        if declared and pair["lora_A"] not in declared:
            _refuse(
                path,
                f"module {module} has rank {pair['lora_A']}, which adapter_config.json does not declare "
                f"(r / rank_pattern: {sorted(declared)})",
                hint="the config and the weights come from different adapters: publish them together again",
            )
    for kind in ("lora_A", "lora_B"):
        if seen[kind] and not nonzero[kind]:
            _refuse(
                path,
                f"every {kind} tensor is all zeros, so the adapter changes nothing (untrained, or its data "
                "was zeroed)",
                hint="train the adapter (at least one step) or publish the file again",
            )
    tensors = {name: shape for name, _, shape, _, _ in spans}
    return VerifiedWeights(path=path, sha256=digest.hexdigest(), tensors=tensors, size=size)

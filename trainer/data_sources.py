"""Reading training rows from a JSONL file, a Parquet file or a `datasets` dataset.

Every reader returns a :class:`RawSource`: the rows that decoded to a JSON object, numbered from 1 (the
line number in a JSONL file, the row number elsewhere), and the problems found while reading. Readers
never raise for bad data: they record it (see :mod:`loraplane.trainer.data_errors`) and go on, so a
report can show every problem at once.

JSONL is read as bytes and checked here rather than by Python's text layer: a UTF-8 byte order mark,
a UTF-16 file, undecodable bytes, an empty file and a file that is one JSON array (or one
pretty-printed object) each get their own class and line number. Blank lines are skipped but keep
the numbering of the lines after them.

Values that are ``None`` are kept as they are; the row checks treat them as absent, which is what
Parquet and Arrow-backed datasets produce for a key that some rows lack.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.common.files import sha256_file
from loraplane.trainer.data_errors import RowError

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


@dataclass
class RawSource:
    name: str  # what the report calls it: a path, or "hub:NAME[split]"
    unit: str = "line"  # "line" (JSONL) or "row" (Parquet, datasets)
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    rows: int = 0  # non-blank rows read
    sha256: str = ""

    def error(self, kind: str, row: int, message: str) -> None:
        self.errors.append(RowError(kind, row, message))


def read_path(path: Path) -> RawSource:
    """A Parquet file by its suffix, anything else as JSON Lines."""
    return read_parquet(path) if path.suffix.lower() == ".parquet" else read_jsonl(path)


def read_jsonl(path: Path) -> RawSource:
    """Read a JSON Lines file: one JSON object per line, UTF-8 without a byte order mark."""
    src = RawSource(name=str(path), unit="line")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        src.error("unreadable", 1, "no such file")
        return src
    except OSError as exc:
        src.error("unreadable", 1, f"cannot read the file: {exc.strerror or exc}")
        return src
    src.sha256 = hashlib.sha256(data).hexdigest()
    if data.startswith(UTF16_BOMS):
        src.error(
            "invalid_utf8",
            1,
            "the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8",
        )
        return src
    if data.startswith(UTF8_BOM):
        src.error(
            "utf8_bom", 1, "the file starts with a UTF-8 byte order mark (EF BB BF); save it without one"
        )
        data = data[len(UTF8_BOM) :]
    if not data.strip():
        src.error("empty_file", 1, "the file has no examples (it is empty or only blank lines)")
        return src
    lines = data.split(b"\n")
    first = next(i for i, line in enumerate(lines) if line.strip())
    if _whole_file_is_one_json_value(src, data, lines, first):
        return src
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        src.rows += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            src.error(
                "invalid_utf8",
                lineno,
                f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not valid UTF-8; "
                "save the file as UTF-8",
            )
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            src.error("not_json", lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            kind = "null" if obj is None else _JSON_TYPES.get(type(obj), type(obj).__name__)
            src.error("not_object", lineno, f"expected a JSON object, got {kind}")
            continue
        src.records.append((lineno, obj))
    return src


def _whole_file_is_one_json_value(src: RawSource, data: bytes, lines: list[bytes], first: int) -> bool:
    """Recognise a JSON array file, or one object pretty-printed over many lines, and say so once."""
    head = lines[first].lstrip()[:1]
    if head not in (b"[", b"{"):
        return False
    if head == b"{":
        try:
            json.loads(lines[first])
            return False  # the first line is an object on its own: ordinary JSON Lines
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    try:
        whole = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    src.rows = sum(1 for line in lines if line.strip())
    if isinstance(whole, list):
        src.error(
            "json_array_file",
            first + 1,
            f"the file is one JSON array ({len(whole)} items), not JSON Lines; "
            "write one JSON object per line (e.g. jq -c '.[]' FILE)",
        )
        return True
    if isinstance(whole, dict) and src.rows > 1:
        src.error(
            "not_json",
            first + 1,
            f"the whole file is one JSON object spread over {src.rows} lines; write each example on one line",
        )
        return True
    return False


def read_parquet(path: Path) -> RawSource:
    """Read a Parquet file; each row is one example (columns as keys)."""
    src = RawSource(name=str(path), unit="row")
    if not path.is_file():
        src.error("unreadable", 1, "no such file")
        return src
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # a dependency of datasets

    src.sha256 = sha256_file(path)
    try:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows == 0:
            src.error("empty_file", 1, "the Parquet file has no rows")
            return src
        for batch in parquet.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                src.rows += 1
                src.records.append((src.rows, obj))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        src.error("unreadable", src.rows + 1, f"not a readable Parquet file: {exc}")
    return src


def hub_source_name(name: str, split: str) -> str:
    return f"hub:{name}[{split}]"


def read_hub(name: str, split: str) -> RawSource:
    """Read one split of a `datasets` dataset: a hub id, a local dataset directory (data files, as
    ``load_dataset`` reads them) or a directory written by ``Dataset.save_to_disk``.

    A hub dataset is downloaded into the `datasets` cache like any ``load_dataset`` call. Its
    fingerprint is the sha256 of the rows themselves (canonical JSON, one per line), so it names the
    data trained on whatever revision or cache it came from.
    """
    import datasets

    datasets.disable_progress_bars()
    src = RawSource(name=hub_source_name(name, split), unit="row")
    local = Path(name)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"unknown split {split!r}; it has {', '.join(loaded)}")
                rows = loaded[split]
            elif split == "train":
                rows = loaded
            else:
                raise ValueError(f"the saved dataset has one split, so use split 'train', not {split!r}")
        else:
            rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many unrelated types (hub, network, file, schema errors)
        src.error("unreadable", 1, f"cannot load split {split!r}: {type(exc).__name__}: {exc}")
        return src
    digest = hashlib.sha256()
    for obj in rows:
        src.rows += 1
        digest.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
        src.records.append((src.rows, obj))
    src.sha256 = digest.hexdigest()
    if src.rows == 0:
        src.error("empty_file", 1, f"split {split!r} has no rows")
    return src

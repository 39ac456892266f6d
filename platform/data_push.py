"""``loraplane data push``: check a training file with the trainer's own checks, then put it on the
release's shared volume under a name that is its content.

The data is checked for the ``method`` of the runs it is for (``--method``): conversations (``sft``)
or preference pairs (``dpo``: prompt/chosen/rejected, or OpenAI's preference format); the push records
it, and ``train submit`` refuses a pushed name of the other method. Bad data exits 2 with the report's
reasons (error class and line) and uploads nothing. Good data lands at
``datasets/<name>/sha256-<digest><suffix>`` (through :func:`loraplane.platform.volume.put`: staged,
checked and renamed into place), so the path a run's config names says exactly which bytes it
trained on, and pushing the same file again finds it there instead of uploading it twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError
from loraplane.common.files import sha256_file
from loraplane.common.settings import Settings

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,44}[a-z0-9])?$")  # also a ConfigMap name's suffix
INDEX_PREFIX = "loraplane-dataset-"  # one ConfigMap per pushed name: what `dataset.pushed` resolves to
DATASET_LABEL = "loraplane.dev/dataset"


@dataclass(frozen=True)
class DataPushResult:
    name: str
    path: str  # where pods read it: <mount>/datasets/<name>/sha256-<digest><suffix>
    sha256: str
    rows: int  # usable training rows (preference pairs for dpo), as the trainer counts them
    bytes: int
    uploaded: bool  # False when the same content was already there
    method: str = "sft"  # what it was checked as, the `method` of the runs it is for: sft or dpo

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_name(file: Path, name: str | None) -> str:
    """``name``, or one made from the file's stem; refused unless it is a lowercase DNS-style label."""
    chosen = name if name is not None else re.sub(r"[^a-z0-9-]+", "-", file.stem.lower()).strip("-")[:46]
    if not NAME.match(chosen):
        raise InvalidInputError(
            f"--name {chosen!r}: not a dataset name",
            hint="use lowercase letters, digits and '-' (at most 46, starting and ending with a letter or "
            "digit), e.g. --name support-chats",
        )
    return chosen


def destination(name: str, digest: str, suffix: str) -> str:
    return f"datasets/{name}/sha256-{digest}{suffix}"


def push_dataset(
    settings: Settings,
    file: Path,
    *,
    base_model: str,
    name: str | None = None,
    release: str = "platform",
    max_seq_length: int = 1024,
    data_format: str | None = None,
    method: str | None = None,
    revision: str | None = None,
    chat_template: Path | None = None,
    timeout: float = 1800.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> DataPushResult:
    """Validate ``file`` against ``base_model``'s tokenizer, then put it on the volume; see the module.

    ``method`` (``sft`` or ``dpo``; default: ``dpo`` for a preference ``data_format``, else ``sft``) is
    what the data is checked as: conversations, or preference pairs; it is recorded with the push.
    """
    from pydantic import ValidationError

    from loraplane.common.errors import format_validation_error
    from loraplane.common.jsonl import DatasetError
    from loraplane.platform.volume import VolumeRefused, put, volume_target
    from loraplane.trainer.config import BaseModelSpec, DatasetSpec
    from loraplane.trainer.data import load_tokenizer, validate_dataset
    from loraplane.trainer.preference_data import data_method, looks_like_preference

    chosen = dataset_name(file, name)
    checked_as = data_method(method, data_format)
    if not file.is_file():
        raise InvalidInputError(f"{file}: no such file", hint="give a JSONL or Parquet training file")
    try:
        dataset = DatasetSpec.model_validate(
            {"path": file, **({"format": data_format} if data_format else {})}
        )
        model = BaseModelSpec.model_validate(
            {"path": base_model, "revision": revision, "chat_template": chat_template}
        )
    except ValidationError as exc:
        raise format_validation_error(exc, source="the data push options") from None
    prepared = validate_dataset(
        dataset,
        load_tokenizer(model),
        max_seq_length=max_seq_length,
        assistant_only_loss=True,
        seed=0,
        method=checked_as,
    )
    reasons = prepared.failures()
    if reasons:
        as_dpo = " --method dpo" if checked_as == "dpo" else ""
        hint = f"see `loraplane data validate {file} -m {base_model}{as_dpo}` for the whole report"
        if checked_as == "sft" and looks_like_preference(file):
            hint = (
                "its rows are preference pairs (chosen / rejected): push them for DPO runs with "
                f"--method dpo; or {hint}"
            )
        kind = " as preference pairs (--method dpo)" if checked_as == "dpo" else ""
        raise DatasetError(
            f"{file} is not usable for training{kind}; nothing was uploaded:\n"
            + "\n".join(f"  - {r}" for r in reasons),
            hint=hint,
        )
    digest = sha256_file(file)
    dest = destination(chosen, digest, file.suffix)
    rows = len(prepared.train.usable)
    size = file.stat().st_size
    try:
        put_result = put(settings, file, dest, release=release, timeout=timeout, on_progress=on_progress)
        result = DataPushResult(
            chosen,
            f"{put_result.mount_path}/{put_result.path}",
            digest,
            rows,
            size,
            uploaded=True,
            method=checked_as,
        )
    except VolumeRefused as exc:
        if "already exists" not in str(exc):
            raise
        # the name is the content: the same bytes are there already
        mount = volume_target(settings, release).mount_path
        result = DataPushResult(
            chosen, f"{mount}/{dest}", digest, rows, size, uploaded=False, method=checked_as
        )
    record_push(settings, result, file=file, release=release)
    return result


def _index_map(result: DataPushResult, *, file: Path, release: str) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": INDEX_PREFIX + result.name,
            "labels": {
                "app.kubernetes.io/managed-by": "loraplane",
                "app.kubernetes.io/instance": release,
                DATASET_LABEL: result.name,
            },
        },
        "data": {
            "path": result.path,
            "sha256": result.sha256,
            "rows": str(result.rows),
            "bytes": str(result.bytes),
            "method": result.method,
            "file": file.name,
            "pushed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }


def record_push(settings: Settings, result: DataPushResult, *, file: Path, release: str) -> None:
    """Remember ``result`` as the newest file pushed under its name (a ConfigMap in the namespace, kept
    across uninstalls like the volume), for ``dataset.pushed`` in a run's config."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from loraplane.common.kube import KubernetesError, api_client, api_message

    core: Any = client.CoreV1Api(api_client(settings))
    body = _index_map(result, file=file, release=release)
    name = body["metadata"]["name"]
    try:
        try:
            core.create_namespaced_config_map(settings.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            core.replace_namespaced_config_map(name, settings.namespace, body)
    except ApiException as exc:
        raise KubernetesError(
            f"{result.path} is on the volume, but its name {result.name!r} could not be recorded: "
            f"{api_message(exc)}",
            hint=f"name the file in dataset.path instead: {result.path}",
        ) from None


def resolve_pushed(settings: Settings, name: str, *, method: str | None = None) -> dict[str, str]:
    """The newest file pushed as ``name`` (its ``path``, ``sha256``, ``rows``, ``method``, ...).

    ``method``: the run's; refused (exit 2) unless the file was checked for it (a push recorded before
    pushes had a method was checked as supervised data: ``sft``)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from loraplane.common.kube import KubernetesError, api_client, api_message

    core: Any = client.CoreV1Api(api_client(settings))
    try:
        found = core.read_namespaced_config_map(INDEX_PREFIX + name, settings.namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise InvalidInputError(
                f"dataset.pushed: no dataset {name!r} was pushed to namespace {settings.namespace!r}",
                hint=f"push it first: loraplane -n {settings.namespace} data push FILE -m BASE_MODEL "
                f"--name {name}",
            ) from None
        raise KubernetesError(f"cannot read the pushed dataset {name!r}: {api_message(exc)}") from None
    data: dict[str, str] = dict(found.data or {})
    if "path" not in data:
        raise InvalidInputError(f"dataset.pushed: the record of {name!r} names no path; push it again")
    data.setdefault("method", "sft")
    if method is not None and data["method"] != method:
        what = {"sft": "supervised data", "dpo": "preference pairs"}
        raise InvalidInputError(
            f"dataset.pushed: {name!r} was pushed as {what.get(data['method'], data['method'])} "
            f"(method {data['method']}), but this run's method is {method}",
            hint=f"push the {what.get(method, method)} it needs: loraplane -n {settings.namespace} data push "
            f"FILE -m BASE_MODEL --method {method} --name NAME; or set method: {data['method']}",
        )
    return data

"""Where a base model comes from, and the one directory it is kept in on the shared volume.

A base model is named one of three ways, everywhere (``serving.model``, the trainer's
``base_model.path``, ``loraplane models pull``):

* a directory: ``/data/models/base`` (already on the volume, or local);
* a Hugging Face hub repository: ``hf://ORG/NAME`` or ``hf://ORG/NAME@REVISION`` (a branch, tag or
  commit; ``main`` when left out);
* an object-storage prefix: ``s3://BUCKET/PREFIX`` (AWS S3 or any S3 API: MinIO, Ceph, R2).

A reference is fetched once into ``MODELS_ROOT/<name>@<revision>/`` (:func:`ModelRef.local_dir`):
``hf://Qwen/Qwen2.5-0.5B@main`` -> ``Qwen--Qwen2.5-0.5B@main``, ``s3://models/llama/1b`` ->
``s3--models--llama--1b@s3``. The name depends only on the reference, so the chart, the trainer
and the CLI agree on it without asking anyone; a branch is what it was when first fetched (pin a
commit for runs you need to reproduce: the commit fetched is recorded next to the model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraplane.common.errors import ConfigError

Scheme = Literal["path", "hf", "s3"]
SCHEMES = ("hf://", "s3://")
DEFAULT_REVISION = "main"
S3_REVISION = "s3"  # object storage has no revisions; one name for "what the prefix held"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_PART = re.compile(r"^[A-Za-z0-9._-]+$")

EXAMPLES = "hf://ORG/NAME@REVISION, s3://BUCKET/PREFIX or an absolute directory"


class ModelRefError(ConfigError):
    """The text does not name a model in a form loraplane can fetch."""


@dataclass(frozen=True)
class ModelRef:
    scheme: Scheme
    location: str  # the directory, the hub repository id, or BUCKET/PREFIX
    revision: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.scheme != "path"

    @property
    def bucket(self) -> str:
        return self.location.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        return self.location.split("/", 1)[1] if "/" in self.location else ""

    def dir_name(self) -> str:
        """``<name>@<revision>``: the model's directory name under the models root."""
        if self.scheme == "hf":
            return (
                f"{self.location.replace('/', '--')}@{(self.revision or DEFAULT_REVISION).replace('/', '--')}"
            )
        if self.scheme == "s3":
            return f"s3--{self.location.replace('/', '--')}@{S3_REVISION}"
        raise ValueError("a directory has no fetched name")

    def local_dir(self, models_root: Path) -> Path:
        """Where the model is (a directory) or is fetched to (a reference)."""
        return Path(self.location) if self.scheme == "path" else models_root / self.dir_name()

    def __str__(self) -> str:
        if self.scheme == "hf":
            return f"hf://{self.location}@{self.revision or DEFAULT_REVISION}"
        if self.scheme == "s3":
            return f"s3://{self.location}"
        return self.location


def is_reference(text: str) -> bool:
    """True for ``hf://`` and ``s3://`` references (fetched), False for directories and bare hub ids."""
    return text.startswith(SCHEMES)


def parse_model_ref(text: str, *, field: str = "model", revision: str | None = None) -> ModelRef:
    """Parse a reference or a directory; ``field`` names the value in the error message.

    ``revision`` (the trainer's ``base_model.revision``) applies to an ``hf://`` reference that
    names none; naming two different ones is an error."""
    value = text.strip()
    if value.startswith("hf://"):
        body = value.removeprefix("hf://").strip("/")
        repo, _, rev = body.partition("@")
        if not _REPO_ID.match(repo):
            raise ModelRefError(
                f"{field}: {text!r} does not name a hub repository",
                hint="write hf://ORG/NAME or hf://ORG/NAME@REVISION, e.g. hf://Qwen/Qwen2.5-0.5B-Instruct@main",
            )
        if rev and revision and rev != revision:
            raise ModelRefError(
                f"{field}: {text!r} names revision {rev!r} but the revision given is {revision!r}"
            )
        rev = rev or revision or DEFAULT_REVISION
        if not _REVISION.match(rev) or ".." in rev:
            raise ModelRefError(
                f"{field}: revision {rev!r} of {text!r} is not a branch, tag or commit name",
                hint="use letters, digits and . _ - / (e.g. main, v1.0 or a 40-character commit)",
            )
        return ModelRef("hf", repo, rev)
    if value.startswith("s3://"):
        body = value.removeprefix("s3://").strip("/")
        bucket, _, prefix = body.partition("/")
        parts = [p for p in prefix.split("/") if p]
        if (
            not _BUCKET.match(bucket)
            or not parts
            or not all(_KEY_PART.match(p) and p not in {".", ".."} for p in parts)
        ):
            raise ModelRefError(
                f"{field}: {text!r} does not name an object-storage prefix",
                hint="write s3://BUCKET/PREFIX, where PREFIX is the 'directory' holding config.json and the "
                "weights (letters, digits, . _ - and /)",
            )
        return ModelRef("s3", f"{bucket}/{'/'.join(parts)}")
    if "://" in value:
        raise ModelRefError(
            f"{field}: {text!r} uses a scheme loraplane cannot fetch from",
            hint=f"use {EXAMPLES}",
        )
    if not value:
        raise ModelRefError(f"{field}: empty", hint=f"use {EXAMPLES}")
    return ModelRef("path", value, revision)

"""Fetch a base model once onto the shared volume: staged, resumable, renamed into place when whole.

``python -m loraplane.common.model_fetch hf://ORG/NAME@REV --models-root /data/models`` is what the
chart's model-fetch Job and ``loraplane models pull`` run; the trainer calls :func:`ensure_model`
for an ``hf://``/``s3://`` base model. How it behaves:

* the model goes to ``MODELS_ROOT/.fetch/<name>@<rev>.partial/`` first, and is renamed to
  ``MODELS_ROOT/<name>@<rev>/`` only once every file is there and ``config.json`` is among them:
  a reader (vLLM, the trainer) sees the whole model or nothing;
* it is downloaded with huggingface_hub's own code (``hf_hub_download`` per file, pinned to the
  commit the revision resolved to, so a push during the download cannot mix two commits) or with
  boto3 (``download_file`` per object). A cut transfer is continued within a run (huggingface_hub
  retries with a Range request); a fetch cut off for good (pod killed, server down) keeps the files
  it completed, and running it again downloads only the others (huggingface_hub 2.x restarts a
  partial file from its start: it downloads each to a process-unique temporary file);
* one fetcher at a time per model (a lock file next to the staging directory); a second one waits
  and then finds the model there;
* progress goes to the log: files and bytes done of the total;
* tokens never pass through arguments: huggingface_hub reads ``HF_TOKEN`` / ``HF_TOKEN_PATH``,
  boto3 its usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_ENDPOINT_URL`` for MinIO and other S3 APIs), both filled from Kubernetes Secrets;
* a wrong id, a missing token or a denied bucket is an error naming the value to fix (exit 2, never
  retried; the reason is also kept in ``MODELS_ROOT/.fetch/<name>@<rev>.error`` for the pods that
  wait for the model); a server that cannot be reached is exit 1 (worth a retry).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.files import atomic_write_text, fsync_dir
from loraplane.common.model_ref import ModelRef, parse_model_ref

MARKER = ".loraplane-model.json"  # written last into a fetched model: what it is and where from
FETCH_DIR = ".fetch"  # staging directories, locks and error notes, under the models root
ENV_MODELS_ROOT = "LORAPLANE_MODELS_ROOT"

Say = Callable[[str], None]


class ModelFetchError(InvalidInputError):
    """The model cannot be fetched as named (exit 2): a wrong id, a missing token, a denied bucket."""


class ModelSourceUnavailable(LoraplaneError):
    """The hub or the object store could not be reached (exit 1): running again may work."""


@dataclass(frozen=True)
class FetchResult:
    source: str  # the reference, normalised (hf://ORG/NAME@REV, s3://BUCKET/PREFIX)
    path: str  # the model directory
    revision: str  # the commit fetched (hub), or "s3"
    files: int
    bytes: int
    seconds: float
    fetched: bool  # False when the model was already there

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quiet(_: str) -> None:
    return None


def staging_paths(ref: ModelRef, models_root: Path) -> tuple[Path, Path, Path]:
    """(staging directory, lock file, error note) of a reference."""
    base = models_root / FETCH_DIR / ref.dir_name()
    return (
        base.with_name(base.name + ".partial"),
        base.with_name(base.name + ".lock"),
        base.with_name(base.name + ".error"),
    )


def is_complete(directory: Path) -> bool:
    """A model directory is complete once it holds config.json (a fetched one is renamed into place
    whole; ``loraplane volume put`` does the same)."""
    return (directory / "config.json").is_file()


def fetch_error(ref: ModelRef, models_root: Path) -> str | None:
    """Why the last fetch of ``ref`` failed for good, if it did (for the pods waiting for it)."""
    note = staging_paths(ref, models_root)[2]
    try:
        return note.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def _fetch_lock(lock_path: Path, say: Say) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"another fetch of this model is running (lock {lock_path}); waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _Progress:
    def __init__(self, say: Say, files: int, total: int, every: float = 5.0) -> None:
        self.say, self.files, self.total, self.every = say, files, total, every
        self.done_files = 0
        self.done_bytes = 0
        self.next_at = 0.0

    def file_done(self, name: str, size: int) -> None:
        self.done_files += 1
        self.done_bytes += size
        now = time.monotonic()
        if now >= self.next_at or self.done_files == self.files:
            share = 100.0 * self.done_bytes / self.total if self.total else 100.0
            self.say(
                f"{self.done_files}/{self.files} files, {_gb(self.done_bytes)} of {_gb(self.total)} "
                f"({share:.0f}%): {name}"
            )
            self.next_at = now + self.every


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _where_secrets_go(field: str, what: str, chart_value: str, cli_option: str, env: str) -> str:
    """Where the user puts the missing secret, for the place the model was named."""
    if field == "MODEL":  # loraplane models pull
        return f"put {what} in a Kubernetes Secret and pass its name as {cli_option} (locally: set {env})"
    return f"put {what} in a Kubernetes Secret and name it in {chart_value} (locally: set {env})"


# --- Hugging Face hub ---------------------------------------------------------------------------


def _hub_error(ref: ModelRef, field: str, exc: Exception) -> LoraplaneError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    token_hint = _where_secrets_go(
        field,
        "a hub token that can read it",
        "global.models.hfToken.secretName",
        "--hf-token-secret",
        "HF_TOKEN",
    )
    if isinstance(exc, OfflineModeIsEnabled):  # the image's default: vLLM and training never download
        return ModelFetchError(
            f"{field}: {ref} is not on the volume yet, and this process may not download (HF_HUB_OFFLINE=1)",
            hint=f"let the chart fetch it (serving.model: {ref}) or run `loraplane models pull {ref}` first; "
            "a process meant to download sets HF_HUB_OFFLINE=0",
        )
    if isinstance(exc, GatedRepoError):
        return ModelFetchError(
            f"{field}: {ref} is a gated repository and the token given cannot read it (none given, or its "
            "owner has not accepted the model's terms)",
            hint=f"accept the terms on {endpoint}/{ref.location}, then {token_hint}",
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelFetchError(
            f"{field}: {ref.location} has no revision {ref.revision!r} on {endpoint}",
            hint="name an existing branch, tag or commit after @ (e.g. @main)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelFetchError(
            f"{field}: no repository {ref.location!r} on {endpoint} "
            "(or it is private and the token cannot see it)",
            hint=f"check the id (hf://ORG/NAME); for a private repository {token_hint}",
        )
    if isinstance(exc, EntryNotFoundError):
        # a commit's files never change: a missing one is the server's fault, worth a retry (exit 1)
        return ModelSourceUnavailable(
            f"{field}: a file of {ref} vanished during the download: {exc}", hint="run again"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return ModelFetchError(f"{field}: {endpoint} refused access to {ref} ({status})", hint=token_hint)
    return ModelSourceUnavailable(
        f"{field}: could not download {ref} from {endpoint}: {type(exc).__name__}: {exc}",
        hint="check that the hub (HF_ENDPOINT) is reachable from here; running again keeps the files "
        "already downloaded",
    )


def _hub_token() -> str | None:
    """HF_TOKEN, else the file HF_TOKEN_PATH names (the chart mounts the Secret there), else None."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("HF_TOKEN_PATH")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return None


def _fetch_hub(ref: ModelRef, staging: Path, say: Say, field: str) -> tuple[str, int, int]:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our progress lines, not tqdm's
    from huggingface_hub import HfApi, hf_hub_download

    # read now, not when huggingface_hub was imported (it reads both once, at import)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = _hub_token()
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            ref.location, revision=ref.revision, files_metadata=True
        )
        commit = info.sha or str(ref.revision)
        siblings = [(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
        names = {name for name, _ in siblings}
        if "config.json" not in names:
            raise ModelFetchError(
                f"{field}: {ref} has no config.json at its top level: not a transformers model repository",
                hint="name the repository of the model itself "
                "(not a dataset, a GGUF-only or an adapter repository)",
            )
        total = sum(size for _, size in siblings)
        say(f"fetching {ref} (commit {commit[:12]}): {len(siblings)} files, {_gb(total)}")
        progress = _Progress(say, len(siblings), total)
        for name, size in siblings:
            hf_hub_download(
                ref.location, name, revision=commit, local_dir=staging, endpoint=endpoint, token=token
            )
            progress.file_done(name, size)
    except LoraplaneError:
        raise
    except Exception as exc:  # huggingface_hub's and httpx's errors, sorted by _hub_error
        raise _hub_error(ref, field, exc) from exc
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    return commit, len(siblings), total


# --- object storage -------------------------------------------------------------------------------


def _s3_error(ref: ModelRef, field: str, exc: Exception) -> LoraplaneError:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS S3"
    creds_hint = _where_secrets_go(
        field,
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        "global.models.s3.credentialsSecret",
        "--s3-secret",
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
    )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ModelFetchError(
            f"{field}: no object-storage credentials to read {ref} ({exc})", hint=creds_hint
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return ModelFetchError(
                f"{field}: no bucket {ref.bucket!r} at {endpoint}",
                hint="check the bucket name, and the endpoint (global.models.s3.endpointUrl or "
                "AWS_ENDPOINT_URL) "
                "for storage other than AWS",
            )
        if code in {"NoSuchKey", "404"}:  # a HEAD's 404 has no body: the bucket or the key is missing
            return ModelFetchError(
                f"{field}: nothing at {ref} ({endpoint}): no such object, or no such bucket",
                hint="check the bucket and key (aws s3 ls s3://BUCKET/PREFIX)",
            )
        if code in {"AccessDenied", "403", "AllAccessDisabled"}:
            return ModelFetchError(
                f"{field}: access to {ref} denied at {endpoint} ({code})",
                hint="give the credentials' user s3:ListBucket and s3:GetObject on that bucket and prefix, "
                f"or {creds_hint}",
            )
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}:
            return ModelFetchError(
                f"{field}: {endpoint} does not accept the credentials ({code})", hint=creds_hint
            )
    return ModelSourceUnavailable(
        f"{field}: could not download {ref} from {endpoint}: {type(exc).__name__}: {exc}",
        hint="check that the object store (global.models.s3.endpointUrl) is reachable from here; "
        "running again keeps the files already downloaded",
    )


def _fetch_s3(ref: ModelRef, staging: Path, say: Say, field: str) -> tuple[str, int, int]:
    import boto3

    prefix = ref.prefix.rstrip("/") + "/"
    try:
        # a new session each time: the environment's credentials as they are now, never cached ones
        s3 = boto3.session.Session().client("s3")
        objects: list[tuple[str, int]] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=prefix):
            objects += [
                (o["Key"], int(o["Size"])) for o in page.get("Contents", []) if not o["Key"].endswith("/")
            ]
        relative = [(key.removeprefix(prefix), size) for key, size in objects]
        if not relative:
            raise ModelFetchError(
                f"{field}: {ref} holds no objects",
                hint="check the prefix: it is the 'directory' with config.json",
            )
        if "config.json" not in {name for name, _ in relative}:
            raise ModelFetchError(
                f"{field}: {ref} has no config.json directly under it: not a transformers model directory",
                hint="name the prefix that holds config.json and the weights",
            )
        for name, _ in relative:
            parts = name.split("/")
            if any(p in {"", ".", ".."} for p in parts):
                raise ModelFetchError(f"{field}: {ref} holds an object with an unsafe name: {name!r}")
        total = sum(size for _, size in relative)
        say(f"fetching {ref}: {len(relative)} objects, {_gb(total)}")
        progress = _Progress(say, len(relative), total)
        for (key, size), (name, _) in zip(objects, relative, strict=True):
            dest = staging / name
            if not (dest.is_file() and dest.stat().st_size == size):  # done in an earlier try
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(dest.name + ".incomplete")
                s3.download_file(ref.bucket, key, str(part))
                os.replace(part, dest)
            progress.file_done(name, size)
    except LoraplaneError:
        raise
    except Exception as exc:  # botocore's errors, sorted by _s3_error
        raise _s3_error(ref, field, exc) from exc
    return "s3", len(relative), total


def fetch_object(url: str, dest_dir: Path, *, field: str = "dataset.url", say: Say = _quiet) -> Path:
    """Download one ``s3://BUCKET/KEY`` object into ``dest_dir/<etag>/<name>`` (renamed into place
    when whole; found there when the object did not change), with the same errors as a model."""
    import boto3

    body = url.removeprefix("s3://")
    bucket, _, key = body.partition("/")
    name = key.rsplit("/", 1)[-1]
    if not url.startswith("s3://") or not bucket or not key or key.endswith("/") or name in {".", ".."}:
        raise ModelFetchError(f"{field}: {url!r} does not name an object", hint="write s3://BUCKET/KEY")
    ref = ModelRef("s3", f"{bucket}/{key}")
    try:
        s3 = boto3.session.Session().client("s3")
        head = s3.head_object(Bucket=bucket, Key=key)
        etag = str(head.get("ETag", "")).strip('"').replace("/", "_") or "unversioned"
        final = dest_dir / etag / name
        if final.is_file() and final.stat().st_size == int(head.get("ContentLength", -1)):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(f".{name}.incomplete")
        say(f"fetching {url} ({_gb(int(head.get('ContentLength', 0)))})")
        s3.download_file(bucket, key, str(part))
        os.replace(part, final)
    except LoraplaneError:
        raise
    except Exception as exc:  # botocore's errors, sorted as for a model
        raise _s3_error(ref, field, exc) from exc
    return final


# --- the whole fetch ------------------------------------------------------------------------------


def fetch_model(
    ref: ModelRef | str, models_root: Path, *, say: Say = _quiet, field: str = "model"
) -> FetchResult:
    """Fetch ``ref`` into ``models_root`` unless it is there already; see the module docstring."""
    if isinstance(ref, str):
        ref = parse_model_ref(ref, field=field)
    if not ref.is_remote:
        raise ModelFetchError(
            f"{field}: {ref} is a directory, not a reference to fetch", hint="use hf:// or s3://"
        )
    start = time.monotonic()
    final = ref.local_dir(models_root)
    staging, lock_path, error_note = staging_paths(ref, models_root)
    if is_complete(final):
        return _already(ref, final, start)
    staging.parent.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(lock_path, say):
        if is_complete(final):  # another fetcher finished while we waited
            return _already(ref, final, start)
        staging.mkdir(exist_ok=True)
        try:
            fetcher = _fetch_hub if ref.scheme == "hf" else _fetch_s3
            revision, files, size = fetcher(ref, staging, say, field)
        except ModelFetchError as exc:  # nothing worth resuming: the value must change first
            shutil.rmtree(staging, ignore_errors=True)
            atomic_write_text(error_note, str(exc) + "\n")
            raise
        marker = {
            "source": str(ref),
            "revision": revision,
            "files": files,
            "bytes": size,
            "fetched_at": time.time(),
        }
        atomic_write_text(staging / MARKER, json.dumps(marker, indent=2) + "\n")
        if final.exists():  # a directory without config.json: an earlier, broken copy by hand
            raise ModelFetchError(
                f"{field}: {final} exists but holds no config.json; it is not a model loraplane put there",
                hint=f"remove {final} (or move it away) and fetch again",
            )
        os.rename(staging, final)
        fsync_dir(final.parent)
        error_note.unlink(missing_ok=True)
    seconds = time.monotonic() - start
    say(f"fetched {ref} into {final} in {seconds:.0f}s")
    return FetchResult(str(ref), str(final), revision, files, size, round(seconds, 3), True)


def _already(ref: ModelRef, final: Path, start: float) -> FetchResult:
    marker = read_marker(final) or {}
    return FetchResult(
        str(ref),
        str(final),
        str(marker.get("revision", "")),
        int(marker.get("files", 0)),
        int(marker.get("bytes", 0)),
        round(time.monotonic() - start, 3),
        False,
    )


def models_root_default() -> Path:
    """Where references are fetched when nobody says: ``$LORAPLANE_MODELS_ROOT``, else
    ``$LORAPLANE_HOME/models`` (``~/.loraplane/models``)."""
    root = os.environ.get(ENV_MODELS_ROOT)
    if root:
        return Path(root)
    from loraplane.common.settings import default_home

    return default_home() / "models"


def ensure_model(text: str, *, revision: str | None = None, field: str = "model", say: Say = _quiet) -> str:
    """The local directory of a base model: a reference is fetched into :func:`models_root_default`
    first (or found there); anything else (a directory, a bare hub id) is returned as it is."""
    ref = parse_model_ref(text, field=field, revision=revision)
    if not ref.is_remote:
        return text
    return fetch_model(ref, models_root_default(), say=say, field=field).path


def wait_for_model(
    ref: ModelRef, models_root: Path, *, timeout: float, say: Say, every: float = 30.0, poll: float = 1.0
) -> bool:
    """Wait until ``ref`` is fetched (its directory complete); ``timeout`` 0 waits for ever. Says
    what it waits for every ``every`` seconds, with the fetch's failure when there is one: the
    waiting pod's log then names the value to fix while the fetch Job has ended."""
    final = ref.local_dir(models_root)
    start = time.monotonic()
    next_say = start
    while not is_complete(final):
        now = time.monotonic()
        if timeout and now - start >= timeout:
            return False
        if now >= next_say:
            failure = fetch_error(ref, models_root)
            if failure:
                say(f"waiting for {ref} at {final}: its fetch failed: {failure}")
            else:
                say(f"waiting for {ref} at {final}: the model-fetch Job is downloading it")
            next_say = now + every
        time.sleep(poll)
    return True


def _termination_message(text: str) -> None:
    """Kubernetes shows /dev/termination-log as the container's termination message."""
    path = Path("/dev/termination-log")
    if path.exists() and os.access(path, os.W_OK):
        path.write_text(text[-4000:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loraplane.common.model_fetch", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("model", help="hf://ORG/NAME[@REVISION] or s3://BUCKET/PREFIX")
    p.add_argument(
        "--models-root",
        type=Path,
        default=None,
        help="where models are kept (default: $LORAPLANE_MODELS_ROOT or ~/.loraplane/models)",
    )
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        default=None,
        help="do not fetch: wait until the model is there (0 = for ever), saying why it is not",
    )
    p.add_argument(
        "--field",
        default="model",
        help="the setting that named the model, for error messages (e.g. serving.model)",
    )
    args = p.parse_args(argv)

    def say(message: str) -> None:
        print(f"[loraplane.model_fetch] {message}", file=sys.stderr, flush=True)  # noqa: T201

    root = args.models_root or models_root_default()
    try:
        if args.wait is not None:
            ref = parse_model_ref(args.model, field=args.field)
            if not wait_for_model(ref, root, timeout=args.wait, say=say):
                say(f"error: {ref} is not at {ref.local_dir(root)} after {args.wait:.0f}s")
                return 1
            return 0
        result = fetch_model(args.model, root, say=say, field=args.field)
    except LoraplaneError as exc:
        say(f"error: {exc}")
        _termination_message(str(exc))
        return exc.exit_code
    if not result.fetched:
        say(f"{result.source} is already at {result.path}")
    print(json.dumps(result.to_dict()))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

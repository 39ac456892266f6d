"""Filesystem helpers that never leave a half-written file or directory behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _publish_permissions(root: Path) -> None:
    """mkdtemp and some writers create 0700/0600 entries; published trees are world-readable
    (minus the umask) so that a server running as another user (vLLM in its own pod) can read them."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [root, *root.rglob("*")]:
        if entry.is_symlink():
            continue
        entry.chmod((0o755 if entry.is_dir() else 0o644) & ~umask)


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it is renamed to ``final`` in one step.

    On any error (or Ctrl-C) the staging directory is removed, so ``final`` either does not exist or
    is complete. ``final`` must not exist yet: published directories are immutable.
    """
    if final.exists():
        raise FileExistsError(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield staging
        _publish_permissions(staging)
        for child in staging.rglob("*"):
            if child.is_file():
                with child.open("rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(staging, final)  # fails if `final` appeared meanwhile: never overwrite
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

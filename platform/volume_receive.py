"""The receiving end of ``loraplane volume put``, run inside a short-lived pod on the shared volume.

``python -m loraplane.platform.volume_receive --root /data --dest models/base`` reads one tar stream
from stdin (what ``volume put`` sends through ``kubectl exec -i``), unpacks it into a staging
directory on the same volume (``ROOT/.loraplane-staging/``), checks the stream's sha256 against
``--sha256``, and only then renames the result to ``ROOT/DEST``. A broken connection, a killed pod or
a wrong checksum leaves nothing at DEST; staging directories left by a killed pod are removed by the
next upload after an hour.

The archive holds one member tree named ``payload`` (a file or a directory). Members are unpacked
with tarfile's ``data`` filter: no absolute paths, no ``..``, no links out of the tree, no device
files. The last line on stdout is a JSON summary: ``{"path", "files", "bytes", "sha256"}``.
Exit codes: 0 done, 1 failed (the message on stderr), 2 refused (DEST exists without ``--replace``,
or DEST is not a plain relative path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO

STAGING = ".loraplane-staging"
PAYLOAD = "payload"
STALE_SECONDS = 3600.0


class Refused(Exception):
    """The upload is refused before anything is written (exit 2)."""


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: tar's end-of-archive blocks are followed by padding the hash covers too."""
        while self.read(1 << 20):
            pass


def check_dest(dest: str) -> PurePosixPath:
    """``dest`` as a plain relative path on the volume (no ``..``, not the staging area)."""
    path = PurePosixPath(dest)
    if not dest or path.is_absolute() or ".." in path.parts or str(path) == ".":
        raise Refused(f"destination {dest!r} is not a relative path inside the volume (e.g. models/base)")
    if path.parts[0] == STAGING:
        raise Refused(f"destination {dest!r} is inside the upload staging area {STAGING}/")
    return path


def _clear_stale(staging: Path) -> None:
    now = time.time()
    for entry in staging.iterdir() if staging.is_dir() else ():
        try:
            if now - entry.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def receive(
    stream: BinaryIO, root: Path, dest: str, *, sha256: str | None, replace: bool
) -> dict[str, object]:
    """Unpack the tar ``stream`` into ``root/dest`` through a staging directory; see the module doc."""
    relative = check_dest(dest)
    target = root / relative
    if (target.exists() or target.is_symlink()) and not replace:
        raise Refused(f"{relative} already exists on the volume; pass --replace to swap it for the upload")
    staging = root / STAGING
    staging.mkdir(exist_ok=True)
    _clear_stale(staging)
    work = staging / uuid.uuid4().hex
    work.mkdir()
    try:
        reader = _HashingReader(stream)
        files = 0
        total = 0
        with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                if PurePosixPath(member.name).parts[:1] != (PAYLOAD,):
                    raise ValueError(
                        f"unexpected archive member {member.name!r} (everything is under {PAYLOAD}/)"
                    )
                archive.extract(member, work, filter="data")
                if member.isfile():
                    files += 1
                    total += member.size
        reader.drain()
        got = reader.digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise ValueError(f"the upload arrived damaged: sha256 {got}, sent {sha256}")
        payload = work / PAYLOAD
        if not payload.exists():
            raise ValueError("the archive was empty")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            old = work / "replaced"
            os.rename(target, old)
        os.rename(payload, target)
        return {"path": str(relative), "files": files, "bytes": total, "sha256": got}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraplane.platform.volume_receive", description=__doc__)
    p.add_argument("--root", type=Path, required=True, help="the shared volume's mount path")
    p.add_argument("--dest", required=True, help="where the upload goes, relative to --root")
    p.add_argument("--sha256", help="sha256 of the tar stream as sent; a mismatch keeps nothing")
    p.add_argument("--replace", action="store_true", help="swap an existing DEST for the upload")
    args = p.parse_args(argv)
    try:
        summary = receive(sys.stdin.buffer, args.root, args.dest, sha256=args.sha256, replace=args.replace)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except (OSError, ValueError, tarfile.TarError) as exc:
        print(f"failed: {exc}; nothing was kept at {args.dest}", file=sys.stderr)  # noqa: T201
        return 1
    print(json.dumps(summary))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``loraplane models pull``: fetch a base model onto the release's shared volume (or locally).

In a cluster it runs the same fetch as the chart's model-fetch Job
(:mod:`loraplane.common.model_fetch`: staged, resumable, renamed into
``<mount>/models/<name>@<revision>/`` when whole) inside a short-lived ``restricted`` pod that mounts
the volume, with the hub token and the object-storage credentials taken from Kubernetes Secrets the
user names (never values); its progress lines are shown as they come. Without a cluster
(local registry) it fetches into ``$LORAPLANE_MODELS_ROOT`` or ``~/.loraplane/models``.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.model_fetch import FetchResult, fetch_model, models_root_default
from loraplane.common.model_ref import parse_model_ref
from loraplane.common.settings import Settings
from loraplane.platform.volume import PodSecrets, VolumeError, kubectl_argv, volume_pod, volume_target

Say = Callable[[str], None]
PREFIX = "[loraplane.model_fetch] "


def pull_local(model: str, *, models_root: Path | None = None, say: Say) -> FetchResult:
    """Fetch ``model`` (hf:// or s3://) onto this machine."""
    return fetch_model(model, models_root or models_root_default(), say=say, field="MODEL")


def pull_to_volume(
    settings: Settings,
    model: str,
    *,
    release: str = "platform",
    secrets: PodSecrets | None = None,
    models_dir: str = "models",
    hf_endpoint: str | None = None,
    timeout: float = 6 * 3600.0,
    say: Say,
) -> FetchResult:
    """Fetch ``model`` onto ``release``'s shared volume from a pod next to it; see the module."""
    ref = parse_model_ref(model, field="MODEL")  # refused here, before any pod starts
    if not ref.is_remote:
        raise InvalidInputError(
            f"MODEL: {model!r} is a directory, not a reference to fetch",
            hint="use hf://ORG/NAME@REVISION or s3://BUCKET/PREFIX; to upload a local directory use "
            "`loraplane volume put`",
        )
    target = volume_target(settings, release)
    root = f"{target.mount_path.rstrip('/')}/{models_dir.strip('/')}"
    with volume_pod(settings, release, target, timeout, secrets) as pod:
        argv = [*kubectl_argv(settings), "-n", settings.namespace, "exec", pod, "-c", "put", "--"]
        # the image is offline by default (vLLM and training never download); this process downloads
        argv += [
            "env",
            "HF_HUB_OFFLINE=0",
            "HOME=/tmp",
            "HF_HOME=/tmp/hf",
        ]  # the root filesystem is read-only
        argv += [f"HF_ENDPOINT={hf_endpoint}"] if hf_endpoint else []
        argv += ["python", "-m", "loraplane.common.model_fetch", str(ref)]
        argv += [f"--models-root={root}"]
        argv += ["--field=MODEL"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        out: list[str] = []

        def relay(stream: IO[str]) -> None:
            for line in stream:
                text = line.rstrip("\n")
                lines.append(text)
                if text.startswith(PREFIX) and not text.startswith(f"{PREFIX}error: "):
                    say(text.removeprefix(PREFIX))

        # one reader per pipe (communicate() would read stderr too, racing the relay for its lines)
        readers = [
            threading.Thread(target=relay, args=(proc.stderr,), daemon=True),
            threading.Thread(
                target=lambda: out.append(proc.stdout.read() if proc.stdout else ""), daemon=True
            ),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise VolumeError(
                f"the fetch of {ref} did not finish within {timeout:.0f}s",
                hint="running `loraplane models pull` again keeps the files already downloaded",
            ) from None
        for reader in readers:
            reader.join(timeout=10)
    stdout = "".join(out)
    if proc.returncode != 0:
        # the fetch's error line and the lines it continues on (its hint)
        start = next((i for i, line in enumerate(lines) if line.startswith(f"{PREFIX}error: ")), len(lines))
        error = [lines[start].removeprefix(f"{PREFIX}error: ")] if start < len(lines) else []
        error += [
            line
            for line in lines[start + 1 :]
            if not line.startswith(PREFIX) and not line.startswith("command terminated")
        ]
        detail = (
            "\n".join(error)
            or "\n".join(line for line in lines if not line.startswith("command terminated"))
            or f"exit code {proc.returncode}"
        )
        if proc.returncode == 2:
            raise InvalidInputError(detail)
        raise LoraplaneError(
            f"the fetch of {ref} failed: {detail}", hint="running it again keeps the files already downloaded"
        )
    result = json.loads(stdout.strip().splitlines()[-1])
    return FetchResult(**result)

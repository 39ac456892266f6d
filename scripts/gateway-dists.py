"""The Python distributions of the slim gateway image: the gateway's own requirements and everything
they require in turn (their `Requires-Dist` without extras), at the versions installed in the locked
environment (.venv, from requirements/lock.txt). No torch, vLLM or transformers: the gateway
(python -m loraplane.serving.gateway) imports none of them, and this script refuses a closure that
reaches one.

ROOTS is what loraplane.serving.gateway imports (tests/test_dockerfiles.py follows its imports
through loraplane's modules and checks that each third-party one comes from a root): FastAPI/Starlette
and uvicorn serve, httpx and aiohttp talk to vLLM, pydantic parses the config and the registry's
records, prometheus-client counts, filelock guards the local registry, kubernetes (and urllib3, its
transport's errors) reads LoraAdapter objects (--registry=kubernetes).
uvloop and httptools are uvicorn's fast event loop and HTTP parser, picked by uvicorn at start when
installed: the gateway has run with them in the serving image, so the slim image keeps them.

    python scripts/gateway-dists.py            # name==version, one a line
    python scripts/gateway-dists.py --files    # their installed files, relative to the venv's root
                                               # (site-packages' files and their cached bytecode;
                                               # no console scripts: the image runs `python -m`)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
    "aiohttp",
    "anyio",
    "pydantic",
    "prometheus-client",
    "filelock",
    "kubernetes",
    "urllib3",
)
# What the slim image exists to leave out.
EXCLUDED = ("torch", "vllm", "transformers")


def closure(roots: tuple[str, ...] = ROOTS) -> dict[str, md.Distribution]:
    """Canonical name -> installed distribution, for ROOTS and what they require (no extras)."""
    found: dict[str, md.Distribution] = {}
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        dist = md.distribution(name)
        found[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    heavy = sorted(set(found) & set(EXCLUDED))
    if heavy:
        raise SystemExit(f"the gateway's distributions reach {heavy}: the slim image must not have them")
    return dict(sorted(found.items()))


def installed_files(dists: dict[str, md.Distribution], venv: Path) -> list[str]:
    """Every file the distributions installed under site-packages (RECORD), with the bytecode the
    locked environment compiled for it, relative to VENV."""
    paths: set[str] = set()
    for name, dist in dists.items():
        if dist.files is None:
            raise SystemExit(f"{name} has no RECORD: cannot tell its files")
        for f in dist.files:
            path = Path(str(dist.locate_file(f))).resolve()
            try:
                rel = path.relative_to(venv)
            except ValueError as exc:
                raise SystemExit(f"{name}: {path} is outside {venv}") from exc
            if rel.parts[0] == "bin" or "__pycache__" in rel.parts or not path.is_file():
                continue
            paths.add(str(rel))
            if path.suffix == ".py":
                cached = Path(importlib.util.cache_from_source(str(path)))
                if cached.is_file():
                    paths.add(str(cached.relative_to(venv)))
    return sorted(paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", action="store_true", help="list the installed files instead of name==version")
    args = p.parse_args(argv)
    dists = closure()
    if args.files:
        lines = installed_files(dists, Path(sys.prefix).resolve())
    else:
        lines = [f"{name}=={dist.version}" for name, dist in dists.items()]
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

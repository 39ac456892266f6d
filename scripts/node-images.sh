#!/usr/bin/env bash
# Builds the real test node's two images without a registry, as OCI-layout tarballs in DIR (run by
# scripts/node-tools.sh, which caches DIR by a hash of this file and of the images' inputs):
#   pause.tar    localhost/loraplane/pause:local    the pod sandbox: tools/node/pause, static Go, uid 65535
#   busybox.tar  localhost/loraplane/busybox:local  Debian's busybox-static (sh, nc, nslookup, httpd, sleep)
# scripts/real-node.sh imports them into containerd (`ctr images import --base-name localhost/loraplane/NAME`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:?usage: node-images.sh DIR}"
TAG=local

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

# image NAME FILL CONFIG-ARGS...: an OCI layout with one layer filled by `FILL ROOTFS`, tarred to NAME.tar
image() {
  local name="$1" fill="$2" layout="$DIR/$1" bundle="$DIR/bundle-$1"
  shift 2
  umoci init --layout "$layout"
  umoci new --image "$layout:$TAG"
  umoci unpack --image "$layout:$TAG" "$bundle"
  "$fill" "$bundle/rootfs"
  umoci repack --image "$layout:$TAG" "$bundle"
  umoci config --image "$layout:$TAG" --os linux --architecture amd64 "$@"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$DIR/$name.tar.part" .
  mv "$DIR/$name.tar.part" "$DIR/$name.tar"
  rm -rf "$layout" "$bundle"
}

fill_pause() {
  (cd "$ROOT/tools/node/pause" && CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" GOTOOLCHAIN=local \
    go build -ldflags "-s -w" -o "$1/pause" .)
}

fill_busybox() {
  local root="$1" applet
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
  chmod 1777 "$root/tmp"
  install -m 0755 /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
}

image pause fill_pause --config.entrypoint /pause --config.user 65535:65535
image busybox fill_busybox --config.cmd /bin/sh --config.env PATH=/bin

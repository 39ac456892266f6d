# syntax=docker/dockerfile:1.7
# The serving image: vLLM's official OpenAI server image (CUDA) plus loraplane's serving entry point
# (python -m loraplane.serving, which rehydrates adapters from the registry and execs vLLM). The chart's
# vLLM Deployment and its helm test hook run it; the gateway runs its own slim image
# (docker/gateway.Dockerfile), though this one can still run it (python -m loraplane.serving.gateway).
#   docker build -f docker/serving.Dockerfile -t ghcr.io/loraplane/loraplane:0.1.0 .
# vLLM, torch and transformers come from the base image; loraplane's other dependencies are pinned by
# requirements/lock.txt (used as constraints), so the image gets the versions CI tested.
FROM vllm/vllm-openai:v0.32.0

ARG LORAPLANE_VERSION=0.1.0
LABEL org.opencontainers.image.title="loraplane-serving" \
      org.opencontainers.image.version="${LORAPLANE_VERSION}" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HOME=/tmp

WORKDIR /opt/loraplane
COPY requirements/lock.txt requirements/lock.txt
COPY pyproject.toml README.md __init__.py py.typed ./
COPY common common
COPY registry registry
COPY platform platform
COPY serving serving
COPY evals evals
COPY trainer trainer
# No dependency resolution against the base image's vLLM stack: only loraplane's own light deps,
# at the locked versions.
RUN python3 -m pip install --no-deps . \
 && python3 -m pip install -c requirements/lock.txt \
      kubernetes pyhelm3 httpx openai pydantic pyyaml typer rich filelock jsonschema rouge-score \
      matplotlib fastapi starlette uvicorn anyio aiohttp prometheus-client peft boto3 botocore \
 && python3 -c "import loraplane.serving.gateway, loraplane.serving.__main__"

# The chart runs `python -m ...` (vLLM, the gateway, the readiness probe, the helm test): vLLM's image
# ships python3, so make sure `python` names the same interpreter. Every pod runs as uid 10001 with a
# read-only root filesystem (/tmp is an emptyDir).
RUN (command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python) \
 && useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin loraplane
USER 10001:10001
EXPOSE 8000 8080
ENTRYPOINT []
CMD ["python3", "-m", "loraplane.serving", "--help"]

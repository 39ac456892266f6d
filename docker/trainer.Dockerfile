# syntax=docker/dockerfile:1.7
# The training image: CUDA PyTorch plus transformers, peft, trl, bitsandbytes (QLoRA) and loraplane's
# trainer (python -m loraplane.trainer, also under torchrun). The chart's training Job template runs it.
# Experiment tracking: tensorboard (event files, on by default) and the MLflow client (mlflow-skinny).
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/loraplane/loraplane-trainer:0.1.0 .
# Every Python package comes at the version requirements/lock.txt pins (constraints), so the image
# trains with what CI tested; bitsandbytes is the one GPU-only addition.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

ARG LORAPLANE_VERSION=0.1.0
ARG BITSANDBYTES_VERSION=0.50.2
LABEL org.opencontainers.image.title="loraplane-trainer" \
      org.opencontainers.image.version="${LORAPLANE_VERSION}" \
      org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
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
# torch is the base image's; everything else resolves against the lock. torchvision/torchaudio are
# removed: CI trains without them, and a build that does not match torch breaks `import transformers`.
RUN python -m pip install --no-deps . \
 && python -m pip install -c requirements/lock.txt \
      transformers peft trl datasets accelerate safetensors tokenizers numpy pydantic pyyaml httpx \
      filelock matplotlib rich typer jsonschema rouge-score kubernetes pyhelm3 openai jinja2 pyarrow \
      huggingface-hub boto3 botocore prometheus-client tensorboard mlflow-skinny \
      "bitsandbytes==${BITSANDBYTES_VERSION}" \
 && (python -m pip uninstall -y torchvision torchaudio torchcodec || true) \
 && python -c "import loraplane.trainer.train, peft, trl"

RUN useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin loraplane
USER 10001:10001
ENTRYPOINT []
CMD ["python", "-m", "loraplane.trainer", "--help"]

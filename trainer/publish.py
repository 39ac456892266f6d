"""What a published adapter directory holds besides its weights: manifest, metrics and loss curve.

``<adapters_root>/<name>/<version>/``::

    adapter_config.json          peft's LoRA config
    adapter_model.safetensors    the LoRA weights only (never the base model, never pickle)
    manifest.json                provenance: base model, dataset, config, versions, metrics, sha256
    metrics.jsonl                one line per logged step (loss, learning rate, grad norm, tokens)
    loss.png                     training (and eval) loss against the step
    tensorboard/                 TensorBoard event files (``tracking.tensorboard``, on by default;
                                 copied in by loraplane.trainer.tracking)
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from loraplane import __version__
from loraplane.common.chat_templates import default_template, template_sha256
from loraplane.common.errors import LoraplaneError
from loraplane.common.files import sha256_file
from loraplane.common.model_fetch import read_marker
from loraplane.trainer.config import TrainJobConfig

MANIFEST_SCHEMA = "loraplane.adapter-manifest/v2"
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")


def library_versions() -> dict[str, str]:
    versions = {"loraplane": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_metrics_jsonl(path: Path, log_history: list[dict[str, Any]]) -> None:
    lines = [json.dumps({k: v for k, v in entry.items()}, sort_keys=True) for entry in log_history]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_loss_plot(path: Path, log_history: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), marker=".", label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="o", linestyle="--", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean NLL per trained token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def build_manifest(
    config: TrainJobConfig,
    *,
    version: str,
    run_id: str,
    staging: Path,
    base_commit: str | None,
    base_files_sha256: str,
    data: dict[str, Any],
    metrics: dict[str, float],
    chat_template: dict[str, str] | None = None,
    base_adapter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    weights = staging / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraplaneError(
            f"peft did not write {weights.name}; refusing to publish an adapter without weights"
        )
    fetched = read_marker(Path(config.base_model.path)) or {}
    return {
        "schema": MANIFEST_SCHEMA,
        "name": config.output.name,
        "version": version,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {
            "path": config.base_model.path,
            "revision": config.base_model.revision,
            "commit": base_commit or fetched.get("revision"),
            # the hf:// or s3:// reference the directory was fetched from (loraplane.common.model_fetch)
            "source": fetched.get("source"),
            "files_sha256": base_files_sha256 or None,
            "quantization": config.base_model.quantization,
        },
        "dataset": data,
        # sft or dpo; for dpo its hyperparameters and the registered adapter it started from (or None)
        "method": config.method,
        "dpo": config.dpo.model_dump(mode="json") if config.method == "dpo" else None,
        "base_adapter": base_adapter,
        # the template the data was rendered with: registration compares it with the server's
        "chat_template": chat_template,
        "config": config.model_dump(mode="json"),
        "lora": config.lora.model_dump(mode="json"),
        "training": config.training.model_dump(mode="json"),
        "metrics": metrics,
        "weights_sha256": sha256_file(weights),
        "environment": {**library_versions(), "host": os.uname().nodename},
    }


def chat_template_record(tokenizer: Any, config: TrainJobConfig) -> dict[str, str] | None:
    """The manifest's ``chat_template``: the template the training data was rendered with (the
    tokenizer's, after ``base_model.chat_template`` replaced it), where it came from, and its sha256
    (``common/chat_templates.py``). None when the tokenizer has none (it cannot: data loading refuses)."""
    text = default_template(getattr(tokenizer, "chat_template", None))
    if text is None:
        return None
    custom = config.base_model.chat_template
    source = (
        f"base_model.chat_template ({custom})"
        if custom is not None
        else f"the tokenizer of {config.base_model.path}"
    )
    return {"source": source, "sha256": template_sha256(text), "text": text}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf

"""``loraplane data|models|volume ...``: training data, base models and the shared volume."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
import typer.core

from loraplane.platform.cli.app import (
    _duration_option,
    _output_option,
    _progress_bar,
    _settings,
    data_app,
    err,
    handled,
    models_app,
    out,
    volume_app,
)
from loraplane.platform.cli.release import _release_option


def _format_option() -> Any:
    return typer.Option(
        None,
        "--format",
        help="auto (default), chat, prompt_completion or alpaca; with --method dpo: auto, preference "
        "(prompt/chosen/rejected) or openai_preference.",
    )


def _method_option() -> Any:
    return typer.Option(
        None,
        "--method",
        help="sft (conversations) or dpo (preference pairs): the `method` of the runs that train on the "
        "data; default: dpo for a preference --format, else sft.",
    )


@data_app.command("validate")
@handled
def data_validate(
    file: Path | None = typer.Argument(None, help="Training data: JSONL (one example per line) or Parquet."),
    base_model: str = typer.Option(
        ..., "--base-model", "-m", help="Base model directory or hub id: its tokenizer and chat template."
    ),
    hub: str | None = typer.Option(None, help="Instead of FILE: a `datasets` hub id or local directory."),
    split: str | None = typer.Option(None, help="Split of --hub (default: train)."),
    eval_file: Path | None = typer.Option(None, help="Held-out file in the same format."),
    eval_split: str | None = typer.Option(None, help="Held-out split of --hub."),
    eval_fraction: float | None = typer.Option(None, help="Or hold out this share of the rows (seeded)."),
    chat_template: Path | None = typer.Option(
        None, help="Jinja chat template file (for a base model without one, or to replace its own)."
    ),
    revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the base model's own tokenizer code."
    ),
    max_seq_length: int | None = typer.Option(None, help="Longest row in tokens (default: 1024)."),
    data_format: str | None = _format_option(),
    method: str | None = _method_option(),
    min_examples: int | None = typer.Option(None, help="Fewest usable training rows (default: 10)."),
    max_overlength_share: float | None = typer.Option(
        None, help="Share of over-length rows that may be dropped (default: 0)."
    ),
    all_tokens: bool = typer.Option(
        False, "--all-tokens", help="Train on every token, not only the assistant's replies."
    ),
    seed: int | None = typer.Option(None, help="Seed of the --eval-fraction hold-out (default: 0)."),
    output: str = _output_option(),
) -> None:
    """Run the trainer's data checks on a dataset without training: a report of every problem by class
    with line numbers, token lengths and tokens per epoch. Exits 2 when the data is not usable; writes
    nothing.

    \b
    Example:
      loraplane data validate train.jsonl -m ./base-model --max-seq-length 2048
    """

    import json

    from pydantic import BaseModel, ValidationError

    from loraplane.common.errors import format_validation_error
    from loraplane.common.jsonl import DatasetError
    from loraplane.trainer.config import BaseModelSpec, DatasetSpec, TrainingSpec
    from loraplane.trainer.data import load_tokenizer, validate_dataset
    from loraplane.trainer.preference_data import data_method

    chosen_method = data_method(method, data_format)

    def given(**values: Any) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v is not None}

    def build(model: type[BaseModel], section: str, values: dict[str, Any]) -> Any:
        try:
            return model.model_validate(values)
        except ValidationError as exc:
            raise format_validation_error(exc, source=f"the {section} options") from None

    dataset = build(
        DatasetSpec,
        "dataset",
        given(
            path=file,
            hub=hub,
            split=split,
            eval_path=eval_file,
            eval_split=eval_split,
            eval_fraction=eval_fraction,
            format=data_format,
            min_examples=min_examples,
            max_overlength_share=max_overlength_share,
        ),
    )
    model_spec = build(
        BaseModelSpec,
        "base model",
        given(
            path=base_model,
            revision=revision,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
        ),
    )
    training = build(
        TrainingSpec,
        "training",
        given(max_seq_length=max_seq_length, seed=seed, assistant_only_loss=not all_tokens),
    )
    prepared = validate_dataset(
        dataset,
        load_tokenizer(model_spec),
        max_seq_length=training.max_seq_length,
        assistant_only_loss=training.assistant_only_loss,
        seed=training.seed,
        method=chosen_method,
    )
    if output == "json":
        sys.stdout.write(json.dumps(prepared.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(prepared.to_text() + "\n")
    sys.stdout.flush()
    reasons = prepared.failures()
    if reasons:
        raise DatasetError(
            "the dataset is not usable for training:\n" + "\n".join(f"  - {r}" for r in reasons),
            hint="fix the rows the report lists, or change the limits (--max-seq-length, "
            "--max-overlength-share, --min-examples)",
        )


@data_app.command("push")
@handled
def data_push(
    file: Path = typer.Argument(..., help="Training data: JSONL (one example per line) or Parquet."),
    base_model: str = typer.Option(
        ..., "--base-model", "-m", help="Base model directory or hub id: its tokenizer and chat template."
    ),
    name: str | None = typer.Option(None, help="Dataset name (default: from the file name)."),
    release: str = _release_option(),
    max_seq_length: int = typer.Option(1024, help="Longest row in tokens, as in the run's config."),
    data_format: str | None = _format_option(),
    method: str | None = _method_option(),
    revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    chat_template: Path | None = typer.Option(
        None, help="Jinja chat template file (as in the run's config)."
    ),
    timeout: float = _duration_option("30m", "Longest the upload may take."),
    output: str = _output_option(),
) -> None:
    """Check FILE with the trainer's own checks, then put it on the release's shared volume at
    datasets/NAME/sha256-DIGEST.jsonl: the path names its content, so a run's config (and the
    adapter's manifest) says exactly what it trained on. Bad data exits 2 and uploads nothing; the same
    content pushed again is found there. The newest push of NAME is recorded (a ConfigMap
    loraplane-dataset-NAME): `dataset: {pushed: NAME}` in a run's config is replaced by its path when
    `train submit` creates the Job.

    \b
    Examples:
      loraplane -n ml data push train.jsonl -m ./base-model --name support
      # then in train.yaml: dataset: {pushed: support}  (train submit names the exact file)
      loraplane -n ml data push prefs.jsonl -m ./base-model --name support-prefs --method dpo
      # preference pairs, for runs with method: dpo
    """

    from loraplane.platform.data_push import push_dataset

    with _progress_bar(f"uploading {file.name}") as progress:
        result = push_dataset(
            _settings(),
            file,
            base_model=base_model,
            name=name,
            release=release,
            max_seq_length=max_seq_length,
            data_format=data_format,
            method=method,
            revision=revision,
            chat_template=chat_template,
            timeout=timeout,
            on_progress=progress,
        )
    if output == "json":
        out.print_json(json.dumps(result.to_dict()))
        return
    verb = "pushed" if result.uploaded else "already on the volume:"
    what = "usable preference pairs" if result.method == "dpo" else "usable rows"
    out.print(f"{verb} {file} ({result.rows} {what}) as {result.name}", highlight=False)
    out.print(f"  path:   {result.path}\n  sha256: {result.sha256}", highlight=False)
    out.print(
        f"  in train.yaml: dataset: {{pushed: {result.name}}}  (the newest push; or {{path: {result.path}}})",
        highlight=False,
    )


@models_app.command("pull")
@handled
def models_pull(
    model: str = typer.Argument(..., help="hf://ORG/NAME@REVISION or s3://BUCKET/PREFIX."),
    release: str = _release_option(),
    local: bool = typer.Option(
        False, "--local", help="Fetch onto this machine ($LORAPLANE_MODELS_ROOT or ~/.loraplane/models)."
    ),
    hf_token_secret: str | None = typer.Option(
        None, help="Kubernetes Secret with a hub token (key: --hf-token-key), for gated or private models."
    ),
    hf_token_key: str = typer.Option("token", help="Key of the token in --hf-token-secret."),
    s3_secret: str | None = typer.Option(
        None, help="Kubernetes Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, for s3:// models."
    ),
    s3_endpoint: str | None = typer.Option(
        None, help="S3 API endpoint for storage other than AWS (MinIO, R2)."
    ),
    hf_endpoint: str | None = typer.Option(
        None, help="Hugging Face hub endpoint (a mirror; default: HF_ENDPOINT here, else huggingface.co)."
    ),
    timeout: float = _duration_option(
        "6h", "Longest the fetch may take (running again keeps the files already downloaded)."
    ),
    output: str = _output_option(),
) -> None:
    """Fetch a base model once onto the release's shared volume, into models/NAME@REVISION/ (the
    directory an hf:// serving.model or base_model.path resolves to): staged, resumable, renamed into
    place when whole, with progress. A wrong id, a missing token or a denied bucket exits 2 naming the
    value to fix. Tokens come from Kubernetes Secrets you name, never from the command line.

    \b
    Examples:
      loraplane -n ml models pull hf://Qwen/Qwen2.5-0.5B-Instruct@main
      loraplane -n ml models pull hf://meta-llama/Llama-3.1-8B-Instruct --hf-token-secret hf-token
      loraplane models pull s3://models/llama-8b --local
    """

    from loraplane.platform.models_pull import pull_local, pull_to_volume
    from loraplane.platform.volume import PodSecrets

    def say(line: str) -> None:
        if output != "json":
            err.print(line, highlight=False)

    settings = _settings()
    if local or settings.registry != "kubernetes":
        result = pull_local(model, say=say)
    else:
        secrets = PodSecrets(hf_token_secret, hf_token_key, s3_secret, s3_endpoint)
        endpoint = hf_endpoint or os.environ.get("HF_ENDPOINT")
        result = pull_to_volume(
            settings,
            model,
            release=release,
            secrets=secrets,
            timeout=timeout,
            say=say,
            hf_endpoint=endpoint,
        )
    if output == "json":
        out.print_json(json.dumps(result.to_dict()))
        return
    verb = "fetched" if result.fetched else "already there:"
    out.print(
        f"{verb} {result.source} at {result.path} ({result.files} files, {result.bytes} bytes)",
        highlight=False,
    )
    out.print(
        f"  serving.model / base_model.path: {result.source}  (or the directory itself)", highlight=False
    )


@volume_app.command("put")
@handled
def volume_put(
    local: Path = typer.Argument(..., help="A local file or directory (a base model, a dataset)."),
    dest: str = typer.Argument(..., help="Where it goes on the volume, relative to its root: models/base."),
    release: str = _release_option(),
    replace: bool = typer.Option(False, "--replace", help="Swap an existing DEST for the upload."),
    timeout: float = _duration_option("30m", "Longest the upload may take."),
    output: str = _output_option(),
) -> None:
    """Copy a file or directory onto the release's shared volume (where vLLM and the trainer read).

    A short-lived pod (Pod Security restricted) mounts the volume; the upload streams through
    `kubectl exec`, lands in a staging directory, is checked (sha256) and renamed into place: a broken
    upload leaves nothing at DEST. Pods see it under the volume's mount path (/data/DEST).

    \b
    Examples:
      loraplane demo build-model ./demo-model && loraplane -n ml volume put ./demo-model models/base
      loraplane -n ml volume put ./train.jsonl datasets/support/train.jsonl
    """

    from loraplane.platform.volume import put

    with _progress_bar(f"uploading {local.name}") as progress:
        result = put(
            _settings(),
            local,
            dest,
            release=release,
            replace=replace,
            timeout=timeout,
            on_progress=progress,
        )
    if output == "json":
        out.print_json(json.dumps(result.to_dict()))
        return
    out.print(
        f"put {local} at {result.mount_path}/{result.path}: {result.files} file(s), {result.bytes} bytes "
        f"in {result.seconds:.1f}s (sha256 {result.sha256[:12]})",
        highlight=False,
    )

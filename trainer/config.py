"""The training job's configuration: one pydantic model, from a YAML file plus ``key=value`` overrides.

Every value is checked here, before any model or dataset is loaded, and an invalid one is reported
with its dotted field name, the value given and what to change.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplane.common.adapter_dir import VLLM_LORA_RANKS
from loraplane.common.errors import ConfigError, format_validation_error

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a DNS label: usable in Kubernetes names too
VERSION_PATTERN = r"^v[0-9]{1,6}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelSpec(_Strict):
    path: str = Field(description="Local directory or Hugging Face hub id of the base model.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    quantization: Literal["none", "nf4", "fp4"] = Field(
        default="none",
        description="QLoRA: load the frozen base model in 4 bits with bitsandbytes (CUDA only).",
    )
    chat_template: Path | None = Field(
        default=None,
        description="Jinja chat template file, for a base model whose tokenizer has none.",
    )

    @field_validator("path")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a local directory or a hub id such as 'meta-llama/Llama-3.2-1B'")
        return v


DATA_SUFFIXES = (".jsonl", ".parquet")


class DatasetSpec(_Strict):
    path: Path | None = Field(
        default=None,
        description="Training data file: JSONL (one example per line) or Parquet (one example per row).",
    )
    hub: str | None = Field(default=None, description="Or a `datasets` hub name, e.g. 'org/my-chats'.")
    url: str | None = Field(
        default=None,
        description="Or an object in object storage, s3://BUCKET/KEY.jsonl (read with the pod's AWS_* "
        "credentials); the trainer downloads it next to its run and records its sha256 like a file's.",
    )
    pushed: str | None = Field(
        default=None,
        description="Or the name a file was given by `loraplane data push` (cluster runs): `train submit` "
        "replaces it by the newest pushed file's content-addressed path.",
    )
    split: str = Field(default="train", description="Split of the hub dataset to train on.")
    eval_path: Path | None = Field(default=None, description="Optional held-out file in the same format.")
    eval_split: str | None = Field(default=None, description="Held-out split of the hub dataset.")
    eval_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        default=0.0, description="Or hold out this share of the training rows (seeded) for evaluation."
    )
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "preference", "openai_preference"] = Field(
        default="auto",
        description="Row format; 'auto' recognises each row by its keys (messages / prompt / instruction; "
        "for method: dpo, prompt + chosen + rejected / input + preferred_output + non_preferred_output).",
    )
    min_examples: Annotated[int, Field(ge=1)] = Field(
        default=10, description="Fewer usable training examples than this fails the run (OpenAI's minimum)."
    )
    max_overlength_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0,
        description="Share of rows longer than training.max_seq_length that may be dropped (and reported) "
        "instead of failing the run. Rows are never truncated: that would cut off answers.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(v is not None for v in (self.path, self.hub, self.url, self.pushed)) != 1:
            raise ValueError(
                "give exactly one of dataset.path (a JSONL/Parquet file), dataset.hub, dataset.url or "
                "dataset.pushed"
            )
        if self.url is not None and (
            not self.url.startswith("s3://") or not self.url.lower().endswith(DATA_SUFFIXES)
        ):
            raise ValueError(
                f"dataset.url: {self.url!r} is not an s3:// object ending in .jsonl or .parquet "
                "(a hub dataset is dataset.hub: ORG/NAME)"
            )
        for field, value in (("path", self.path), ("eval_path", self.eval_path)):
            if value is not None and value.suffix.lower() not in DATA_SUFFIXES:
                raise ValueError(
                    f"dataset.{field}: {str(value)!r} is neither .jsonl nor .parquet; "
                    "convert it or rename it to its real format"
                )
        held_out = [
            n for n, v in (("eval_path", self.eval_path), ("eval_split", self.eval_split)) if v is not None
        ]
        if self.eval_fraction > 0:
            held_out.append("eval_fraction")
        if len(held_out) > 1:
            raise ValueError(f"dataset: choose one held-out set, not {' and '.join(held_out)}")
        if self.eval_split is not None and self.hub is None:
            raise ValueError("dataset.eval_split needs dataset.hub; for a local file use dataset.eval_path")
        return self


class LoraSpec(_Strict):
    r: Annotated[int, Field(ge=1, le=512)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False

    @field_validator("r")
    @classmethod
    def _servable_rank(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            up = next(x for x in VLLM_LORA_RANKS if x >= v)
            raise ValueError(f"vLLM serves only ranks {list(VLLM_LORA_RANKS)}; use r={up}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("list at least one module (e.g. [q_proj, v_proj]) or use 'all-linear'")
        return v


class TrainingSpec(_Strict):
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=-1)] = -1
    batch_size: Annotated[int, Field(ge=1)] = 8
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    max_seq_length: Annotated[int, Field(ge=16)] = 1024
    batching: Literal["grouped", "padded", "packed"] = Field(
        default="grouped",
        description="grouped: batches of similar-length examples, padded to the longest (least padding, "
        "any attention kernel); padded: random batches padded to the longest (plain HF); packed: "
        "best-fit-decreasing packing into max_seq_length rows, padding-free, sequence boundaries kept "
        "by position ids (fastest with FlashAttention on GPUs).",
    )
    gradient_checkpointing: bool = False
    assistant_only_loss: bool = True
    seed: int = 0
    logging_steps: Annotated[int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _steps(self) -> TrainingSpec:
        if self.max_steps == 0:
            raise ValueError(
                "training.max_steps: 0 trains nothing; use -1 (train for 'epochs') or a positive number"
            )
        return self


class CheckpointSpec(_Strict):
    every_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Save a checkpoint every N optimizer steps (none: only when preempted).",
    )
    keep_last: Annotated[int, Field(ge=1)] = Field(
        default=2, description="Complete checkpoints kept; the one a run resumed from is never deleted."
    )
    resume: Literal["auto", "never"] = Field(
        default="auto",
        description="auto: continue from the newest complete checkpoint in the run directory; "
        "never: refuse to start when the run directory holds checkpoints.",
    )


class DistributedSpec(_Strict):
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Under torchrun: DDP (CPU or GPU) or FSDP (GPUs only). Ignored for one process.",
    )


class OutputSpec(_Strict):
    adapters_root: Path = Field(
        description="Directory under which adapters are published as <name>/<version>/."
    )
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        description="Adapter name: lowercase letters, digits and '-', at most 63 characters."
    )
    version: Annotated[str, Field(pattern=VERSION_PATTERN)] | None = Field(
        default=None, description="Version to publish (v1, v2, ...). Default: the next free one."
    )
    run_dir: Path | None = Field(
        default=None,
        description="Checkpoints, metrics and the run's state (default: <adapters_root>/../runs/<name>). "
        "A restarted job resumes from it, so put it on the same persistent volume.",
    )

    @property
    def resolved_run_dir(self) -> Path:
        return self.run_dir or self.adapters_root.parent / "runs" / self.name


PREFERENCE_FORMATS = ("preference", "openai_preference")
ADAPTER_REF_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?@v[0-9]{1,6}$"


class DpoSpec(_Strict):
    """Direct Preference Optimization (trl's DPOTrainer); used when ``method`` is ``dpo``."""

    beta: Annotated[float, Field(gt=0, le=10)] = Field(
        default=0.1,
        description="How far the tuned model may move from the reference (the SFT adapter, or the base "
        "model): higher stays closer. 0.1 is the DPO paper's default.",
    )
    # trl's loss types that need nothing but preference pairs (no extra settings, no reward model).
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"
    ] = Field(default="sigmoid", description="trl's loss: sigmoid is the DPO paper's loss; ipo is IPO.")
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        default=0.0, description="Assumed share of flipped preference labels (robust / cDPO losses)."
    )


MLFLOW_URI_HINT = (
    "use the tracking server's http(s)://HOST:PORT (e.g. http://mlflow.ml.svc:5000), 'databricks' "
    "(or databricks://PROFILE), or sqlite:////ABSOLUTE/PATH.db for a local store"
)
# MLflow's own tag/param key characters; its system tags (mlflow.*) and ours (loraplane.*) are reserved.
TAG_KEY_PATTERN = re.compile(r"^[0-9A-Za-z_\-. /:]{1,250}$")
WANDB_FORBIDDEN = set("/\\#?%:")


class MlflowSpec(_Strict):
    """Log the run to an MLflow tracking server (transformers' MLflowCallback), eval results too."""

    uri: str = Field(
        description="Tracking URI: http(s)://HOST:PORT of an `mlflow server`, 'databricks' / "
        "databricks://PROFILE, or sqlite:////ABSOLUTE/PATH.db. Credentials come from MLflow's own "
        "environment variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never the URI.",
    )
    experiment: str | None = Field(
        default=None,
        description="Experiment name (created when missing). Default: the adapter's name (output.name).",
    )
    run_name: str | None = Field(default=None, description="Run name. Default: NAME@VERSION.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags set on the run.")

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, v: str) -> str:
        if re.match(r"^[A-Za-z0-9.-]+:[0-9]+(/.*)?$", v.strip()):
            raise ValueError(f"the URI has no scheme; use http://{v.strip()} (or https://)")
        parsed = urlsplit(v.strip())
        scheme = parsed.scheme.lower()
        if scheme in ("http", "https"):
            if not parsed.hostname:
                raise ValueError(f"no host in the URI; {MLFLOW_URI_HINT}")
            if parsed.username or parsed.password:
                raise ValueError(
                    "credentials in the URI would be written into the config and the manifest; remove them "
                    "and set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in "
                    "the trainer's environment"
                )
            try:
                _ = parsed.port
            except ValueError:
                raise ValueError(f"the port is not a number; {MLFLOW_URI_HINT}") from None
            return v.strip().rstrip("/")
        if scheme == "databricks" or v.strip() == "databricks":
            return v.strip()
        if scheme == "sqlite":
            if not v.startswith("sqlite:////"):
                raise ValueError(
                    "a relative sqlite path depends on the trainer's working directory; "
                    "use sqlite:////ABSOLUTE/PATH.db"
                )
            return v
        if scheme == "file" or (not scheme and v.strip()):
            raise ValueError(
                "MLflow's file store is deprecated and a bare path is not a tracking URI; " + MLFLOW_URI_HINT
            )
        raise ValueError(f"unsupported tracking URI scheme {scheme or '(none)'!r}; {MLFLOW_URI_HINT}")

    @field_validator("experiment", "run_name")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty; remove it to get the default")
        return v

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not TAG_KEY_PATTERN.match(key):
                raise ValueError(
                    f"tag {key!r}: use letters, digits, '_', '-', '.', ' ', '/' or ':' (at most 250)"
                )
            if key.startswith(("mlflow.", "loraplane.")):
                raise ValueError(f"tag {key!r}: the prefixes 'mlflow.' and 'loraplane.' are reserved")
        return v


class WandbSpec(_Strict):
    """Log the run to Weights & Biases (transformers' WandbCallback). Needs `pip install wandb` and the
    W&B credentials (WANDB_API_KEY) in the trainer's environment; not covered by loraplane's tests."""

    project: str = Field(description="W&B project.")
    entity: str | None = Field(default=None, description="W&B team or user (default: the key's).")
    run_name: str | None = Field(default=None, description="Run name. Default: NAME@VERSION.")
    tags: list[str] = Field(default_factory=list, description="Tags set on the run.")

    @field_validator("project")
    @classmethod
    def _project_name(cls, v: str) -> str:
        bad = sorted(WANDB_FORBIDDEN & set(v))
        if not v.strip() or len(v) > 128 or bad:
            raise ValueError(
                "a W&B project name is 1-128 characters without / \\ # ? % : "
                + (f"(found {' '.join(bad)})" if bad else "")
            )
        return v


class TrackingSpec(_Strict):
    """Experiment tracking through the Trainer's own integrations (transformers' report_to)."""

    tensorboard: bool = Field(
        default=True,
        description="Write TensorBoard event files (loss, learning rate, grad norm, eval loss per step); "
        "published with the adapter as <version>/tensorboard/.",
    )
    mlflow: MlflowSpec | None = Field(
        default=None, description="Log params, per-step metrics and the result to this MLflow server."
    )
    wandb: WandbSpec | None = Field(default=None, description="Log to Weights & Biases (untested).")

    def report_to(self) -> list[str]:
        """transformers' ``report_to`` for these settings."""
        chosen = [("tensorboard", self.tensorboard), ("mlflow", self.mlflow), ("wandb", self.wandb)]
        return [name for name, wanted in chosen if wanted]


class TrainJobConfig(_Strict):
    method: Literal["sft", "dpo"] = Field(
        default="sft",
        description="sft: supervised fine-tuning on conversations; dpo: preference tuning on "
        "chosen/rejected pairs (trl's DPOTrainer).",
    )
    base_model: BaseModelSpec
    base_adapter: Annotated[str, Field(pattern=ADAPTER_REF_PATTERN)] | None = Field(
        default=None,
        description="method: dpo only: start from this registered adapter version (NAME@vN, e.g. an SFT "
        "adapter); it is also the DPO reference model. Its LoRA shape is used.",
    )
    dataset: DatasetSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    dpo: DpoSpec = DpoSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    distributed: DistributedSpec = DistributedSpec()
    tracking: TrackingSpec = TrackingSpec()
    output: OutputSpec

    @field_validator("base_adapter", mode="before")
    @classmethod
    def _adapter_ref(cls, v: Any) -> Any:
        if isinstance(v, str) and "@v" not in v:
            raise ValueError(
                "name an exact registered version, NAME@vN (e.g. support-bot@v3): an alias or a bare name "
                "could point at another version when the run resumes"
            )
        return v

    @model_validator(mode="after")
    def _method_settings(self) -> TrainJobConfig:
        fmt = self.dataset.format
        if self.method == "sft":
            if fmt in PREFERENCE_FORMATS:
                raise ValueError(
                    f"dataset.format: {fmt!r} is preference data; set method: dpo to train on it"
                )
            if "dpo" in self.model_fields_set:
                raise ValueError("dpo: these settings apply to method: dpo; set method: dpo or remove them")
            if self.base_adapter is not None:
                raise ValueError(
                    f"base_adapter: {self.base_adapter!r} is supported with method: dpo only; "
                    "remove it or set method: dpo"
                )
            return self
        if fmt not in ("auto", *PREFERENCE_FORMATS):
            raise ValueError(
                f"dataset.format: {fmt!r} is supervised data; method: dpo needs preference pairs: use "
                "auto, preference (prompt/chosen/rejected) or openai_preference"
            )
        if self.training.batching == "packed":
            raise ValueError(
                "training.batching: 'packed' is not available with method: dpo (each pair is two sequences "
                "trained together); use grouped or padded"
            )
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}={raw}: {key} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> TrainJobConfig:
    """Read a YAML file, apply ``section.key=value`` overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    source = "command-line overrides"
    if path is not None:
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
        base = path.parent
        # Relative paths in a config file are relative to the file, not to the current directory.
        for section, key in (
            ("dataset", "path"),
            ("dataset", "eval_path"),
            ("base_model", "chat_template"),
            ("output", "adapters_root"),
            ("output", "run_dir"),
            ("base_model", "path"),
        ):
            value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                candidate = base / value
                if key != "path" or section != "base_model" or candidate.exists():
                    data[section][key] = str(candidate)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. training.epochs=3")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw.strip())
    try:
        return TrainJobConfig.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source=source) from None

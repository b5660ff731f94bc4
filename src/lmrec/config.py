"""Typed run configuration: defaults < YAML file < ``key.sub=value`` overrides.

Unknown keys are errors (with the key path and the file), never silently ignored. The resolved config is
written to the run directory as ``run_config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmrec.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    path: str | None = None  # a prepared dataset directory; None = prepare ml-100k under the run directory
    split: Literal["loo", "cold"] = "loo"  # used when lmrec prepares ml-100k itself
    max_history_len: int = 50


class ModelConfig(_Strict):
    """Defaults: the embedded default backbone on a small catalog (the quickstart). For a pretrained
    Longformer, the ``recformer`` preset restores the paper's settings (CLS pooling, lr 5e-5, ...)."""

    backbone: str | None = None  # local checkpoint directory; None = $LMREC_BACKBONE, else the embedded default
    init: str | None = None  # a saved recommender (or pretraining checkpoint) to start from
    max_token_num: int = 32  # the newest ≈2–3 items; longer windows measured worse on ml-100k
    max_attr_num: int = 3
    max_attr_length: int = 16
    attention_window: int | list[int] = 64
    temperature: float = 0.05
    user_projection: bool = False  # a linear map on user vectors only (identity at init); off in RecFormer
    pooler_type: Literal["cls", "mean"] = "mean"  # RecFormer uses "cls" (see the "recformer" preset)
    # the embedded default backbone (used when no backbone is given): a small random-init Longformer
    default_hidden_size: int = 128
    default_layers: int = 2
    default_heads: int = 2
    default_vocab_size: int = 8000


class _TrainCommon(_Strict):
    """What every training command shares: optimizer details, seed, precision, checkpoints and resume."""

    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 42
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    save_steps: int = 0  # also checkpoint every N optimizer steps (always at the end of each epoch)
    save_total_limit: int = 2  # checkpoints kept per stage under <output_dir>/checkpoints/
    resume_from: str | None = None  # "auto" (latest checkpoint of output_dir), a run dir or a checkpoint dir


class TrainConfig(_TrainCommon):
    batch_size: int = 256
    samples_per_user: int = 2  # (prefix → next item) samples per user per epoch; RecFormer draws 1
    lr: float = 1.5e-3
    stage1_epochs: int = 30
    stage2_epochs: int = 5
    eval_every: int = 1
    patience: int = 6
    stage2_patience: int = 2
    stage2_lr: float | None = None  # None = lr / 2
    item_batch_size: int = 256
    # How the item side learns in stage 1. "none": only through the table re-encoded before each epoch
    # (RecFormer's finetuning exactly). "batch": plus an in-batch contrastive term on the batch's target
    # items encoded with gradient. "all": the whole catalog is encoded with gradient at every step (full
    # softmax end to end; small catalogs only). A random-init backbone needs "batch" or "all".
    item_grad: Literal["none", "batch", "all"] = "all"


class EvalConfig(_Strict):
    ks: list[int] = [10, 20, 50]
    batch_size: int = 64
    exclude_history: bool = False
    chunk_size: int = 65536
    metric: str = "ndcg@10"  # early-stopping metric


class RunConfig(_Strict):
    output_dir: str = "runs/recformer"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


class GenDataConfig(_Strict):
    """Defaults measured with the embedded tiny Qwen3 on ml-100k (valid NDCG@10 after 2 epochs: 0.0405 with
    3 history items × all positions, no alignment, vs 0.0225 best with 10 items × 5 positions + alignment)."""

    max_history: int = 3  # items of history in a prompt
    targets_per_user: int = 50  # next-item samples per user: the last positions of the training sequence
    with_titles: bool = False  # history items as "<sid> title" instead of the semantic ID alone
    alignment: bool = False  # add sid→title and title→sid samples
    max_length: int = 512


class GenTrainConfig(_TrainCommon):
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    patience: int = 3
    lora: bool = False  # peft LoRA (stage 2 / sft); the new token rows stay trainable
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"


class GenEvalConfig(_Strict):
    beams: int = 50  # items beyond the beam count rank as misses
    ks: list[int] = [10, 20, 50]
    batch_size: int = 32
    metric: str = "ndcg@10"


class GenRunConfig(_Strict):
    output_dir: str = "runs/generative"
    data: GenDataConfig = GenDataConfig()
    train: GenTrainConfig = GenTrainConfig()
    eval: GenEvalConfig = GenEvalConfig()


class PretrainDataConfig(_Strict):
    paths: list[str] = []  # prepared datasets forming the corpus (several domains)
    valid: str | None = None  # prepared dataset for validation (zero-shot ranking); None = the first corpus one
    valid_users: int = 1000  # validation users (the first N of the valid split)
    max_history_len: int = 50


class PretrainModelConfig(ModelConfig):
    mlm_weight: float = 0.1  # loss = contrastive + mlm_weight × (MLM on the history + MLM on the target item)
    mlm_probability: float = 0.15  # share of words masked (whole-word masking)
    freeze_word_embeddings: bool = False


class PretrainTrainConfig(_TrainCommon):
    batch_size: int = 64
    pairs_per_user: int = 1  # (history → target from the second half) pairs per user sequence per epoch
    lr: float = 1e-3
    epochs: int = 10
    eval_every: int = 1
    patience: int | None = None
    item_batch_size: int = 256


class PretrainRunConfig(_Strict):
    output_dir: str = "runs/pretrain"
    data: PretrainDataConfig = PretrainDataConfig()
    model: PretrainModelConfig = PretrainModelConfig()
    train: PretrainTrainConfig = PretrainTrainConfig()
    eval: EvalConfig = EvalConfig()


class MlmTrainConfig(_TrainCommon):
    """``lmrec backbone pretrain-mlm``: continued MLM pretraining on a raw text corpus."""

    max_length: int = 128  # tokens per chunk (documents longer than this are cut into chunks)
    mlm_probability: float = 0.15
    batch_size: int = 32
    lr: float = 5e-4
    epochs: int = 3
    patience: int | None = None
    attention_window: int | list[int] | None = None  # None = the backbone's


class MlmRunConfig(_Strict):
    output_dir: str = "runs/pretrain-mlm"
    train: MlmTrainConfig = MlmTrainConfig()


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


PRESETS = Path(__file__).parent / "presets"


def preset_path(name: str) -> Path | None:
    """``"quickstart"`` → the packaged ``presets/quickstart.yaml`` (None if there is no such preset)."""
    p = PRESETS / f"{name}.yaml"
    return p if "/" not in name and p.exists() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema=RunConfig):
    """Build a :class:`RunConfig` from an optional YAML file (or a preset name such as ``quickstart``) and
    ``key.sub=value`` overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = preset_path(str(path)) or Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for ov in overrides or []:
        key, sep, raw = ov.partition("=")
        if not sep:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        _set(tree, key.strip(), yaml.safe_load(raw))
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"invalid configuration ({source} and overrides):\n" + "\n".join(lines)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True))

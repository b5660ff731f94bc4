"""Typed run configuration: defaults < YAML file < ``key.sub=value`` overrides.

Unknown keys are errors (with the key path and the file), never silently ignored. The resolved config is
written to the run directory as ``run_config.yaml``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmrec.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# value bounds, checked at load time with the key path
Count = Annotated[int, Field(ge=1)]  # batch sizes, epochs that must run, k, beams ...
NonNegInt = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(gt=0)]  # learning rates, temperatures
Share = Annotated[float, Field(ge=0, lt=1)]  # warmup ratio, dropout
Probability = Annotated[float, Field(gt=0, lt=1)]
Patience = Annotated[int, Field(ge=1)] | None
AttentionImpl = Literal["auto", "sdpa", "blocked", "flex", "longformer"]  # implemented in lmrec.recformer.attention
# a causal LM's attention (lmrec.training.attention): auto = varlen for packed training on CUDA in bf16, else sdpa
LmAttention = Literal["auto", "varlen", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"]
METRIC = re.compile(r"^(recall|ndcg|mrr)@(\d+)$")


class _Ranking(_Strict):
    """Cut-offs and the early-stopping metric, which must be one that the cut-offs produce."""

    ks: list[Count] = Field([10, 20, 50], min_length=1)  # cut-offs K of recall@K, ndcg@K, mrr@K
    metric: str = "ndcg@10"  # early-stopping metric: recall@K, ndcg@K, mrr@K (K in ks) or mrr

    @model_validator(mode="after")
    def _metric_from_ks(self):
        m = METRIC.match(self.metric)
        if self.metric != "mrr" and (m is None or int(m.group(2)) not in self.ks):
            made = ", ".join([f"{n}@{k}" for k in self.ks for n in ("recall", "ndcg", "mrr")] + ["mrr"])
            raise ValueError(f"metric {self.metric!r} is not computed with ks={self.ks} (expected one of {made})")
        return self


class DataConfig(_Strict):
    path: str | None = None  # a prepared dataset directory; None = prepare ml-100k under the run directory
    split: Literal["loo", "cold"] = "loo"  # used when lmrec prepares ml-100k itself
    max_history_len: Count = 50  # newest items of a history the model sees


class ModelConfig(_Strict):
    """Defaults: the embedded default backbone on a small catalog (the quickstart). For a pretrained
    Longformer, the ``recformer`` preset restores the paper's settings (CLS pooling, lr 5e-5, ...)."""

    backbone: str | None = None  # local checkpoint directory; None = $LMREC_BACKBONE, else the embedded default
    init: str | None = None  # a saved recommender (or pretraining checkpoint) to start from
    max_token_num: Count = 64  # tokens of history: the newest ≈5 items (64 validated above 32 on 3 seeds)
    max_attr_num: Count = 3  # attributes per item, in the item's order (title, brand, ...)
    max_attr_length: Count = 16  # tokens per attribute value (longer values are cut)
    # None = the backbone's own (e.g. 512 after `backbone convert-to-long --attention-window 512`; 64 for the
    # embedded default and for backbones without one); a value replaces it, and the run says so
    attention_window: Count | list[Count] | None = None
    # how the attention is computed (same function, same weights): auto = dense SDPA on short inputs, the
    # linear-memory blocked kernel on long ones; sdpa; blocked; longformer = HF's kernels. Applies to a
    # saved model given as init too.
    attention_impl: AttentionImpl = "auto"
    # softmax temperature of the user-item cosine similarity: 0.1 validated above 0.05 and 0.2 in each of three
    # seeds on the embedded default backbone (0.03: above in one; docs/baselines.md); RecFormer's 0.05 is in the
    # "recformer" preset
    temperature: Rate = 0.1
    user_projection: bool = False  # a linear map on user vectors only (identity at init); off in RecFormer
    pooler_type: Literal["cls", "mean"] = "mean"  # RecFormer uses "cls" (see the "recformer" preset)
    # the embedded default backbone (used when no backbone is given): a small random-init Longformer
    default_hidden_size: Count = 128
    default_layers: Count = 2  # layers of the embedded default backbone
    default_heads: Count = 2  # attention heads of the embedded default backbone
    default_vocab_size: Count = 8000  # the embedded default's tokenizer size (trained on the items' text)
    default_dropout: Share = 0.1  # the embedded default's hidden and attention dropout

    def ignored_with_saved_init(self) -> list[str]:
        """The settings a saved recommender as ``init`` overrides (its architecture is fixed): those set to
        a value other than the saved model's (or, for backbone settings, other than the default)."""
        if self.init is None or not (Path(self.init) / "items.parquet").exists():
            return []
        try:
            saved = json.loads((Path(self.init) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return []
        out = []
        for key in sorted(self.model_fields_set - {"init", "attention_impl"}):
            value, default = getattr(self, key), type(self).model_fields[key].default
            if key in saved:
                window = saved[key] if key != "attention_window" or isinstance(value, list) else saved[key][0]
                if value != window:
                    out.append(f"model.{key}={value!r} (the saved model has {window!r})")
            elif value != default:
                out.append(f"model.{key}={value!r}")
        return out


class _TrainCommon(_Strict):
    """What every training command shares: optimizer details, seed, precision, checkpoints and resume."""

    weight_decay: Annotated[float, Field(ge=0)] = 0.01  # AdamW weight decay
    warmup_ratio: Share = 0.05  # share of the optimizer steps with a linear warmup
    grad_accum: Count = 1  # batches whose gradients are summed per optimizer step
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # 0 = no clipping
    seed: int = 42  # seeds every draw of the run (initialisation, sampling, shuffling, dropout)
    # auto = bf16 on an accelerator that supports it, else fp32; weights stay fp32
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    save_steps: NonNegInt = 0  # also checkpoint every N optimizer steps (always at the end of each epoch)
    save_total_limit: Count = 2  # checkpoints kept per stage under <output_dir>/checkpoints/
    resume_from: str | None = None  # "auto" (latest checkpoint of output_dir), a run dir or a checkpoint dir
    overwrite: bool = False  # replace what a non-empty output_dir holds (refused otherwise, unless resuming)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # after the warmup: to 0, to min_lr, or flat
    min_lr: Annotated[float, Field(ge=0)] = 0.0  # the cosine schedule's floor
    adam_betas: tuple[Probability, Probability] = (0.9, 0.999)  # AdamW's (beta1, beta2)
    no_decay_embeddings: bool = False  # embeddings (and a head tied to them) without weight decay
    tf32: bool = True  # on CUDA, fp32 matrix products in TF32 (the products bf16 autocast leaves in fp32)
    dataloader_workers: NonNegInt | None = None  # collating (tokenizing) processes; None: 2 on a GPU, 0 on CPU
    # optimizer steps between reads of the loss: a log line in a file (loss, lr, rate, ETA), TensorBoard, the
    # NaN check; the generative family adds itemic-vs-text and per-source losses, tokens/s, MFU, peak memory
    log_every: Count = 10

    @model_validator(mode="after")
    def _schedule(self):
        if self.min_lr > 0 and self.lr_schedule != "cosine":
            raise ValueError("min_lr needs lr_schedule: cosine")
        lr = getattr(self, "lr", None)
        if lr is not None and self.min_lr >= lr:
            raise ValueError(f"min_lr {self.min_lr} must be below lr {lr}")
        return self


class TrainConfig(_TrainCommon):
    # (prefix → next item) samples per user per epoch (RecFormer draws 1). With item_grad "all" the catalog is
    # encoded once per step whatever the batch, so more samples in larger batches cost little more per epoch;
    # 4 in batches of 512 validated best of 2/4/8 (the measurements: docs/baselines.md)
    samples_per_user: Count = 4
    batch_size: Count = 512  # (history, target) samples per optimizer step and process
    lr: Rate = 2e-3  # peak learning rate (AdamW) of stage 1
    stage1_epochs: NonNegInt = 20  # stage 1's epochs at most (early stopping on validation ends most runs)
    # RecFormer's stage 2 (the item table frozen) for a pretrained backbone: the "recformer" preset. With the
    # embedded random-init default it never won on validation and cost time, so it is off by default
    stage2_epochs: NonNegInt = 0
    eval_every: Count = 1  # epochs between validations
    patience: Count = 6  # stage 1: validations without a better metric before stopping
    stage2_patience: Count = 2  # stage 2: validations without a better metric before stopping
    stage2_lr: Rate | None = None  # None = lr / 2
    item_batch_size: Count = 256  # items per encoding batch when the item table is built
    # How the item side learns in stage 1. "none": only through the table re-encoded before each epoch
    # (RecFormer's finetuning exactly). "batch": plus an in-batch contrastive term on the batch's target
    # items encoded with gradient. "all": the whole catalog is encoded with gradient at every step (full
    # softmax end to end; small catalogs only). A random-init backbone needs "batch" or "all".
    item_grad: Literal["none", "batch", "all"] = "all"

    @model_validator(mode="before")
    @classmethod
    def _no_max_steps(cls, data):
        if isinstance(data, dict) and "max_steps" in data:  # what users of other trainers reach for first
            raise ValueError("finetune trains whole epochs (validation, early stopping and the stage-2 switch happen "
                             "at epoch ends), so train.max_steps is not supported: set train.stage1_epochs and "
                             "train.stage2_epochs (train.batch_size sets the steps per epoch)")
        return data


class EvalConfig(_Ranking):
    batch_size: Count = 64  # users per scoring batch
    exclude_history: bool = False  # never rank an item of the user's history (the target excepted)
    chunk_size: Count = 8192  # items per scoring block (lmrec.eval.ranking.DEFAULT_CHUNK)


class RunConfig(_Strict):
    output_dir: str = "runs/recformer"  # run directory: model/, metrics.json, logs/, checkpoints/
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _no_ignored_model_settings(self):
        ignored = self.model.ignored_with_saved_init()
        if ignored:
            raise ValueError(f"model.init={self.model.init} is a saved recommender, which fixes the model; these "
                             f"settings would be ignored: {'; '.join(ignored)}. Remove them, or start from a "
                             "backbone (model.backbone) instead")
        return self


class GenDataConfig(_Strict):
    """Defaults chosen on validation with the embedded tiny Qwen3 on ml-100k: 3 history items, every
    position, no alignment samples (10 items × 5 positions with alignment validated worse)."""

    max_history: Count = 3  # items of history in a prompt (the one default: training and inference)
    # the user turn of a next-item prompt; {history} = the items, comma-separated. A terse one ("{history}")
    # costs fewer tokens, which is what a model trained from scratch needs; a pretrained LM reads the words
    prompt: str = "Recent items, oldest first: {history}. Next item?"
    targets_per_user: Count = 50  # next-item samples per user: the last positions of the training sequence
    with_titles: bool = False  # history items as "<sid> title" instead of the semantic ID alone
    alignment: bool = False  # add sid→title and title→sid samples
    max_length: Count = 512  # tokens per sample; longer samples are cut from the left
    # chat: one next-item conversation per sample (the prompt above). sequence: a user's items as one causal
    # sequence of semantic IDs with the loss on every item after the first — windows of max_history + 1 items,
    # sequence_stride apart, each target trained once per epoch (decoder-only models; inference prompts with
    # the newest max_history items' IDs, no chat template)
    format: Literal["chat", "sequence"] = "chat"
    sequence_stride: Count | None = None  # items between windows (default: half a window)

    @field_validator("prompt")
    @classmethod
    def _one_history_field(cls, v: str) -> str:
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if fields != ["history"]:
            raise ValueError(f"must contain {{history}} once and no other {{field}} (got fields {fields}); "
                             "quote it on the command line: data.prompt=\"'{history}'\"")
        return v


class GenTrainConfig(_TrainCommon):
    stage: Literal["1", "2", "sft"] = "2"  # see lmrec.generative.stages
    epochs: NonNegInt = 10  # passes over the samples (0: evaluate only)
    batch_size: Count = 256  # samples (or packs, when streaming) per optimizer step and process
    lr: Rate = 2e-3  # peak learning rate (AdamW)
    patience: Count = 3  # validations without a better metric before stopping
    eval_every: Count = 1  # epochs between beam-search validations (always after the last epoch)
    lora: bool = False  # peft LoRA (stage 2 / sft); the new token rows stay trainable
    lora_r: Count = 8  # LoRA rank
    lora_alpha: Count = 16  # LoRA scaling numerator (the update is scaled by alpha / r)
    lora_dropout: Share = 0.05  # dropout on the LoRA branch's input
    lora_target_modules: list[str] | str = "all-linear"  # modules that get adapters: a list of names, or "all-linear"
    # streaming (gen train --data-config): steps are optimizer steps of train.batch_size packs per rank
    num_training_steps: Count | None = None  # length of the learning-rate schedule (default: an estimate)
    max_steps: Count | None = None  # stop here even if the stream goes on
    loss_chunk_tokens: Count | None = None  # LM-head cross-entropy in chunks of this many positions (no full logits)
    loss_impl: Literal["auto", "chunked", "liger"] = "auto"  # with loss_chunk_tokens: auto = Liger on CUDA if installed
    peak_tflops: Rate | None = None  # the accelerator's peak (e.g. 989 for H100 bf16 dense): logs MFU
    # FSDP2 (lmrec.training.fsdp) instead of DDP, for decoder-only models too large to copy on every GPU
    fsdp: bool = False
    fsdp_reduce_fp32: bool = True  # reduce gradients in fp32 (False: in the compute dtype, half the traffic)
    fsdp_shard_size: Count | None = None  # HSDP: shard within groups of this many processes (a node), replicate across
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    attn_implementation: LmAttention = "auto"  # recorded in the run's log and metrics.json
    compile: bool = False  # torch.compile each decoder layer (measured in bench/gpu/bench_gen.py)

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_text(cls, v):
        return str(v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _lora_stage(self):
        if self.lora and self.stage == "1":
            raise ValueError("train.lora applies to stage 2 / sft (stage 1 trains only the new token rows)")
        if self.fsdp and self.lora:
            raise ValueError("train.fsdp with train.lora is not supported (LoRA adapters are small: use DDP)")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError("train.fsdp keeps fp32 master weights and computes in bf16: use mixed_precision "
                             "bf16 (or auto / no), not fp16")
        return self


class GenEvalConfig(_Ranking):
    beams: Count = 50  # items beyond the beam count rank as misses
    batch_size: Count = 32  # users per beam-search batch
    exclude_history: bool = False  # history items leave the beams' list before the target is ranked (as every family)


class GenRunConfig(_Strict):
    output_dir: str = "runs/generative"  # run directory: model/, metrics.json, logs/, checkpoints/
    data: GenDataConfig = GenDataConfig()
    train: GenTrainConfig = GenTrainConfig()
    eval: GenEvalConfig = GenEvalConfig()


class IdModelConfig(_Strict):
    """An ID-based sequential baseline (``lmrec baseline``). Unset sizes take RecBole 1.2.1's defaults for
    the architecture: SASRec hidden 64, 2 layers, 2 heads, inner 256, dropout 0.5; GRU4Rec embedding 64,
    GRU hidden 128, 1 layer, dropout 0.3."""

    # sasrec | gru4rec | hybrid (SASRec whose items are ID + text vectors)
    arch: Literal["sasrec", "gru4rec", "hybrid"] = "sasrec"
    hidden_size: Count = 64  # item embedding size (and SASRec's model width)
    layers: Count | None = None  # None = the architecture's RecBole default (SASRec 2, GRU4Rec 1)
    heads: Count = 2  # SASRec
    inner_size: Count = 256  # SASRec's feed-forward width
    gru_hidden_size: Count = 128  # GRU4Rec
    dropout: Share | None = None  # None = the architecture's RecBole default (SASRec 0.5, GRU4Rec 0.3)
    max_len: Count = 50  # most recent items of a history
    # hybrid (SASRec whose item = learned ID vector + projected text vector; new items by their text alone):
    # where the text vectors come from — a trained RecFormer model directory, or null: the item text through
    # the default sentence encoder (all-MiniLM-L6-v2)
    text_from: str | None = None
    id_dropout: Share = 0.2  # hybrid: share of items scored by their text alone at each training step
    # a trained SASRec (or hybrid) model directory of the same sizes and catalog whose weights start this run
    # (the hybrid's text projection starts new): the hybrid learns what the text adds to a converged ID model
    init_from: str | None = None

    def resolved(self) -> IdModelConfig:
        sas = self.arch in ("sasrec", "hybrid")
        layers = self.layers if self.layers is not None else (2 if sas else 1)
        dropout = self.dropout if self.dropout is not None else (0.5 if sas else 0.3)
        return self.model_copy(update={"layers": layers, "dropout": dropout})

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.arch != "gru4rec" and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads {self.heads}")
        return self


class IdTrainConfig(_TrainCommon):
    """RecBole's training of these models: Adam at a constant lr 1e-3, no weight decay, no clipping, up to
    300 epochs with early stopping after 10 without a better validation NDCG@10. A batch is
    ``batch_size`` training windows, each trained on every position at once."""

    epochs: NonNegInt = 300  # at most this many passes (early stopping on validation ends most runs sooner)
    batch_size: Count = 64  # training windows per step
    lr: Rate = 1e-3  # learning rate (Adam, constant as in RecBole)
    patience: Count = 10  # epochs without a better validation metric before stopping
    weight_decay: Annotated[float, Field(ge=0)] = 0.0  # AdamW weight decay (RecBole: none)
    warmup_ratio: Share = 0.0  # share of the steps spent warming up (RecBole: none)
    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    lr_schedule: Literal["linear", "cosine", "constant"] = "constant"


class IdDataConfig(_Strict):
    path: str | None = None  # the prepared dataset (`lmrec baseline --data`; recorded by the run)


class IdRunConfig(_Strict):
    output_dir: str = "runs/baseline"  # run directory: model/, metrics.json, logs/, checkpoints/
    data: IdDataConfig = IdDataConfig()
    model: IdModelConfig = IdModelConfig()
    train: IdTrainConfig = IdTrainConfig()
    eval: EvalConfig = EvalConfig()


Weight = Annotated[float, Field(ge=0, le=1)]
FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class FusionEvalConfig(_Ranking):
    beams: Count | None = None  # the generative model's beams fused (None: its run's eval.beams)
    batch_size: Count = 32  # users per scoring batch
    exclude_history: bool = False  # must match the two fused runs' (one protocol for every row)


class FusionRunConfig(_Strict):
    """The fusion row of `lmrec compare` (lmrec.fusion): the same seed's ID model and generative model,
    combined per user by the rule and weight (and ID model) that validate best."""

    output_dir: str = "runs/fusion"  # run directory: model/fusion.json, metrics.json
    # the ID model fused with the generative one; auto: each ID model the comparison trains (SASRec when it
    # trains none), the one that validates best fused
    id_model: Literal["auto", "sasrec", "gru4rec", "hybrid"] = "auto"
    weights: list[Weight] = Field(list(FUSION_WEIGHTS), min_length=1)  # generative weights tried on valid (0: ID alone)
    rules: list[Literal["mixture", "rrf"]] = Field(["mixture", "rrf"], min_length=1)  # tried on valid (lmrec.fusion)
    eval: FusionEvalConfig = FusionEvalConfig()


class PretrainDataConfig(_Strict):
    paths: list[str] = []  # prepared datasets forming the corpus (several domains)
    valid: str | None = None  # prepared dataset for validation (zero-shot ranking); None = the first corpus one
    valid_users: Count = 1000  # validation users (the first N of the valid split)
    max_history_len: Count = 50  # newest items of a history the model sees


class PretrainModelConfig(ModelConfig):
    temperature: Rate = 0.05  # of the contrastive loss: RecFormer's (pretraining was measured with it)
    mlm_weight: Annotated[float, Field(ge=0)] = 0.1  # loss = contrastive + mlm_weight × (MLM history + target)
    mlm_probability: Probability = 0.15  # share of words masked (whole-word masking)
    freeze_word_embeddings: bool = False  # keep the backbone's word embeddings fixed


class PretrainTrainConfig(_TrainCommon):
    batch_size: Annotated[int, Field(ge=2)] = 64  # a contrastive batch needs negatives
    pairs_per_user: Count = 1  # (history → target from the second half) pairs per user sequence per epoch
    lr: Rate = 1e-3  # peak learning rate (AdamW)
    epochs: NonNegInt = 10  # passes over the pairs
    eval_every: Count = 1  # epochs between zero-shot validations
    patience: Patience = None  # validations without a better metric before stopping; None = never stop early
    item_batch_size: Count = 256  # items per encoding batch when the item table is built


class PretrainRunConfig(_Strict):
    output_dir: str = "runs/pretrain"  # run directory: model/, metrics.json, logs/, checkpoints/
    data: PretrainDataConfig = PretrainDataConfig()
    model: PretrainModelConfig = PretrainModelConfig()
    train: PretrainTrainConfig = PretrainTrainConfig()
    eval: EvalConfig = EvalConfig()


class MlmTrainConfig(_TrainCommon):
    """``lmrec backbone pretrain-mlm``: continued MLM pretraining on a raw text corpus."""

    max_length: Annotated[int, Field(ge=3)] = 128  # tokens per chunk (longer documents are cut into chunks)
    mlm_probability: Probability = 0.15  # share of words masked (whole-word masking; jieba words for Chinese)
    batch_size: Count = 32  # chunks per optimizer step and process
    lr: Rate = 5e-4  # peak learning rate (AdamW)
    epochs: NonNegInt = 3  # passes over the corpus (0: report the validation MLM only)
    patience: Patience = None  # epochs without a better validation loss before stopping; None = never stop early
    attention_window: Count | list[Count] | None = None  # None = the backbone's
    attention_impl: AttentionImpl = "auto"  # see ModelConfig


class MlmRunConfig(_Strict):
    output_dir: str = "runs/pretrain-mlm"  # run directory: model/, mlm_report.json, logs/, checkpoints/
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
    """``"recformer"`` → the packaged ``presets/recformer.yaml`` (None if there is no such preset)."""
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
            import difflib

            names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            near = difflib.get_close_matches(path.stem, names, n=1)
            raise ConfigError(f"config file {path} not found" + (f" (did you mean the preset {near[0]}?)" if near
                              else "") + f"; the packaged presets: {', '.join(names)}")
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
            msg = (_unknown_key(schema, err["loc"]) if err["type"] == "extra_forbidden"
                   else err["msg"].removeprefix("Value error, "))
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise ConfigError(f"invalid configuration ({source} and overrides):\n" + "\n".join(lines)) from None


def has_key(schema, dotted: str) -> bool:
    """Whether ``dotted`` (``train.lr``) names a field of ``schema`` (a command that trains several models
    gives an override without a model prefix to every model whose configuration has that key)."""
    model = schema
    for part in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


def _unknown_key(schema, loc: tuple) -> str:
    """"unknown key", and the closest keys of its section when one is near (a typo: ``train.lrr``)."""
    import difflib

    model = schema
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        model = getattr(field, "annotation", None) if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return "unknown key"
    near = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=3, cutoff=0.6)
    return "unknown key" + (f" (did you mean {' or '.join(near)}?)" if near else "")


def with_data_path(cfg, path: str | Path):
    """``cfg`` with ``data.path`` set to the dataset a run actually uses (absolute), so that the run's
    ``run_config.yaml`` re-runs it: ``lmrec finetune -c RUN/run_config.yaml``."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(path).resolve())})})


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True))

"""Backbones: from a local checkpoint directory to an initialised RecFormer, and the embedded default.

Layouts recognised from ``config.json`` and the weight names (never from a model name):

* ``longformer`` (``allenai/longformer-base-4096``): RoBERTa positions, offset ``pad_token_id + 1``,
  global projections ``{query,key,value}_global`` present;
* ``bert`` / ``roberta`` / MiniLM (512 positions, no global projections; the global ones are copied from
  the local ones, as the allenai "convert to long" recipe does). BERT positions start at 0, RoBERTa ones at
  ``pad_token_id + 1``.

RecFormer's token-type table has 4 rows (start/key/value/pad); each is initialised from the backbone's
first token-type row, so that at step 0 every type embeds exactly like the backbone's segment A. The
item-position table is new (normal init).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmrec.errors import LmrecError
from lmrec.recformer.configuration_recformer import RecformerConfig

BACKBONE_ENV = "LMREC_BACKBONE"
_PREFIXES = ("longformer.", "bert.", "roberta.", "model.")
_GLOBAL = ("query_global", "key_global", "value_global")
_COPY_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "layer_norm_eps", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id")


@dataclass
class InitReport:
    """What happened to every RecFormer tensor when initialising from a backbone."""

    copied: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)  # built from backbone tensors (global q/k/v, token types)
    new: list[str] = field(default_factory=list)  # freshly initialised (item positions)
    wrong_size: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # backbone tensors RecFormer does not use (MLM head, pooler)


def read_backbone(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` and the weights (safetensors or pytorch_model.bin) with model prefixes stripped."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LmrecError(f"{path} is not a model directory (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise LmrecError(f"{path} has no model.safetensors or pytorch_model.bin")
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return cfg, out


def position_offset(cfg: dict) -> int:
    """RoBERTa-style checkpoints (Longformer included) number positions from pad_token_id + 1."""
    if cfg.get("model_type") in ("longformer", "roberta", "xlm-roberta", "camembert"):
        return int(cfg.get("pad_token_id", 1)) + 1
    return 0


def recformer_config_from_backbone(cfg: dict, **overrides) -> RecformerConfig:
    kwargs = {k: cfg[k] for k in _COPY_FIELDS if k in cfg}
    kwargs["position_offset"] = position_offset(cfg)
    kwargs["attention_window"] = cfg.get("attention_window", 64)
    if isinstance(kwargs["attention_window"], list) and len(kwargs["attention_window"]) != cfg.get(
            "num_hidden_layers", len(kwargs["attention_window"])):
        kwargs["attention_window"] = kwargs["attention_window"][0]
    kwargs.update(overrides)
    return RecformerConfig(**kwargs)


def init_from_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> InitReport:
    """Copy backbone tensors into ``model.longformer`` (a RecformerModel) and report every tensor."""
    report = InitReport()
    target = model.longformer.state_dict()
    used = set()
    new_state = {}
    for name, tensor in target.items():
        src = state.get(name)
        if name == "embeddings.token_type_embeddings.weight" and "embeddings.token_type_embeddings.weight" in state:
            row = state[name][0]
            new_state[name] = row.expand_as(tensor).clone()
            report.derived.append(name)
            used.add(name)
            continue
        if src is None and any(g in name for g in _GLOBAL):
            local = name.replace("_global", "")
            if local in state and state[local].shape == tensor.shape:
                new_state[name] = state[local].clone()
                report.derived.append(name)
                used.add(local)
                continue
        if src is None:
            if name.startswith("embeddings.item_position_embeddings"):
                report.new.append(name)
            else:
                report.wrong_size.append(f"{name}: missing in the backbone")
            continue
        if src.shape != tensor.shape:
            report.wrong_size.append(f"{name}: backbone {tuple(src.shape)} vs RecFormer {tuple(tensor.shape)}")
            continue
        new_state[name] = src
        report.copied.append(name)
        used.add(name)
    report.unused = sorted(k for k in state if k not in used and not k.endswith("position_ids"))
    model.longformer.load_state_dict(new_state, strict=False)
    return report


def resolve_backbone(path: str | Path | None) -> Path | None:
    """An explicit path, else the ``LMREC_BACKBONE`` environment variable, else None (embedded default)."""
    path = path or os.environ.get(BACKBONE_ENV)
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        raise LmrecError(f"backbone {p} does not exist (give a local model directory; nothing is downloaded)")
    return p


# --------------------------------------------------------------------------------------------- default
def build_default_backbone(texts: list[str], out_dir: str | Path, *, hidden_size: int = 256, layers: int = 2,
                           heads: int = 4, vocab_size: int = 8000, max_positions: int = 512,
                           attention_window: int = 64, seed: int = 0) -> Path:
    """The embedded default: a small random-init Longformer (``allenai/longformer-base-4096`` layout) with a
    lower-cased WordPiece tokenizer trained on ``texts`` with ``tokenizers``. Saved with
    ``save_pretrained`` so that it loads through the same code path as any downloaded checkpoint."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, LongformerConfig, LongformerForMaskedLM

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions)
    pad = fast.pad_token_id
    config = LongformerConfig(
        vocab_size=len(fast), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden_size, max_position_embeddings=max_positions + pad + 1,
        attention_window=[attention_window] * layers, pad_token_id=pad, bos_token_id=cls_id, eos_token_id=sep_id,
        type_vocab_size=1,
    )
    torch.manual_seed(seed)
    model = LongformerForMaskedLM(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    fast.save_pretrained(str(out_dir))
    return out_dir


def build_recformer(backbone: str | Path, **overrides):
    """Backbone directory → (RecformerForSeqRec initialised from it, RecformerTokenizer, InitReport)."""
    from lmrec.recformer.modeling_recformer import RecformerForSeqRec
    from lmrec.recformer.tokenization_recformer import RecformerTokenizer

    cfg, state = read_backbone(backbone)
    config = recformer_config_from_backbone(cfg, **overrides)
    model = RecformerForSeqRec(config)
    report = init_from_backbone(model, state)
    tokenizer = RecformerTokenizer.from_pretrained(backbone, config)
    if len(tokenizer) > config.vocab_size:
        raise LmrecError(f"the tokenizer of {backbone} has {len(tokenizer)} tokens but the model only "
                         f"{config.vocab_size} embeddings")
    return model, tokenizer, report

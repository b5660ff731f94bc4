"""Backbones: from a local checkpoint directory to an initialised RecFormer, and the embedded default.

The layout is recognised from ``config.json`` and the weight names, never from a model name:

==================  =================================  ==============  ===========  ==================
layout              example                            positions from  type rows    global q/k/v
==================  =================================  ==============  ===========  ==================
``longformer``      allenai/longformer-base-4096       pad_id + 1 (2)  1            in the checkpoint
``longformer_zh``   ValkyriaLenneth/longformer_zh      0               2            in the checkpoint
``roberta``         roberta-base                       pad_id + 1 (2)  1            copied from local
``bert``            bert-base-chinese, MiniLM          0               2            copied from local
``recformer``       a checkpoint written by lmrec      from config     4            in the checkpoint
==================  =================================  ==============  ===========  ==================

Longformer_ZH is a ``BertForMaskedLM`` checkpoint (``model_type: bert``) whose attention layers carry
``{query,key,value}_global`` and whose ``config.json`` has an ``attention_window``; loading it with stock
Longformer classes would shift its positions by 2 and leave token types random, so every tensor is mapped
here explicitly (:func:`canonical_state`) and reported (:class:`InitReport`).

Token types: RecFormer has 4 rows (start / key / value / pad); every one is initialised from the
backbone's row 0 (the segment every token of a single-text input carries in the backbone's own
pretraining), so at step 0 each type embeds exactly as the backbone's inputs did; finetuning then
separates them. The item-position table is new (normal init, std = initializer_range).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmrec.errors import LmrecError
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_format, check_tokenizer, check_weights, loading, read_json
from lmrec.recformer.configuration_recformer import RecformerConfig

BACKBONE_ENV = "LMREC_BACKBONE"
MODEL_NAME_ENV = "MODEL_NAME_OR_PATH"  # the name RecFormer's own scripts use
_PREFIXES = ("longformer.", "bert.", "roberta.", "model.")
_GLOBAL = ("query_global", "key_global", "value_global")
_ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
_BERT_TYPES = ("bert",)
_COPY_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "layer_norm_eps", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id")
_BERT_HEAD = {  # BertForMaskedLM's MLM head → the Longformer/RoBERTa names RecFormer uses
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
    "cls.predictions.decoder.weight": "lm_head.decoder.weight",
    "cls.predictions.decoder.bias": "lm_head.decoder.bias",
    "cls.predictions.bias": "lm_head.bias",
}
_UNUSED_PREFIXES = ("pooler.", "cls.seq_relationship.", "lm_head.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model", "added_tokens.json")


@dataclass(frozen=True)
class Layout:
    name: str  # longformer | longformer_zh | roberta | bert | recformer
    position_offset: int  # added to 0-based token positions before the lookup
    is_long: bool  # global projections must be in the checkpoint

    @property
    def prefix(self) -> str:
        """The model prefix this layout's checkpoints use on disk."""
        return {"longformer": "longformer.", "longformer_zh": "bert.", "bert": "bert.", "roberta": "roberta.",
                "recformer": "longformer."}[self.name]


@dataclass
class InitReport:
    """What happened to every tensor of a RecFormer model when initialising it from a backbone."""

    copied: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)  # built from backbone tensors (global q/k/v, token types)
    new: list[str] = field(default_factory=list)  # freshly initialised, by design (item positions, heads)
    missing: list[str] = field(default_factory=list)  # essential and absent: an error
    wrong_size: list[str] = field(default_factory=list)  # essential and mis-shaped: an error
    unused: list[str] = field(default_factory=list)  # backbone tensors RecFormer does not use (pooler, NSP)
    notes: dict[str, str] = field(default_factory=dict)  # tensor name → how it was made / why it failed

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong_size

    def rows(self) -> list[tuple[str, str, str]]:
        out = []
        for status in ("copied", "derived", "new", "missing", "wrong_size", "unused"):
            out += [(status, name, self.notes.get(name, "")) for name in getattr(self, status)]
        return out

    def problems(self) -> list[str]:
        """Essential tensors missing or mis-shaped, and unused ones no layout rule explains."""
        return ([f"missing: {n} ({self.notes.get(n, '')})" for n in self.missing]
                + [f"wrong size: {n} ({self.notes.get(n, '')})" for n in self.wrong_size]
                + [f"unexpected: {n}" for n in unexpected(self)])

    def counts(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in ("copied", "derived", "new", "missing", "wrong_size", "unused")}

    def to_json(self) -> dict:
        return {"counts": self.counts(), "tensors": [{"status": s, "name": n, "note": d} for s, n, d in self.rows()]}


# --------------------------------------------------------------------------------------------- reading
def read_backbone(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` and the raw weights (``model.safetensors`` or ``pytorch_model.bin``) of a directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise LmrecError(f"backbone {path} is not a directory (give a local model directory; nothing is "
                         "downloaded)")
    if not cfg_file.exists():
        raise LmrecError(f"{path} is not a model directory (no config.json)")
    check_format(path)
    cfg = read_json(cfg_file)
    check_weights(path, cfg)  # whole files, of the config's hidden size and vocabulary, before they are read
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        with loading(path / "model.safetensors"):
            state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        with loading(path / "pytorch_model.bin"):
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise LmrecError(f"{path} has no model.safetensors or pytorch_model.bin")
    return cfg, state


def detect_layout(cfg: dict, state: dict[str, torch.Tensor]) -> Layout:
    model_type = cfg.get("model_type")
    has_global = any(any(g in k for g in _GLOBAL) for k in state)
    long = has_global or "attention_window" in cfg
    pad = int(cfg.get("pad_token_id", 1) if cfg.get("pad_token_id") is not None else 1)
    if model_type == "recformer":
        return Layout("recformer", int(cfg.get("position_offset", 0)), True)
    if model_type == "longformer":
        return Layout("longformer", pad + 1, True)
    if model_type in _ROBERTA_TYPES:
        return Layout("longformer" if long else "roberta", pad + 1, long)
    if model_type in _BERT_TYPES:
        return Layout("longformer_zh" if long else "bert", 0, long)
    raise LmrecError(f"unsupported backbone model_type {model_type!r} (expected longformer, bert (Longformer_ZH "
                     f"or plain), roberta, or a RecFormer checkpoint)")


def canonical_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone weight names → the names inside RecFormer: model prefixes stripped, old ``gamma``/``beta``
    LayerNorm names renamed, BERT's MLM head renamed to ``lm_head.*``; ``position_ids`` buffers dropped."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.endswith(".gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        for old, new in _BERT_HEAD.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def recformer_config_from_backbone(cfg: dict, layout: Layout | None = None, **overrides) -> RecformerConfig:
    if cfg.get("model_type") == "recformer":
        kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    else:
        layout = layout or detect_layout(cfg, {})
        kwargs = {k: cfg[k] for k in _COPY_FIELDS if k in cfg}
        kwargs["position_offset"] = layout.position_offset
        kwargs["attention_window"] = cfg.get("attention_window", 64)
    window = kwargs["attention_window"]
    if isinstance(window, list) and len(window) != kwargs.get("num_hidden_layers", len(window)):
        kwargs["attention_window"] = window[0]  # one value per layer again when the layer count changed
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return RecformerConfig(**kwargs)


# --------------------------------------------------------------------------------------------- init
def init_from_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor], layout: Layout) -> InitReport:
    """Copy backbone tensors (raw names) into a RecFormer model (``RecformerForSeqRec`` or
    ``RecformerForPretraining``) and report every tensor of both sides. An MLM decoder is tied to the word
    embeddings unless the model was configured untied (the backbone's decoder differs: it is kept)."""
    src = canonical_state(state)
    report = InitReport()
    target = model.state_dict()
    tied = {"lm_head.decoder.weight"} if getattr(model.config, "tie_word_embeddings", True) else set()
    used: set[str] = set()
    new_state: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        if name in tied or name == "lm_head.decoder.bias":
            continue
        key = name[len("longformer."):] if name.startswith("longformer.") else name
        status, value, note, source = _init_tensor(name, key, tensor, src, layout)
        getattr(report, status).append(name)
        if note:
            report.notes[name] = note
        if value is not None:
            new_state[name] = value
            used.add(source or key)
    for k in sorted(src):
        if k not in used:
            report.unused.append(k)
            if k in ("lm_head.decoder.weight", "lm_head.decoder.bias") and "lm_head.bias" in target:
                report.notes[k] = "tied (to the word embeddings / lm_head.bias)"
            elif k.startswith(_UNUSED_PREFIXES):
                report.notes[k] = "not used by this model (pooler / NSP / MLM head)"
            else:
                report.notes[k] = "UNEXPECTED: not a tensor of this layout"
    model.load_state_dict(new_state, strict=False)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return report


def _init_tensor(name: str, key: str, tensor: torch.Tensor, src: dict[str, torch.Tensor], layout: Layout
                 ) -> tuple[str, torch.Tensor | None, str, str | None]:
    """How one RecFormer tensor is initialised: (report status, value or None, note, source key)."""
    got = src.get(key)
    if key == "embeddings.token_type_embeddings.weight" and got is not None and got.shape[1:] == tensor.shape[1:]:
        if layout.name == "recformer" and got.shape == tensor.shape:
            return "copied", got, "", key
        return ("derived", got[0].expand_as(tensor).clone(),
                f"all {tensor.shape[0]} rows from the backbone's row 0 (of {got.shape[0]})", key)
    if got is None and any(g in key for g in _GLOBAL):
        local = key.replace("_global", "")
        if layout.is_long:
            return ("missing", None, f"global projection missing in a long ({layout.name}) checkpoint that has an "
                    "attention_window / other global projections", None)
        if local in src and src[local].shape == tensor.shape:
            return "derived", src[local].clone(), f"copied from {local} (allenai convert-to-long)", local
        return "missing", None, f"neither {key} nor {local} in the backbone", None
    if got is None:
        if key.startswith("embeddings.item_position_embeddings") or name.startswith(("user_projection", "lm_head.")):
            return "new", None, ("new in RecFormer" if not name.startswith("lm_head.") else
                                 "the backbone has no MLM head"), None
        return "missing", None, "not in the backbone", None
    if got.shape != tensor.shape:
        return "wrong_size", None, f"backbone {tuple(got.shape)} vs RecFormer {tuple(tensor.shape)}", None
    note = "untied: differs from the word embeddings in the backbone, kept" if key == "lm_head.decoder.weight" else ""
    return "copied", got.to(tensor.dtype), note, key


def decoder_is_untied(state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's MLM decoder is a tensor of its own (not equal to the word embeddings)."""
    src = canonical_state(state)
    dec, emb = src.get("lm_head.decoder.weight"), src.get("embeddings.word_embeddings.weight")
    return dec is not None and emb is not None and (dec.shape != emb.shape or not torch.equal(dec, emb))


def unexpected(report: InitReport) -> list[str]:
    """Unused backbone tensors that no rule explains (a sign of a layout this loader does not know)."""
    return [k for k in report.unused if report.notes.get(k, "").startswith("UNEXPECTED")]


def resolve_backbone(path: str | Path | None) -> Path | None:
    """An explicit path, else ``$LMREC_BACKBONE``, else ``$MODEL_NAME_OR_PATH``, else None (embedded default)."""
    path = path or os.environ.get(BACKBONE_ENV) or os.environ.get(MODEL_NAME_ENV)
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        raise LmrecError(f"backbone {p} does not exist (give a local model directory; nothing is downloaded)")
    return p


def build_recformer(backbone: str | Path, model_cls=None, **overrides):
    """Backbone directory → (a RecFormer model initialised from it, RecformerTokenizer, InitReport).
    ``model_cls``: ``RecformerForSeqRec`` (default) or ``RecformerForPretraining``."""
    from lmrec.recformer.modeling_recformer import RecformerForSeqRec
    from lmrec.recformer.tokenization_recformer import RecformerTokenizer

    cfg, state = read_backbone(backbone)
    layout = detect_layout(cfg, state)
    config = recformer_config_from_backbone(cfg, layout, **overrides)
    if decoder_is_untied(state):  # keep a trained decoder of its own instead of replacing it by the embeddings
        config.tie_word_embeddings = False
    model = (model_cls or RecformerForSeqRec)(config)
    report = init_from_backbone(model, state, layout)
    check_tokenizer(Path(backbone))
    with loading(backbone):
        tokenizer = RecformerTokenizer.from_pretrained(backbone, config)
    if len(tokenizer) > config.vocab_size:
        raise LmrecError(f"the tokenizer of {backbone} has {len(tokenizer)} tokens but the model only "
                         f"{config.vocab_size} embeddings")
    return model, tokenizer, report


# --------------------------------------------------------------------------------------------- convert-to-long
def _tile_positions(pos: torch.Tensor, off: int, max_positions: int) -> torch.Tensor:
    """The learned position rows (after the ``off`` reserved ones) repeated up to ``max_positions``."""
    learned = pos[off:]
    new_pos = pos.new_empty(max_positions + off, pos.shape[1])
    new_pos[:off] = pos[:off]
    for start in range(0, max_positions, len(learned)):
        n = min(len(learned), max_positions - start)
        new_pos[off + start: off + start + n] = learned[:n]
    return new_pos


def _add_global_projections(canon: dict[str, torch.Tensor], layers: int, src: Path) -> None:
    """Global q/k/v of every layer copied from its local ones (allenai's recipe)."""
    for i in range(layers):
        for proj in ("query", "key", "value"):
            for part in ("weight", "bias"):
                local = f"encoder.layer.{i}.attention.self.{proj}.{part}"
                if local not in canon:
                    raise LmrecError(f"{src}: missing {local}")
                canon[f"encoder.layer.{i}.attention.self.{proj}_global.{part}"] = canon[local].clone()


def _named_for_layout(canon: dict[str, torch.Tensor], is_bert: bool) -> dict[str, torch.Tensor]:
    """Canonical names → the Longformer_ZH layout (``bert.*``, BERT's ``cls.predictions`` head) or the
    Longformer layout (``longformer.*``, ``lm_head.*``)."""
    prefix = "bert." if is_bert else "longformer."
    head_back = {v: k for k, v in _BERT_HEAD.items()} if is_bert else {}
    out_state = {}
    for k, v in canon.items():
        if k.startswith("lm_head.") or k.startswith("cls."):
            for new, old in head_back.items():
                if k.startswith(new):
                    k = old + k[len(new):]
                    break
            out_state[k] = v.clone().contiguous()
        else:
            out_state[prefix + k] = v.clone().contiguous()
    return out_state


def convert_to_long(src: str | Path, dst: str | Path, max_positions: int = 4096, attention_window: int = 512,
                    log=print) -> Path:
    """A short BERT/RoBERTa checkpoint → a long one (the allenai ``convert_model_to_long`` recipe): the learned
    position rows are tiled up to ``max_positions``, each layer gets global q/k/v copied from its local ones,
    ``attention_window`` is set per layer. BERT sources are written in the Longformer_ZH layout
    (``model_type: bert``, ``bert.*`` names, positions from 0), RoBERTa sources in the Longformer layout."""
    from safetensors.torch import save_file

    from lmrec.recformer.configuration_recformer import normalize_attention_window

    src, dst = Path(src), Path(dst)
    cfg, state = read_backbone(src)
    layout = detect_layout(cfg, state)
    if layout.is_long:
        raise LmrecError(f"{src} is already a long ({layout.name}) checkpoint")
    layers = int(cfg["num_hidden_layers"])
    windows = normalize_attention_window(attention_window, layers)
    canon = canonical_state(state)
    pos = canon.get("embeddings.position_embeddings.weight")
    if pos is None:
        raise LmrecError(f"{src}: no embeddings.position_embeddings.weight (absolute positions are required)")
    if max_positions < 1:
        raise LmrecError(f"--max-positions must be positive, got {max_positions}")
    off = layout.position_offset
    canon["embeddings.position_embeddings.weight"] = _tile_positions(pos, off, max_positions)
    _add_global_projections(canon, layers, src)
    is_bert = layout.name == "bert"
    out_state = _named_for_layout(canon, is_bert)
    has_head = any(k.startswith(("cls.predictions", "lm_head.")) for k in out_state)
    new_cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "architectures", "transformers_version")}
    new_cfg.update(max_position_embeddings=max_positions + off, attention_window=windows)
    if is_bert:
        new_cfg["architectures"] = ["BertForMaskedLM" if has_head else "BertModel"]
    else:
        new_cfg.update(model_type="longformer", architectures=["LongformerForMaskedLM" if has_head
                                                               else "LongformerModel"])

    def write(tmp: Path) -> None:
        save_file(out_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        tc = tmp / "tokenizer_config.json"
        if tc.exists():
            t = json.loads(tc.read_text(encoding="utf-8"))
            t["model_max_length"] = max_positions
            tc.write_text(json.dumps(t, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    atomic_dir(dst, write)
    log(f"{src} ({layout.name}, {pos.shape[0] - off} positions) → {dst} "
        f"({'longformer_zh' if is_bert else 'longformer'} layout, {max_positions} positions, "
        f"attention_window {windows[0]} × {layers} layers, global q/k/v copied from local)")
    return dst


# --------------------------------------------------------------------------------------------- default
def build_default_backbone(texts: list[str], out_dir: str | Path, *, hidden_size: int = 256, layers: int = 2,
                           heads: int = 4, vocab_size: int = 8000, max_positions: int = 512,
                           attention_window: int = 64, seed: int = 0, dropout: float = 0.1) -> Path:
    """The embedded default: a small random-init Longformer (``allenai/longformer-base-4096`` layout) with a
    lower-cased BPE tokenizer (sub-words, as the English Longformer's) trained on ``texts`` with
    ``tokenizers``. Saved with ``save_pretrained`` so that it loads through the same code path as any
    downloaded checkpoint.

    BPE rather than WordPiece: ``tokenizers``' WordPiece trainer numbers its "##" continuation pieces in hash
    order, which breaks ties between merges differently in every process (huggingface/tokenizers#1794), so
    two runs with the same seed got different vocabularies and metrics; its BPE trainer without a
    continuation prefix gives the same vocabulary in every process (tested)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LongformerConfig, LongformerForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_positions)
    pad = fast.pad_token_id
    config = LongformerConfig(
        vocab_size=len(fast), hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden_size, max_position_embeddings=max_positions + pad + 1,
        attention_window=[attention_window] * layers, pad_token_id=pad, bos_token_id=cls_id, eos_token_id=sep_id,
        type_vocab_size=1, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    # its own draws only: a run that builds it and a re-run that reloads it must leave the global RNG alike
    # (every later dropout mask and shuffle draws from it; a re-run into the same directory gave other metrics)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LongformerForMaskedLM(config)
    def write(tmp: Path) -> None:  # a run killed while building it leaves none, not half of one
        model.save_pretrained(str(tmp))
        fast.save_pretrained(str(tmp))

    return atomic_dir(out_dir, write)

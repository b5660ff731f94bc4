"""Checkpoint tools, parameterised versions of RecFormer's scripts:

* :func:`init_checkpoint` (``save_longformer_ckpt.py``): backbone → the initial RecFormer checkpoint
  (encoder + MLM head) with a report of every tensor;
* :func:`retokenize_checkpoint` (migration path B): an existing RecFormer checkpoint + another tokenizer →
  word embeddings and MLM decoder resized to the new vocabulary, rows of tokens present in both copied;
* :func:`convert_checkpoint` (``convert_pretrain_ckpt.py``): a pretraining checkpoint (a directory written
  by lmrec, a Lightning ``.ckpt``, or a bare state dict) → the encoder-only weights and the recommender.

Every output directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmrec.errors import LmrecError
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_format, check_tokenizer, loading, read_json, safetensors_header, write_marker
from lmrec.recformer.backbones import (
    InitReport,
    build_recformer,
    canonical_state,
    read_backbone,
)
from lmrec.recformer.configuration_recformer import RecformerConfig
from lmrec.recformer.modeling_recformer import RecformerForPretraining, RecformerForSeqRec, RecformerModel
from lmrec.recformer.tokenization_recformer import RecformerTokenizer

WORD_EMB = "longformer.embeddings.word_embeddings.weight"


# --------------------------------------------------------------------------------------------- init
def init_checkpoint(backbone: str | Path, out: str | Path, *, allow_partial: bool = False, seed: int = 0,
                    **overrides) -> InitReport:
    """Build ``RecformerForPretraining`` from a backbone and save it (config, weights, tokenizer,
    ``init_report.json``). Raises (and writes nothing) when an essential tensor is missing or mis-shaped,
    unless ``allow_partial``. The tensors the backbone lacks (the item positions, ...) are drawn from their
    own generator seeded with ``seed``: the same command writes the same checkpoint, and the caller's random
    state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, tokenizer, report = build_recformer(backbone, model_cls=RecformerForPretraining, **overrides)
    problems = report.problems()
    if problems and not allow_partial:
        raise LmrecError(f"backbone {backbone} does not initialise RecFormer completely:\n  "
                         + "\n  ".join(problems) + "\n(--allow-partial keeps the random init for these)")

    def write(tmp: Path):
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        (tmp / "init_report.json").write_text(json.dumps({"backbone": str(backbone), **report.to_json()},
                                                         indent=2) + "\n")
        write_marker(tmp, "recformer-checkpoint")

    atomic_dir(Path(out), write)
    return report


# --------------------------------------------------------------------------------------------- path B
def _shared_rows(old_tok, new_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the tokens present in both vocabularies (same token string): (new ids, old ids)."""
    old_vocab = old_tok.get_vocab()
    shared = [(new_id, old_vocab[t]) for t, new_id in new_tok.get_vocab().items() if t in old_vocab]
    return (torch.tensor([n for n, _ in shared], dtype=torch.long),
            torch.tensor([o for _, o in shared], dtype=torch.long))


def _tokenizer(path: Path, option: str):
    """A local tokenizer directory, its files checked before it loads."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise LmrecError(f"{option} {path}: no such directory")
    check_tokenizer(path)
    with loading(path):
        return AutoTokenizer.from_pretrained(str(path))


def retokenize_checkpoint(checkpoint: str | Path, tokenizer_dir: str | Path, out: str | Path, seed: int = 0
                          ) -> dict:
    """Reuse a RecFormer checkpoint with another tokenizer: every tensor but the vocabulary-sized ones is
    loaded as is; the word embeddings and the MLM decoder/bias are resized to the new vocabulary, with the
    rows of tokens present in both vocabularies (same token string) copied and the others re-initialised
    (normal, std = initializer_range). Returns the report (also saved as ``retokenize_report.json``)."""
    checkpoint = Path(checkpoint)
    cfg, state = read_backbone(checkpoint)
    if cfg.get("model_type") != "recformer":
        raise LmrecError(f"{checkpoint} is not a RecFormer checkpoint (model_type {cfg.get('model_type')!r}); "
                         "for a backbone use `lmrec backbone init`")
    old_tok, new_tok = _tokenizer(checkpoint, "CHECKPOINT"), _tokenizer(Path(tokenizer_dir), "TOKENIZER")
    with loading(checkpoint):
        config = RecformerConfig.from_pretrained(str(checkpoint))
    config.vocab_size = len(new_tok)
    config.pad_token_id = new_tok.pad_token_id
    torch.manual_seed(seed)
    model = RecformerForPretraining(config)
    target = model.state_dict()
    new_idx, old_idx = _shared_rows(old_tok, new_tok)
    shared = new_idx.tolist()
    src = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    loaded, resized, reinit = [], [], []
    new_state = {}
    for name, tensor in target.items():
        got = src.get(name)
        if name == "lm_head.decoder.weight" and config.tie_word_embeddings:
            continue  # tied to the word embeddings
        if name in (WORD_EMB, "lm_head.bias", "lm_head.decoder.weight") and got is not None:
            t = tensor.clone()
            if len(shared):
                t[new_idx] = got[old_idx].to(t.dtype)
            new_state[name] = t
            resized.append(name)
        elif got is None:
            reinit.append(name)
        elif got.shape != tensor.shape:
            reinit.append(name)
        else:
            new_state[name] = got
            loaded.append(name)
    model.load_state_dict(new_state, strict=False)
    model.tie_weights()
    tokenizer = RecformerTokenizer(new_tok, config.max_attr_num, config.max_attr_length, config.max_token_num,
                                   config.max_item_embeddings)
    report = {"checkpoint": str(checkpoint), "tokenizer": str(tokenizer_dir), "old_vocab": len(old_tok),
              "new_vocab": len(new_tok), "rows_copied": len(shared), "rows_reinitialised": len(new_tok) - len(shared),
              "loaded": loaded, "resized": resized, "reinitialised": reinit,
              "unused": sorted(k for k in src if k not in target)}

    def write(tmp: Path):
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        (tmp / "retokenize_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_marker(tmp, "recformer-checkpoint")

    atomic_dir(Path(out), write)
    return report


# --------------------------------------------------------------------------------------------- convert
def _load_any_state(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        return read_backbone(path)[1]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        safetensors_header(path)  # a truncated file: one message naming it
        with loading(path):
            return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise LmrecError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LmrecError(f"{path}: expected a state dict (or a Lightning checkpoint with 'state_dict')")
    return obj


def detect_prefix(keys: list[str]) -> str:
    """The wrapper prefix in front of RecFormer's own names (``model.``, ``module.``, ...): whatever precedes
    ``longformer.embeddings.word_embeddings.weight`` or ``longformer.encoder.layer.0.``."""
    for anchor in ("longformer.embeddings.", "longformer.encoder.layer.0."):
        for k in keys:
            if anchor in k:
                return k[: k.index(anchor)]
    raise LmrecError("could not find RecFormer weights (no '*longformer.embeddings.*' key); give --strip-prefix")


def _config_for(checkpoint: Path, state: dict, config, backbone) -> tuple[RecformerConfig, Path]:
    """The RecFormer configuration of a checkpoint and the directory of its tokenizer: from ``config``, else
    the checkpoint directory, else built from ``backbone``."""
    cfg_dir = Path(config) if config else (checkpoint if (checkpoint.is_dir() and
                                                          (checkpoint / "config.json").exists()) else None)
    if cfg_dir is not None:
        check_format(cfg_dir)
        read_json(cfg_dir / "config.json")  # not JSON: one message naming it
        with loading(cfg_dir):
            return RecformerConfig.from_pretrained(str(cfg_dir)), cfg_dir
    if backbone is not None:
        shape = state.get("longformer.embeddings.item_position_embeddings.weight")
        tokens = {"max_item_embeddings": int(shape.shape[0])} if shape is not None else {}
        return build_recformer(backbone, **tokens)[0].config, Path(backbone)
    raise LmrecError(f"{checkpoint}: no config.json beside the weights; give --config DIR or --backbone DIR")


def convert_checkpoint(checkpoint: str | Path, out: str | Path, *, config: str | Path | None = None,
                       backbone: str | Path | None = None, strip_prefix: str | None = None,
                       restore_word_embeddings: bool = False, strict: bool = True) -> dict:
    """Pretraining checkpoint → ``OUT/encoder`` (``RecformerModel``) and ``OUT/recommender``
    (``RecformerForSeqRec``, usable as ``model.init`` for finetuning). The configuration and tokenizer come
    from ``config`` (a RecFormer directory), else from the checkpoint directory, else from ``backbone``
    through the backbone loader. ``restore_word_embeddings`` takes the word embeddings from ``backbone``
    (they were frozen during pretraining, or not saved). Strict: every encoder tensor must be present with
    its shape; tensors left over (MLM head) are reported."""
    checkpoint = Path(checkpoint)
    raw = _load_any_state(checkpoint)
    prefix = strip_prefix if strip_prefix is not None else detect_prefix(list(raw))
    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    rc, tok_dir = _config_for(checkpoint, state, config, backbone)
    notes: dict[str, str] = {}
    if restore_word_embeddings or WORD_EMB not in state:
        if backbone is None:
            raise LmrecError(f"{checkpoint} has no {WORD_EMB}" if WORD_EMB not in state else
                             "--restore-word-embeddings needs --backbone")
        bb = canonical_state(read_backbone(backbone)[1])
        state[WORD_EMB] = bb["embeddings.word_embeddings.weight"]
        notes[WORD_EMB] = f"restored from {backbone}"
    model = RecformerForSeqRec(rc)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(t.shape)}" for k, t in target.items()
             if k in state and state[k].shape != t.shape]
    leftover = sorted(k for k in state if k not in target)
    surprising = [k for k in leftover if not k.startswith("lm_head.")]
    if strict and (missing or wrong or surprising):
        raise LmrecError(f"{checkpoint} does not load strictly into RecFormer (prefix {prefix!r} stripped):\n  "
                         + "\n  ".join([f"missing: {k}" for k in missing] + [f"wrong size: {w}" for w in wrong]
                                       + [f"unexpected: {k}" for k in surprising])
                         + "\n(--strip-prefix sets the prefix; --no-strict loads what matches)")
    model.load_state_dict({k: state[k] for k in target if k in state and state[k].shape == target[k].shape},
                          strict=False)
    tokenizer = RecformerTokenizer.from_pretrained(tok_dir, rc)
    encoder = RecformerModel(rc)
    encoder.load_state_dict(model.longformer.state_dict())
    report = {"checkpoint": str(checkpoint), "prefix": prefix, "loaded": len(target) - len(missing) - len(wrong),
              "missing": missing, "wrong_size": wrong, "dropped": leftover, "notes": notes}

    def write(tmp: Path):
        encoder.save_pretrained(str(tmp / "encoder"))
        tokenizer.save_pretrained(tmp / "encoder")
        model.save_pretrained(str(tmp / "recommender"))
        tokenizer.save_pretrained(tmp / "recommender")
        (tmp / "convert_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for part in ("encoder", "recommender"):
            write_marker(tmp / part, "recformer-checkpoint")

    atomic_dir(Path(out), write)
    return report

"""Building RecFormer models for the training commands: from a saved recommender, a RecFormer checkpoint, a
backbone directory or the embedded default — and saving pretraining models. Shared by ``finetune``,
``pretrain`` and ``pretrain_mlm`` so that no recipe imports another."""

from __future__ import annotations

import json
from pathlib import Path

from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.io import atomic_dir
from lmrec.modelfiles import write_marker
from lmrec.recformer.backbones import build_default_backbone, build_recformer, resolve_backbone
from lmrec.recformer.recommender import Recommender

DEFAULT_WINDOW = 64  # the embedded default backbone's attention window (a backbone's own is kept)


def is_saved_recommender(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "items.parquet").exists()


def build_recommender(cfg, ds: PreparedDataset, run_dir: Path, accelerator, log=print) -> Recommender:
    """From ``model.init`` (a saved recommender, or a RecFormer checkpoint without a catalog such as the
    output of ``lmrec backbone init`` / ``lmrec checkpoint convert``), a backbone directory, or the embedded
    default."""
    m = cfg.model
    if is_saved_recommender(m.init):
        rec = Recommender.from_pretrained(m.init)
        rec.model.config.attention_impl = m.attention_impl  # how it is computed, not what: the run decides
        if rec.item_ids != ds.item_ids:
            rec.set_catalog(ds.item_ids, ds.item_text)
        return rec
    # the tokenizer sees the training items' text only: a new item (cold split) arrives as it would in serving
    backbone = backbone_or_default(m, ds.train_item_text(), run_dir, accelerator, cfg.train.seed, log)
    model, tokenizer = build_checked(backbone, log, max_token_num=m.max_token_num, max_attr_num=m.max_attr_num,
                                     max_attr_length=m.max_attr_length, max_item_embeddings=ds.max_history_len + 1,
                                     temperature=m.temperature, pooler_type=m.pooler_type,
                                     user_projection=m.user_projection, attention_window=m.attention_window,
                                     attention_impl=m.attention_impl)
    return Recommender(model, tokenizer, ds.item_ids, ds.item_text)


def build_checked(backbone: Path, log=print, **kwargs):
    """``build_recformer`` that stops when the backbone does not initialise RecFormer completely, and logs
    what was copied, derived and new."""
    model, tokenizer, report = build_recformer(backbone, **kwargs)
    own = _own_config(backbone)  # what the backbone or checkpoint says of itself, read once
    _say_replaced_window(own.get("attention_window"), kwargs.get("attention_window"), model.config.attention_window,
                         log)
    _say_replaced_temperature(own.get("temperature"), model.config.temperature, log)
    problems = report.problems()
    if problems:
        raise LmrecError(f"{backbone} does not initialise RecFormer completely ({', '.join(problems[:5])}"
                         f"{' ...' if len(problems) > 5 else ''}); see `lmrec backbone init {backbone} OUT`")
    log(f"initialised from {backbone}: " + ", ".join(f"{v} {k}" for k, v in report.counts().items() if v)
        + ("" if "lm_head.dense.weight" not in report.new else " (the MLM head is new: the backbone has none)"))
    return model, tokenizer


def _own_config(backbone: Path) -> dict:
    try:
        own = json.loads((Path(backbone) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return own if isinstance(own, dict) else {}


def _say_replaced_window(own, asked, got: list[int], log) -> None:
    """A window the config set explicitly, where the backbone has its own: said, never silent."""
    if asked is None:
        return
    own = [own] * len(got) if isinstance(own, int) else own
    if own and list(own) != list(got):
        theirs = own[0] if len(set(own)) == 1 else own
        log(f"model.attention_window={asked} replaces the backbone's attention window {theirs} (leave it unset to "
            "keep the backbone's)")


def _say_replaced_temperature(own, got: float, log) -> None:
    """A RecFormer checkpoint (e.g. ``lmrec pretrain``'s, at 0.05) finetuned at the run's temperature (0.1 by
    default): said, never silent."""
    if isinstance(own, (int, float)) and own != got:
        log(f"model.temperature={got:g} replaces the checkpoint's {own:g} (set model.temperature={own:g} to keep it)")


def backbone_or_default(m, item_text, run_dir: Path, accelerator, seed: int, log=print) -> Path:
    """``model.init``, else ``model.backbone`` (or $LMREC_BACKBONE / $MODEL_NAME_OR_PATH), else the embedded
    default built once in ``run_dir/backbone`` (its tokenizer trained on ``item_text``; a resumed run
    reuses it)."""
    backbone = Path(m.init) if m.init else resolve_backbone(m.backbone)
    if backbone is None:
        backbone = run_dir / "backbone"
        if accelerator.is_main_process and not (backbone / "config.json").exists():
            log(f"building the embedded default backbone in {backbone} (tokenizer trained on {len(item_text)} "
                "items' text)")
            texts = [" ".join(f"{k} {v}" for k, v in t) for t in item_text]
            w = m.attention_window
            window = DEFAULT_WINDOW if w is None else w if isinstance(w, int) else w[0]
            build_default_backbone(texts, backbone, hidden_size=m.default_hidden_size, layers=m.default_layers,
                                   heads=m.default_heads, vocab_size=m.default_vocab_size,
                                   max_positions=m.max_token_num, attention_window=window, seed=seed,
                                   dropout=m.default_dropout)
        accelerator.wait_for_everyone()
    return backbone


def save_pretraining_model(model, tokenizer, out: Path, extra: dict | None = None) -> Path:
    """A RecFormer checkpoint without a catalog (``pretrain``, ``pretrain-mlm``): what ``--init`` and
    ``--backbone`` accept."""
    def write(tmp: Path):
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "pretrain_info.json").write_text(json.dumps(extra, indent=2) + "\n")
        write_marker(tmp, "recformer-checkpoint")

    return atomic_dir(out, write)

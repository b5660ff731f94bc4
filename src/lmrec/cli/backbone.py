"""``lmrec backbone`` and ``lmrec checkpoint``: initialise RecFormer from a backbone, convert BERT/RoBERTa
to long, continued MLM; convert and retokenize checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from lmrec.cli.common import (
    OVERWRITE_HELP,
    RESUME_HELP,
    SET_HELP,
    _log,
    _overrides,
    _run_flags,
    backbone_app,
    ckpt_app,
)
from lmrec.training.distributed import is_main_rank


@backbone_app.command("init")
def backbone_init(
    backbone: Path = typer.Argument(..., help="Backbone directory (Longformer, Longformer_ZH, BERT, RoBERTa)."),
    out: Path = typer.Argument(..., help="Output directory for the initial RecFormer checkpoint."),
    max_token_num: int = typer.Option(1024, help="Longest flattened history (tokens)."),
    max_item_embeddings: int = typer.Option(51, help="Item-position rows (max history items + 1)."),
    max_attr_num: int = typer.Option(3, help="Attributes per item."),
    max_attr_length: int = typer.Option(32, help="Tokens per attribute."),
    attention_window: int = typer.Option(None, help="Local window (even) for every layer (default: the backbone's)."),
    allow_partial: bool = typer.Option(False, help="Write even when essential tensors are missing/mis-shaped."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List copied tensors too."),
):
    """Build the initial RecFormer checkpoint (encoder + MLM head) from a backbone, with a tensor report."""
    from lmrec.cli.report import print_init_report
    from lmrec.recformer.checkpoints import init_checkpoint

    report = init_checkpoint(backbone, out, allow_partial=allow_partial, max_token_num=max_token_num,
                             max_item_embeddings=max_item_embeddings, max_attr_num=max_attr_num,
                             max_attr_length=max_attr_length, attention_window=attention_window)
    print_init_report(report, verbose=verbose)
    typer.echo(f"wrote {out}" + ("" if report.ok else " (partial: see the report)"))


@backbone_app.command("convert-to-long")
def backbone_convert_to_long(
    src: Path = typer.Argument(..., help="A BERT / RoBERTa / MiniLM checkpoint directory."),
    dst: Path = typer.Argument(..., help="Output directory."),
    max_positions: int = typer.Option(4096, help="Positions of the long model."),
    attention_window: int = typer.Option(512, help="Local attention window (even), every layer."),
):
    """Extend positions by tiling the learned rows and add global q/k/v copied from the local ones."""
    from lmrec.recformer.backbones import convert_to_long

    convert_to_long(src, dst, max_positions=max_positions, attention_window=attention_window, log=typer.echo)


@backbone_app.command("pretrain-mlm")
def backbone_pretrain_mlm(
    backbone: Path = typer.Argument(..., help="Backbone directory (Longformer, Longformer_ZH, BERT/RoBERTa-long, "
                                              "RecFormer checkpoint)."),
    train: Path = typer.Option(..., help="Training text, one document per line (English or Chinese)."),
    valid: Path = typer.Option(..., help="Validation text, one document per line."),
    output_dir: Path = typer.Option(..., help="Run directory (model/, mlm_report.json, logs/, checkpoints/)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (train.* keys)."),
    resume_from: str = typer.Option(None, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, the same as --set.", hidden=True),
):
    """Continued MLM pretraining with whole-word masking (jieba words for Chinese); reports validation
    perplexity and bits per character before training and after each epoch."""
    from rich.console import Console
    from rich.table import Table

    from lmrec.config import MlmRunConfig, load_config
    from lmrec.recformer.pretrain_mlm import pretrain_mlm

    ov = [f"output_dir={output_dir}", *_run_flags(resume_from, overwrite)]
    cfg = load_config(config, ov + _overrides(sets, overrides), schema=MlmRunConfig)
    r = pretrain_mlm(backbone, train, valid, cfg, log=_log)
    if not is_main_rank():
        return
    table = Table(title=f"validation MLM ({valid})")
    for c in ("epoch", "BPC", "perplexity", "train loss"):
        table.add_column(c, justify="right")
    table.add_row("before", f"{r['before']['bpc']:.3f}", f"{r['before']['perplexity']:.1f}", "")
    for h in r["history"]:
        table.add_row(str(h["epoch"]), f"{h['valid_bpc']:.3f}", f"{h['valid_perplexity']:.1f}", f"{h['loss']:.3f}")
    Console().print(table)
    typer.echo(f"best model (epoch {r['best_epoch']}) in {r['model_dir']}")


@ckpt_app.command("convert")
def checkpoint_convert(
    checkpoint: Path = typer.Argument(..., help="Pretraining checkpoint: an lmrec directory, a Lightning .ckpt, "
                                                 "or a state dict (.bin/.pt/.safetensors)."),
    out: Path = typer.Argument(..., help="Output directory (gets encoder/ and recommender/)."),
    backbone: Path = typer.Option(None, help="The backbone pretraining started from (config/tokenizer when the "
                                             "checkpoint has none; source of restored word embeddings)."),
    config: Path = typer.Option(None, help="A RecFormer directory whose config.json and tokenizer to use."),
    strip_prefix: str = typer.Option(None, help="Key prefix to strip (default: detected, e.g. 'model.')."),
    restore_word_embeddings: bool = typer.Option(False, help="Take word embeddings from --backbone (they were "
                                                             "frozen in pretraining)."),
    strict: bool = typer.Option(True, help="Fail on missing / mis-shaped / unexpected encoder tensors."),
):
    """Pretraining checkpoint → encoder-only weights and a recommender checkpoint (strict, with a report)."""
    from lmrec.recformer.checkpoints import convert_checkpoint

    r = convert_checkpoint(checkpoint, out, config=config, backbone=backbone, strip_prefix=strip_prefix,
                           restore_word_embeddings=restore_word_embeddings, strict=strict)
    typer.echo(f"prefix {r['prefix']!r} stripped; {r['loaded']} tensors loaded, {len(r['missing'])} missing, "
               f"{len(r['wrong_size'])} wrong size, {len(r['dropped'])} dropped (MLM head)")
    for k, v in r["notes"].items():
        typer.echo(f"  {k}: {v}")
    typer.echo(f"wrote {out / 'encoder'} and {out / 'recommender'}")


@ckpt_app.command("retokenize")
def checkpoint_retokenize(
    checkpoint: Path = typer.Argument(..., help="A RecFormer checkpoint directory."),
    tokenizer: Path = typer.Argument(..., help="Directory of the new tokenizer."),
    out: Path = typer.Argument(..., help="Output directory."),
):
    """Path B: reuse a RecFormer checkpoint with another tokenizer (embeddings and MLM decoder resized)."""
    from lmrec.recformer.checkpoints import retokenize_checkpoint

    r = retokenize_checkpoint(checkpoint, tokenizer, out)
    typer.echo(f"vocabulary {r['old_vocab']} → {r['new_vocab']}: {r['rows_copied']} rows copied (same token), "
               f"{r['rows_reinitialised']} re-initialised")
    typer.echo(f"resized: {', '.join(r['resized'])}")
    typer.echo(f"re-initialised tensors: {', '.join(r['reinitialised']) or 'none'}; {len(r['loaded'])} loaded as is")
    typer.echo(f"wrote {out}")

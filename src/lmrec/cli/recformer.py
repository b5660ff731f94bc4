"""RecFormer's commands: ``finetune``, ``pretrain``, ``evaluate``, ``recommend``, ``recommend-all``,
``doctor`` (``evaluate`` and the ``recommend`` commands take an ID baseline's model too)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmrec.cli.common import (
    BACKBONE_HELP,
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
    app,
)
from lmrec.cli.report import print_metrics, print_recommendations
from lmrec.errors import LmrecError


@app.command()
def finetune(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    data: Path = typer.Option(None, help="Prepared dataset directory (overrides data.path)."),
    output_dir: Path = typer.Option(None, help="Run directory (model/, metrics.json, logs/, checkpoints/; default "
                                               "runs/recformer). Same as --set output_dir=DIR."),
    backbone: str = typer.Option(None, help=BACKBONE_HELP + " Same as --set model.backbone=PATH."),
    init: str = typer.Option(None, help="Start from a RecFormer checkpoint (saved recommender, `backbone init` "
                                        "or `checkpoint convert` output). Same as --set model.init=DIR."),
    resume_from: str = typer.Option(None, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, the same as --set.", hidden=True),
):
    """Two-stage RecFormer finetuning with validation, early stopping and a final test evaluation.
    Checkpoints go to OUTPUT_DIR/checkpoints/ at each epoch end (and every train.save_steps steps)."""
    from lmrec.config import load_config
    from lmrec.recformer.finetune import finetune as run

    extra = ([f"model.backbone={backbone}"] if backbone else []) + ([f"model.init={init}"] if init else [])
    extra += ([f"output_dir={output_dir}"] if output_dir else []) + _run_flags(resume_from, overwrite)
    cfg = load_config(config, extra + _overrides(sets, overrides))
    path = data or cfg.data.path
    if path is None:
        raise LmrecError("no dataset: give --data DIR or data.path in the config (see `lmrec data prepare`)")
    result = run(cfg, path, log=_log)
    _report(result.metrics, f"{path}: test split, full ranking", result.model_dir, result.run_dir)


@app.command()
def pretrain(
    data: list[Path] = typer.Option(None, help="Prepared dataset of the corpus (repeat for several domains; "
                                               "overrides data.paths)."),
    valid: Path = typer.Option(None, help="Prepared dataset for zero-shot validation (default: the first --data)."),
    output_dir: Path = typer.Option(None, help="Run directory (model/, metrics.json, logs/, checkpoints/)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML pretraining config."),
    backbone: str = typer.Option(None, help=BACKBONE_HELP + " Same as --set model.backbone=PATH."),
    init: str = typer.Option(None, help="Continue from a RecFormer checkpoint. Same as --set model.init=DIR."),
    resume_from: str = typer.Option(None, help=RESUME_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, the same as --set.", hidden=True),
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
    cfg = load_config(config, ov + _overrides(sets, overrides), schema=PretrainRunConfig)
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
    """Full-ranking metrics of a saved recommender (items it never saw are encoded on the fly), next to
    popularity and the expected metrics of a random ranking (among new items: random only)."""
    from lmrec.api import evaluate as run
    from lmrec.api import model_label

    r = run(model, data, split=split, exclude_history=exclude_history, ks=_ks(ks), candidates=candidates,
            with_baselines=True, device=device)
    print_metrics(r, title=f"{data} ({split}" + (", new items only)" if candidates == "new" else ")"),
                  model_name=model_label(model))


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

"""The ``lmrec`` command line. Each subcommand parses its options, loads config and calls the library.

A :class:`~lmrec.errors.LmrecError` (bad file, bad config, unknown id) is printed as one message and exits
with code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from lmrec.cli.report import print_metrics, print_recommendations
from lmrec.errors import LmrecError

app = typer.Typer(help="lmrec: sequential recommendation with pretrained language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


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


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("runs/quickstart"), help="Run directory."),
    backbone: str = typer.Option(None, help="Local backbone directory (default: $LMREC_BACKBONE, else the "
                                            "embedded default)."),
    split: str = typer.Option("loo", help="loo | cold"),
    override: list[str] = typer.Option(None, "--set", help="Config override key.sub=value (repeatable)."),
):
    """Prepare MovieLens-100k, finetune RecFormer, evaluate on test, and compare with popularity."""
    from lmrec.api import finetune, prepare

    data = output_dir / "data" / f"ml-100k-{split}"
    if not (data / "manifest.json").exists():
        prepare("ml-100k", data, split=split, log=_log)
    _log(f"dataset: {data}")
    ov = [f"model.backbone={backbone}"] if backbone else []
    result = finetune(data, output_dir=output_dir, overrides=ov + list(override or []), log=_log)
    print_metrics(result.metrics, title=f"MovieLens-100k ({split}), test split, full ranking")
    typer.echo(f"wall time {result.metrics['wall_time_s']:.0f} s; metrics in {result.run_dir / 'metrics.json'}; "
               f"model in {result.model_dir}")


@app.command()
def finetune(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    data: Path = typer.Option(None, help="Prepared dataset directory (overrides data.path)."),
    overrides: list[str] = typer.Argument(None, help="Overrides like train.lr=1e-4 model.backbone=/path."),
):
    """Two-stage RecFormer finetuning with validation, early stopping and a final test evaluation."""
    from lmrec.config import load_config
    from lmrec.recformer.finetune import finetune as run

    cfg = load_config(config, overrides)
    path = data or cfg.data.path
    if path is None:
        raise LmrecError("no dataset: give --data DIR or data.path in the config (see `lmrec data prepare`)")
    result = run(cfg, path, log=_log)
    print_metrics(result.metrics, title=f"{path}: test split, full ranking")
    typer.echo(f"model in {result.model_dir}; metrics in {result.run_dir / 'metrics.json'}")


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="A saved recommender directory."),
    data: Path = typer.Option(..., help="A prepared dataset directory."),
    split: str = typer.Option("test", help="test | valid"),
    exclude_history: bool = typer.Option(False, help="Never rank a user's history items."),
    ks: str = typer.Option("10,20,50", help="Cut-offs."),
):
    """Full-ranking metrics of a saved recommender (items it never saw are encoded on the fly)."""
    from lmrec.api import evaluate as run

    metrics = run(model, data, split=split, exclude_history=exclude_history, ks=[int(k) for k in ks.split(",")])
    print_metrics({"test": metrics}, title=f"{data} ({split})")


@app.command()
def recommend(
    model: Path = typer.Option(..., help="A saved recommender directory."),
    history: str = typer.Option(..., help="Item ids, oldest first, comma separated."),
    k: int = typer.Option(10, "-k", help="How many items."),
    include_history: bool = typer.Option(False, help="Allow items of the history in the list."),
):
    """Rank all items for a history and print the top k with their text and scores."""
    from lmrec.api import recommend as run

    ids = [h.strip() for h in history.split(",") if h.strip()]
    print_recommendations(run(model, ids, k, exclude_history=not include_history))


def main() -> None:
    try:
        app()
    except LmrecError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        sys.exit(130)


if __name__ == "__main__":
    main()

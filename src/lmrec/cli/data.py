"""``lmrec data``: prepare a dataset from interaction logs and item text."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmrec.cli.common import (
    _log,
    data_app,
)


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="'ml-100k', a RecBole .inter file, an Amazon reviews .json(l) file "
                                           "or an interaction table (.csv/.tsv/.jsonl/.parquet)."),
    out: Path = typer.Argument(None, help="Output directory (default: data/<source name>)."),
    fmt: str = typer.Option("auto", "--format", help="auto | recbole | amazon | table"),
    items: Path = typer.Option(None, help="Item metadata file (.item, Amazon meta, or a table)."),
    user_col: str = typer.Option("user_id", help="User column."),
    item_col: str = typer.Option("item_id", help="Item column."),
    time_col: str = typer.Option("timestamp", help="Timestamp column: numbers, or ISO 8601 date/times such as "
                                                   "2024-03-01T12:00:00Z."),
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

    manifest = json.loads((path / "manifest.json").read_text())
    typer.echo(f"prepared {path}  (source: {manifest['source']})")
    typer.echo(json.dumps(manifest["counts"], indent=2))

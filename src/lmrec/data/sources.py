"""Dataset sources: RecBole atomic files, Amazon Reviews 2018, generic tables, and MovieLens-100k.

MovieLens-100k is obtained, in this order, from an installed ``recbole`` package, from the recbole wheel
fetched from the package index without its dependencies (only ``recbole/dataset_example/ml-100k/`` is
extracted), or from the GroupLens archive. Row counts are verified against the published ones.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lmrec.data.readers import (
    RawData,
    join_items,
    parse_text_columns,
    read_delimited,
    read_interactions,
    read_item_text,
    read_jsonl,
    text_value,
)
from lmrec.errors import DataError, LmrecError

ML100K_COUNTS = {"interactions": 100_000, "users": 943, "items": 1682}
ML100K_TEXT = ["title=movie_title", "year=release_year", "genres=class"]
RECBOLE_WHEEL = "recbole==1.2.1"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def cache_dir() -> Path:
    return Path(os.environ.get("LMREC_CACHE", Path.home() / ".cache" / "lmrec"))


# --------------------------------------------------------------------------------------------- RecBole
def load_recbole(
    inter_path: str | Path,
    item_path: str | Path,
    text: list[str] | None = None,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    source: str | None = None,
) -> RawData:
    """RecBole atomic files. Typed headers (``name:type``) are reduced to their names; ``text`` lists the
    item attributes as ``KEY=COLUMN`` (default: every token/token_seq column of the .item file but the id)."""
    inter_path, item_path = Path(inter_path), Path(item_path)
    if text is None:
        header, _ = read_delimited(item_path, "\t")
        text = [n for n, _, t in (h.partition(":") for h in header) if n != item_col and t in ("token", "token_seq")]
    users, items, times, rows = read_interactions(inter_path, user_col, item_col, time_col)
    item_text = read_item_text(item_path, item_col, parse_text_columns(text))
    return join_items(users, items, times, item_text, inter_path=inter_path, drop_unknown=False, rows=rows,
                      item_col=item_col,
                      source=source or f"recbole atomic files {inter_path}")


# --------------------------------------------------------------------------------------------- generic
def load_generic(
    inter_path: str | Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    text: list[str],
    items_path: str | Path | None = None,
    items_id_col: str | None = None,
    drop_unknown_items: bool = False,
) -> RawData:
    """CSV/TSV/JSONL/Parquet interactions with a column mapping; item text from ``items_path`` or, when it
    is absent, from the interaction rows themselves (the first row of each item)."""
    inter_path = Path(inter_path)
    users, items, times, rows = read_interactions(inter_path, user_col, item_col, time_col)
    if items_path is not None:
        item_text = read_item_text(items_path, items_id_col or item_col, parse_text_columns(text))
    else:
        item_text = _item_text_from_interactions(inter_path, item_col, text)
    return join_items(users, items, times, item_text, inter_path=inter_path, drop_unknown=drop_unknown_items,
                      rows=rows, item_col=item_col,
                      source=f"table {inter_path}")


def _item_text_from_interactions(path: Path, item_col: str, text: list[str]):
    from lmrec.data.readers import cell_str, read_table

    cols = parse_text_columns(text)
    header, rows = read_table(path)
    if header is not None:
        missing = [c for c, _ in cols if c not in header]
        if missing:
            raise DataError(f"missing text column(s) {missing}", file=path, row=1, column=missing[0])
    out = {}
    for row in rows:
        item = cell_str(path, row, item_col)
        if item not in out:
            out[item] = [(key, text_value(row.values.get(col))) for col, key in cols]
    return out


# --------------------------------------------------------------------------------------------- Amazon
def load_amazon(reviews_path: str | Path, meta_path: str | Path) -> RawData:
    """Amazon Reviews 2018 (the files RecFormer's ``process.py`` reads). Reviews of items without meta are
    dropped and counted, as RecFormer does; item text is title, brand, category (list joined by spaces)."""
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    users, items, times = [], [], []
    from lmrec.data.readers import cell_str, cell_time

    for row in read_jsonl(reviews_path):
        for c in ("reviewerID", "asin", "unixReviewTime"):
            if c not in row.values:
                raise DataError(f"missing field '{c}'", file=reviews_path, row=row.number, column=c)
        users.append(cell_str(reviews_path, row, "reviewerID"))
        items.append(cell_str(reviews_path, row, "asin"))
        times.append(cell_time(reviews_path, row, "unixReviewTime"))
    if not users:
        raise DataError("no reviews found", file=reviews_path)
    item_text: dict[str, list[tuple[str, str]]] = {}
    for row in read_jsonl(meta_path):
        if "asin" not in row.values:
            raise DataError("missing field 'asin'", file=meta_path, row=row.number, column="asin")
        asin = cell_str(meta_path, row, "asin")
        if asin in item_text:
            continue  # the 2018 meta files repeat some products verbatim
        item_text[asin] = [(k, text_value(row.values.get(k))) for k in ("title", "brand", "category")]
    return join_items(users, items, times, item_text, inter_path=reviews_path, drop_unknown=True,
                      source=f"amazon-2018 {reviews_path}")


# --------------------------------------------------------------------------------------------- ml-100k
def _ml100k_from_recbole_package() -> Path | None:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    return d if (d / "ml-100k.inter").exists() else None


def _ml100k_from_wheel(dest: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="lmrec-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, RECBOLE_WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if res.returncode != 0 or not wheels:
            said = "; ".join(line.strip() for line in res.stderr.splitlines() if line.strip())  # one line
            raise LmrecError(f"pip download {RECBOLE_WHEEL} failed: {said[-300:]}")
        _extract(wheels[0], "recbole/dataset_example/ml-100k/", dest)
    return dest


def _extract(archive: Path, prefix: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                (tmp / Path(name).name).write_bytes(z.read(name))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _ml100k_from_grouplens(dest: Path) -> Path:
    """The original archive (u.data, u.item) rewritten as RecBole atomic files."""
    import urllib.request

    with tempfile.TemporaryDirectory(prefix="lmrec-ml100k-") as tmp:
        archive = Path(tmp) / "ml-100k.zip"
        urllib.request.urlretrieve(GROUPLENS_URL, archive)  # noqa: S310 - fixed https URL
        raw = Path(tmp) / "raw"
        _extract(archive, "ml-100k/u.", raw)
        part = dest.with_name(dest.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
        lines += ["\t".join(r.split("\t")) for r in (raw / "u.data").read_text().splitlines() if r]
        (part / "ml-100k.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
        lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        for r in (raw / "u.item").read_text(encoding="latin-1").splitlines():
            f = r.split("|")
            title, year = f[1], f[2][-4:] if f[2] else ""
            if title.endswith(")") and "(" in title:  # "Toy Story (1995)" → "Toy Story" as RecBole does
                title = title[: title.rfind("(")].strip()
            genres = " ".join(g for g, flag in zip(GENRES, f[5:]) if flag == "1")
            lines.append(f"{f[0]}\t{title}\t{year}\t{genres}")
        (part / "ml-100k.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)
    return dest


def obtain_ml100k(log=print) -> tuple[Path, str]:
    """Return (directory with ml-100k.inter/.item, source description)."""
    d = _ml100k_from_recbole_package()
    if d is not None:
        return d, f"installed recbole package ({d})"
    from filelock import FileLock  # installed with transformers (through huggingface_hub)

    cache_dir().mkdir(parents=True, exist_ok=True)
    # processes that prepare at once (the test suite's workers, two commands) fetch it once, in turn: the
    # fetch replaces the cache directory, which would pull it from under another process's feet
    with FileLock(str(cache_dir() / "ml-100k.lock")):
        return _cached_or_fetched(log)


def _cached_or_fetched(log) -> tuple[Path, str]:
    cached = cache_dir() / "ml-100k"
    if (cached / "ml-100k.inter").exists():
        return cached, (cached / "SOURCE").read_text().strip() if (cached / "SOURCE").exists() else str(cached)
    errors = []
    for name, fetch in (("recbole wheel from the package index", _ml100k_from_wheel),
                        ("GroupLens archive", _ml100k_from_grouplens)):
        try:
            log(f"fetching MovieLens-100k from the {name} ...")
            fetch(cached)
            source = f"{name} ({RECBOLE_WHEEL if 'wheel' in name else GROUPLENS_URL})"
            (cached / "SOURCE").write_text(source + "\n")
            return cached, source
        except Exception as e:  # try the next source
            errors.append(f"{name}: {e}")
    raise LmrecError("could not obtain MovieLens-100k:\n  " + "\n  ".join(errors))


def load_ml100k(log=print) -> RawData:
    d, source = obtain_ml100k(log)
    raw = load_recbole(d / "ml-100k.inter", d / "ml-100k.item", ML100K_TEXT, source=source)
    got = {"interactions": len(raw.users), "users": len(set(raw.users)), "items": len(set(raw.items))}
    if got != ML100K_COUNTS:
        raise DataError(f"unexpected row counts {got} (expected {ML100K_COUNTS}); the copy may be damaged",
                        file=d)
    return raw

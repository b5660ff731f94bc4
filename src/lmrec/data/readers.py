"""Readers that turn source files into :class:`RawData` (interactions + ordered item text).

Supported layouts:

* RecBole atomic files: ``.inter`` / ``.item`` with typed headers such as ``item_id:token`` and
  ``movie_title:token_seq`` (tab separated, see RecBole's "Atomic Files" documentation);
* generic tables (CSV, TSV, JSON lines, Parquet) with a column mapping;
* the Amazon Reviews 2018 layout used by RecFormer's scripts: reviews JSON lines with ``reviewerID``,
  ``asin``, ``unixReviewTime`` and meta JSON lines with ``asin``, ``title``, ``brand``, ``category``.

Every reader validates at the boundary: a bad row raises :class:`DataError` naming file, row and column.
Row numbers are 1-based lines of the file (a CSV header is row 1); for Parquet they are 1-based data rows.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmrec.errors import DataError

ItemText = list[tuple[str, str]]  # ordered (key, value) pairs


@dataclass
class RawData:
    """Interactions in source-file order and the text of every item."""

    users: list[str]
    items: list[str]
    timestamps: list[float]
    item_text: dict[str, ItemText]
    source: str
    notes: dict[str, int] = field(default_factory=dict)  # e.g. rows dropped, with why


@dataclass
class Row:
    number: int  # 1-based row number as the user sees it in the file
    values: dict[str, object]


# --------------------------------------------------------------------------------------------- files
def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError("file not found", file=path)
    if path.is_dir():
        raise DataError("expected a file, found a directory", file=path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"bytes {data[e.start:e.end]!r} at offset {e.start} are not valid UTF-8 (expected UTF-8 text)"
            + _encoding_hint(data, path),
            file=path,
            row=line,
        ) from None
    if not text.strip():
        raise DataError("the file is empty (expected a header and at least one row)", file=path)
    return text


def _encoding_hint(data: bytes, path: Path) -> str:
    """How to convert a file that is not UTF-8, when it reads as Chinese in GB18030 (a superset of GBK and
    GB2312, what Excel and many Chinese Windows tools save)."""
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        return ""
    if not any("\u4e00" <= ch <= "\u9fff" for ch in text):
        return ""
    return (f"; it reads as Chinese in GBK/GB18030: convert it to UTF-8, e.g. `iconv -f GB18030 -t UTF-8 "
            f"{path.name} > {path.stem}.utf8{path.suffix}`")


def _require_columns(path: Path, present: Sequence[str], needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(map(repr, missing))}; the file has {', '.join(map(repr, present))}",
            file=path,
            row=1,
            column=missing[0],
        )


def read_delimited(path: Path, delimiter: str, *, typed_header: bool = False) -> tuple[list[str], Iterator[Row]]:
    """CSV/TSV with a header row. Returns the header and an iterator over rows.

    ``typed_header``: RecBole atomic headers (``item_id:token``) are reduced to the names (``item_id``).
    """
    text = _read_text(path)
    # no field can be longer than the file: the csv module's default limit (128 KiB) would stop at a long
    # product description, which JSONL and Parquet accept
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    quoting = csv.QUOTE_NONE if typed_header else csv.QUOTE_MINIMAL  # atomic files have no quoting
    reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    header = [h.strip() for h in next(reader)]
    if typed_header:
        header = [h.partition(":")[0] for h in header]

    def rows() -> Iterator[Row]:
        for number, cells in enumerate(reader, start=2):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"expected {len(header)} fields like the header, found {len(cells)}", file=path, row=number
                )
            yield Row(number, dict(zip(header, cells)))

    return header, rows()


def read_jsonl(path: Path) -> Iterator[Row]:
    """JSON lines: one object per line."""
    text = _read_text(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg}); expected one JSON object per line", file=path,
                            row=number) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, found {type(obj).__name__}", file=path, row=number)
        yield Row(number, obj)


def read_parquet(path: Path) -> tuple[list[str], Iterator[Row]]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError("file not found", file=path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot be read as Parquet ({e})", file=path) from None
    if table.num_rows == 0:
        raise DataError("the file is empty (expected at least one row)", file=path)
    columns = table.column_names

    def rows() -> Iterator[Row]:
        for number, rec in enumerate(table.to_pylist(), start=1):
            yield Row(number, rec)

    return columns, rows()


def read_table(path: str | Path) -> tuple[list[str] | None, Iterator[Row]]:
    """Any supported table by extension; the header is None for JSON lines (columns vary per row)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_delimited(path, ",")
    if suffix in (".tsv", ".txt"):
        return read_delimited(path, "\t")
    if suffix in (".inter", ".item", ".user"):
        return read_delimited(path, "\t", typed_header=True)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return None, read_jsonl(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError(f"unknown file type '{suffix}' (expected .csv, .tsv, .jsonl, .json or .parquet)", file=path)


# --------------------------------------------------------------------------------------------- cells
def cell_str(path: Path, row: Row, column: str, *, required: bool = True) -> str:
    value = row.values.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError("missing value (expected a non-empty id)", file=path, row=row.number, column=column)
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


TIME_FORMATS = "a number (e.g. Unix seconds) or an ISO 8601 date/time (e.g. 2023-11-14T22:13:20Z, 2023-11-14)"


def _iso_seconds(value: object) -> float | None:
    """Seconds since the Unix epoch of an ISO 8601 date/time (a string, or a datetime/date that Parquet
    gives); one without a zone is read as UTC. None when it is not one."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        value = datetime.datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


def cell_time(path: Path, row: Row, column: str) -> float:
    """A timestamp: a number, or an ISO 8601 date/time (only the order of a user's events matters)."""
    value = row.values.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"missing timestamp (expected {TIME_FORMATS})", file=path, row=row.number, column=column)
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = _iso_seconds(value)
        if t is None:
            raise DataError(f"timestamp {value!r} is not {TIME_FORMATS}", file=path, row=row.number,
                            column=column) from None
    if not math.isfinite(t):
        raise DataError(f"timestamp {value!r} is not finite", file=path, row=row.number, column=column)
    return t


def text_value(value: object) -> str:
    """Item attribute → text. Lists (Amazon categories, RecBole token_seq) are joined with spaces."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(text_value(v) for v in value if v is not None).strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# --------------------------------------------------------------------------------------------- builders
def read_interactions(
    path: str | Path, user_col: str, item_col: str, time_col: str
) -> tuple[list[str], list[str], list[float], list[int]]:
    """(users, items, timestamps, row numbers) of an interaction table."""
    path = Path(path)
    header, rows = read_table(path)
    if header is not None:
        _require_columns(path, header, [user_col, item_col, time_col])
    users, items, times, numbers = [], [], [], []
    for row in rows:
        if header is None:
            _require_row_keys(path, row, [user_col, item_col, time_col])
        users.append(cell_str(path, row, user_col))
        items.append(cell_str(path, row, item_col))
        times.append(cell_time(path, row, time_col))
        numbers.append(row.number)
    if not users:
        raise DataError("no interactions found (expected at least one row)", file=path)
    return users, items, times, numbers


def _require_row_keys(path: Path, row: Row, needed: Sequence[str]) -> None:
    for c in needed:
        if c not in row.values:
            raise DataError(f"missing field '{c}'", file=path, row=row.number, column=c)


def read_item_text(
    path: str | Path, item_col: str, text_cols: Sequence[tuple[str, str]]
) -> dict[str, ItemText]:
    """Item table → {item id: [(key, value), ...]} in the order of ``text_cols`` ((column, key) pairs).

    Duplicated item ids are an error: the text of an item must be unambiguous.
    """
    path = Path(path)
    header, rows = read_table(path)
    if header is not None:
        _require_columns(path, header, [item_col, *[c for c, _ in text_cols]])
    out: dict[str, ItemText] = {}
    first_row: dict[str, int] = {}
    for row in rows:
        if header is None:
            _require_row_keys(path, row, [item_col])
        item = cell_str(path, row, item_col)
        if item in out:
            raise DataError(
                f"duplicated item id {item!r} (first seen in row {first_row[item]}; expected each id once)",
                file=path, row=row.number, column=item_col,
            )
        first_row[item] = row.number
        out[item] = [(key, text_value(row.values.get(col))) for col, key in text_cols]
    if not out:
        raise DataError("no items found (expected at least one row)", file=path)
    return out


def join_items(
    users: list[str],
    items: list[str],
    times: list[float],
    item_text: dict[str, ItemText],
    *,
    inter_path: Path,
    drop_unknown: bool,
    source: str,
    rows: list[int] | None = None,
    item_col: str | None = None,
) -> RawData:
    """Check that every interacted item has text; drop (and count) or raise on unknown ones (naming the
    first one's row of ``inter_path`` when ``rows`` gives the row numbers)."""
    keep = [i for i, it in enumerate(items) if it in item_text]
    dropped = len(items) - len(keep)
    if dropped and not drop_unknown:
        first = next(i for i, it in enumerate(items) if it not in item_text)
        raise DataError(
            f"item id {items[first]!r} has no entry in the item file "
            f"({dropped} interaction(s) affected; expected every item to have metadata)",
            file=inter_path, row=rows[first] if rows else None, column=item_col,
        )
    if dropped:
        users = [users[i] for i in keep]
        items = [items[i] for i in keep]
        times = [times[i] for i in keep]
    if not users:
        raise DataError("no interaction refers to an item with metadata", file=inter_path)
    notes = {"interactions_without_item_text_dropped": dropped} if dropped else {}
    return RawData(users, items, times, item_text, source, notes)


def parse_text_columns(spec: Sequence[str]) -> list[tuple[str, str]]:
    """``["title=movie_title", "brand"]`` → ``[("movie_title", "title"), ("brand", "brand")]``.

    Each entry is ``KEY=COLUMN`` (the text key shown to the model, read from that column) or a bare column
    name used as its own key. The order is the order of the attributes in the item text.
    """
    out = []
    for s in spec:
        key, sep, col = s.partition("=")
        if not sep:
            col = key
        out.append((col.strip(), key.strip()))
    return out

"""Chat training data in OpenOneRec's unified parquet format (one row per sample), read and written exactly.

| column | type | meaning |
| --- | --- | --- |
| ``uuid`` | str | unique within the dataset |
| ``source`` | str | data source name (per-source counts and losses are reported by it) |
| ``metadata`` | str | a JSON object (``"{}"`` when there is none) |
| ``messages`` | str | a JSON array of turns ``{"role": "system"|"user"|"assistant", "content": [parts]}``, parts |
|              |     | ``{"type": "text", "text": …}``; a plain string as ``content`` is accepted too |
| ``segments`` | str | a JSON array of ``{"type": "text", "text": …}``: plain pretraining text |

A row has ``messages`` (a conversation; the loss is on the assistant replies) or ``segments`` (plain text;
the loss is on every token). Other columns (``images``, ``videos``, ``text``, ``label``, …) are not read.
Files hold about 1,000 rows each, named ``part-00000-of-00010.parquet``, listed in ``file_list.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmrec.errors import DataError

ROLES = ("system", "user", "assistant")
FILE_LIST = "file_list.json"
SCHEMA = pa.schema([("uuid", pa.string()), ("source", pa.string()), ("metadata", pa.string()),
                    ("messages", pa.string()), ("segments", pa.string())])


@dataclass
class ChatRow:
    """One sample: a conversation (``messages``, contents as plain strings) or plain text (``segments``)."""

    uuid: str
    source: str
    messages: list[dict[str, str]] | None = None
    segments: list[str] | None = None
    metadata: dict = field(default_factory=dict)

    def to_record(self) -> dict[str, str | None]:
        """The parquet row, in OpenOneRec's canonical form (contents as lists of text parts)."""
        msgs = None if self.messages is None else json.dumps(
            [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in self.messages],
            ensure_ascii=False)
        segs = None if self.segments is None else json.dumps(
            [{"type": "text", "text": t} for t in self.segments], ensure_ascii=False)
        return {"uuid": self.uuid, "source": self.source, "metadata": json.dumps(self.metadata, ensure_ascii=False),
                "messages": msgs, "segments": segs}


def _json_column(raw: dict, column: str, file, row: int):
    value = raw.get(column)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a JSON string, found {type(value).__name__}", file=file, row=row, column=column)
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at character {e.pos})", file=file, row=row, column=column) from None


def _text_parts(parts, file, row: int, column: str, where: str) -> str:
    """A content (a string, or a list of ``{"type": "text", "text": …}``) → its text."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise DataError(f"{where}: expected a string or a list of text parts, found {type(parts).__name__}",
                        file=file, row=row, column=column)
    texts = []
    for j, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise DataError(f"{where}, part {j}: expected {{\"type\": \"text\", \"text\": ...}}, found a part of type "
                            f"{kind!r} (only text is read)", file=file, row=row, column=column)
        texts.append(p["text"])
    return "".join(texts)


def parse_row(raw: dict, file: str | Path, row: int) -> ChatRow:
    """Validate one parquet row (1-based ``row`` for messages) and normalise it to a :class:`ChatRow`."""
    messages = _json_column(raw, "messages", file, row)
    segments = _json_column(raw, "segments", file, row)
    if messages is None and segments is None:
        raise DataError("neither 'messages' nor 'segments' (expected one of them)", file=file, row=row)
    out = ChatRow(str(raw.get("uuid") or f"{Path(file).name}:{row}"), str(raw.get("source") or "default"))
    meta = _json_column(raw, "metadata", file, row)
    out.metadata = meta if isinstance(meta, dict) else {}
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise DataError("expected a non-empty JSON array of turns", file=file, row=row, column="messages")
        out.messages = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else None
                raise DataError(f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})", file=file,
                                row=row, column="messages")
            out.messages.append({"role": m["role"], "content": _text_parts(m.get("content", ""), file, row,
                                                                            "messages", f"turn {i}")})
        if not any(m["role"] == "assistant" for m in out.messages):
            raise DataError("no assistant turn (nothing to learn from)", file=file, row=row, column="messages")
    if segments is not None:
        if not isinstance(segments, list):
            raise DataError("expected a JSON array of text parts", file=file, row=row, column="segments")
        out.segments = [_text_parts([s], file, row, "segments", f"segment {j}") for j, s in enumerate(segments)]
    return out


SPLIT_KEY = b"lmrec.split"  # a file's split in its footer (``gen samples`` writes it: train, valid or test)


@dataclass
class Footer:
    """What a parquet file's footer says: rows per row group, and the split it holds when it names one."""

    row_groups: list[int]
    split: str | None = None


def open_parquet(path: Path) -> tuple[pq.ParquetFile, Footer]:
    """Open a file once: the handle (to read row groups from) and its footer, checked (a damaged or empty
    file is named)."""
    try:
        f = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"cannot be read as Parquet ({e})", file=path) from None
    meta = f.metadata
    if meta.num_rows == 0:
        raise DataError("the file is empty (expected at least one row)", file=path)
    split = (f.schema_arrow.metadata or {}).get(SPLIT_KEY)
    return f, Footer([meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
                     split.decode() if split is not None else None)


def parquet_row_groups(path: Path) -> list[int]:
    """Rows per row group of a parquet file (from its footer; nothing else is read)."""
    return open_parquet(path)[1].row_groups


def read_row_group(path: Path, group: int, handle: pq.ParquetFile | None = None) -> list[dict]:
    """The rows of one row group (only the columns this format reads); ``handle``: the file already open."""
    f = handle if handle is not None else pq.ParquetFile(path)
    names = [c for c in SCHEMA.names if c in f.schema_arrow.names]
    return f.read_row_group(group, columns=names).to_pylist()


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based row number, raw row) of a file, one row group in memory at a time."""
    path = Path(path)
    row = 0
    for g in range(len(parquet_row_groups(path))):
        for raw in read_row_group(path, g):
            row += 1
            yield row, raw


def write_shards(rows: Iterable[ChatRow], out_dir: str | Path, rows_per_file: int = 1000,
                 split: str | None = None) -> list[Path]:
    """Write rows as ``part-XXXXX-of-YYYYY.parquet`` files of ``rows_per_file`` rows and ``file_list.json``,
    into a temporary directory renamed to ``out_dir`` when complete. ``split`` goes into every file's footer
    (a stream refuses files of a split it does not train on before reading a row of them)."""
    from lmrec.io import atomic_dir

    if rows_per_file < 1:
        raise DataError(f"rows per file must be at least 1, got {rows_per_file}")
    names: list[str] = []

    def write(tmp: Path) -> None:
        batch: list[dict] = []
        for r in rows:
            batch.append(r.to_record())
            if len(batch) == rows_per_file:
                names.append(_write_part(tmp, len(names), batch, split))
                batch = []
        if batch or not names:
            names.append(_write_part(tmp, len(names), batch, split))
        total = len(names)
        for i, name in enumerate(names):  # the total is known only now
            final = f"part-{i:05d}-of-{total:05d}.parquet"
            shutil.move(tmp / name, tmp / final)
            names[i] = final
        (tmp / FILE_LIST).write_text(json.dumps(names, indent=1) + "\n")

    atomic_dir(out_dir, write)
    return [Path(out_dir) / n for n in names]


def _write_part(tmp: Path, i: int, records: list[dict], split: str | None) -> str:
    name = f".part-{i:05d}.parquet"
    schema = SCHEMA if split is None else SCHEMA.with_metadata({SPLIT_KEY: split.encode()})
    pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp / name)
    return name

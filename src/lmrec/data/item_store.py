"""Items added to a trained model after training (the service's ``POST /items``), kept in a crash-safe,
append-only store that several processes share.

Layout: a directory (the service's default: ``<model_dir>.items/``, beside the model, never inside it) with

    items.log    records back to back: 4-byte length, 4-byte CRC-32 (both little-endian), then that many
                 bytes of UTF-8 JSON ``{"items": [{"item_id", "text": [[key, value], ...], "payload": {...}}]}``
    items.lock   the lock file (``fcntl.flock``) writers hold while they check and append

One record is one request's items: a writer appends it with a single ``write`` and ``fsync`` under the
lock, so a process killed at any moment leaves the items before that request (a torn record at the end,
ignored by readers and cut off by the next writer) or after it, never part of one. Readers need no lock: they
read whole records from the offset they last reached, which makes catching up with another process's
additions O(added) and "nothing changed" one ``stat`` call. The payload is the family's own (RecFormer: the
item vector; generative: the semantic-ID codes); this module knows ids and text only.

Rejected: rewriting one parquet file per addition (what the service did before: O(catalog) per add, and
two workers' rewrites need the lock for the whole rewrite), and one file per addition (a directory listing
per sync and no cheap "what is new since offset N"). The log is never compacted: a record per request is
small next to the model it belongs to. A backup is a copy of ``items.log`` taken at any moment (its torn
tail, if any, is ignored on load).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOG, LOCK = "items.log", "items.lock"
_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload


@dataclass
class StoredItem:
    item_id: str
    text: list[tuple[str, str]]
    payload: dict = field(default_factory=dict)


def encode_vector(v) -> str:
    """A float32 vector as base64 text (a payload field): exact, and a third of its decimal JSON."""
    import base64

    import numpy as np

    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()


def decode_vector(text: str):
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()


def check_new_ids(item_ids, catalog) -> None:
    """New items' ids, as a family adds them: none already in the catalog (``catalog``: id → index), none
    twice in one request."""
    from lmrec.errors import DataError

    seen: set[str] = set()
    for p, it in enumerate(item_ids):
        if it in catalog or it in seen:
            raise DataError(f"item id {it!r} (item {p + 1} of the request) is already in the catalog", file="items")
        seen.add(it)


def default_store_path(model_dir: str | Path) -> Path:
    """``<model_dir>.items`` beside the model directory."""
    model_dir = Path(model_dir).resolve()
    return model_dir.with_name(model_dir.name + ".items")


def encode_record(items: list[StoredItem]) -> bytes:
    body = json.dumps({"items": [{"item_id": it.item_id, "text": [list(kv) for kv in it.text],
                                  "payload": it.payload} for it in items]}, ensure_ascii=False).encode()
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _decode(body: bytes) -> list[StoredItem]:
    return [StoredItem(str(d["item_id"]), [(str(k), str(v)) for k, v in d["text"]], d.get("payload") or {})
            for d in json.loads(body)["items"]]


def read_records(data: bytes) -> tuple[list[StoredItem], int]:
    """The items of every whole record in ``data`` and the number of bytes they span; reading stops at the
    first incomplete or corrupt record (a torn tail)."""
    items, pos = [], 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        try:
            items += _decode(body)
        except (ValueError, KeyError, TypeError):
            break
        pos += _HEADER.size + length
    return items, pos


class ItemStore:
    """One process's view of the store: :meth:`poll` returns what was appended since it last looked."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.log = self.root / LOG
        self.offset = 0  # bytes of the log this process has read

    def size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def changed(self) -> bool:
        """Whether the log grew (or was cut) since this process last read it: one stat call."""
        return self.size() != self.offset

    def poll(self) -> list[StoredItem]:
        """Items appended since the last poll or append of this process (all of them the first time)."""
        if not self.changed():
            return []
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            items, used = read_records(f.read())
        self.offset += used
        return items

    @contextmanager
    def writer(self) -> Iterator[_Writer]:
        """Exclusive access across processes for check-then-append: :meth:`poll` inside it returns every
        item appended before (apply them, then check for duplicates), ``w.append(items)`` writes one
        record durably. A torn tail left by a killed writer is cut off first. (Within a process, the caller
        serialises :meth:`poll` and appends: the offset is this object's.)"""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.log.exists():
                    with open(self.log, "rb") as f:
                        f.seek(self.offset)
                        tail = f.read()
                    whole = read_records(tail)[1]
                    if whole < len(tail):  # bytes after the last whole record: a killed writer's
                        os.truncate(self.log, self.offset + whole)
                yield _Writer(self)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def all(self) -> list[StoredItem]:
        """Every item in the store, in order (a fresh read, independent of this process's offset)."""
        return read_records(self.log.read_bytes())[0] if self.log.exists() else []


class _Writer:
    def __init__(self, store: ItemStore):
        self.store = store

    def append(self, items: list[StoredItem]) -> None:
        if not items:
            return
        if self.store.changed():
            raise RuntimeError("poll() the store before appending: it holds records this process has not read")
        record = encode_record(items)
        created = not self.store.log.exists()
        fd = os.open(self.store.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, record)
            if written != len(record):  # a full disk: leave the torn tail for the next writer to cut
                raise OSError(f"{self.store.log}: wrote {written} of {len(record)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's directory entry must survive a crash too
            dfd = os.open(self.store.root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.store.offset += len(record)

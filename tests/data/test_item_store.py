"""The item store of items added at run time (lmrec/data/item_store.py): whole records or nothing after a
kill -9 at any moment, a torn tail cut by the next writer, O(added) catch-up between processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmrec.data.item_store import LOG, ItemStore, StoredItem, default_store_path, encode_record

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _items(tag: str, n: int) -> list[StoredItem]:
    return [StoredItem(f"{tag}-{j}", [("title", f"item {tag} {j}")], {"vector": "x" * 40}) for j in range(n)]


def _add(store: ItemStore, items: list[StoredItem]) -> list[StoredItem]:
    with store.writer() as w:
        seen = store.poll()
        w.append(items)
    return seen


def test_records_round_trip_and_a_second_reader_catches_up_with_only_what_is_new(tmp_path):
    a, b = ItemStore(tmp_path / "s"), ItemStore(tmp_path / "s")
    assert a.poll() == [] and not a.changed()  # no file yet: nothing
    assert _add(a, _items("r0", 2)) == []
    assert [it.item_id for it in b.poll()] == ["r0-0", "r0-1"]
    assert b.poll() == [] and not b.changed()  # nothing new: one stat call
    assert [it.item_id for it in _add(b, _items("r1", 1))] == []
    got = a.poll()
    assert [(it.item_id, it.text, it.payload) for it in got] == [("r1-0", [("title", "item r1 0")],
                                                                   {"vector": "x" * 40})]
    assert [it.item_id for it in ItemStore(tmp_path / "s").all()] == ["r0-0", "r0-1", "r1-0"]
    assert default_store_path(tmp_path / "model") == (tmp_path / "model.items").resolve()


@pytest.mark.parametrize("cut", ["header", "body", "crc"])
def test_a_torn_tail_is_ignored_on_load_and_cut_by_the_next_writer(tmp_path, cut):
    store = ItemStore(tmp_path / "s")
    _add(store, _items("ok", 2))
    log = tmp_path / "s" / LOG
    whole = log.read_bytes()
    rec = encode_record(_items("torn", 3))
    torn = {"header": rec[:5], "body": rec[: len(rec) - 7], "crc": rec[:8] + bytes([rec[8] ^ 1]) + rec[9:]}[cut]
    log.write_bytes(whole + torn)  # what a writer killed mid-write leaves
    assert [it.item_id for it in ItemStore(tmp_path / "s").all()] == ["ok-0", "ok-1"]
    fresh = ItemStore(tmp_path / "s")
    assert [it.item_id for it in fresh.poll()] == ["ok-0", "ok-1"]
    _add(fresh, _items("next", 1))
    assert log.read_bytes() == whole + encode_record(_items("next", 1))  # the torn bytes are gone
    assert [it.item_id for it in ItemStore(tmp_path / "s").all()] == ["ok-0", "ok-1", "next-0"]


WRITER = """
import sys, time
from lmrec.data.item_store import ItemStore, StoredItem
store, start = ItemStore(sys.argv[1]), int(sys.argv[2])
print("up", flush=True)
for r in range(start, start + 100000):
    items = [StoredItem(f"r{r}-{j}", [("title", "t" * 300)], {"vector": "v" * 3000}) for j in range(r % 7 + 1)]
    with store.writer() as w:
        store.poll()
        w.append(items)
    print(r, flush=True)
"""


def test_kill_9_at_random_moments_leaves_whole_requests_only(tmp_path):
    """A writer process appending requests (1..7 items each) is killed with SIGKILL at random moments, 15
    times, each restart continuing: every request is in the store whole or not at all, and every request
    the writer finished (printed) is there."""
    rng = random.Random(0)
    root, start, done = tmp_path / "s", 0, set()
    t0 = time.time()
    for _ in range(15):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(start)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
        assert p.stdout.readline().strip() == "up"
        time.sleep(rng.uniform(0.0, 0.05))
        p.send_signal(signal.SIGKILL)
        out = p.communicate()[0].split()
        p.wait()
        done |= {int(r) for r in out}
        items = ItemStore(root).all()
        by_request: dict[int, list[str]] = {}
        for it in items:
            by_request.setdefault(int(it.item_id.split("-")[0][1:]), []).append(it.item_id)
        for r, ids in by_request.items():
            assert ids == [f"r{r}-{j}" for j in range(r % 7 + 1)], (r, ids)  # whole, in order, once
        assert done <= set(by_request)  # acknowledged requests are durable
        start = max(by_request, default=-1) + 1000  # fresh ids for the next writer
    assert len(done) > 15 and time.time() - t0 < 20

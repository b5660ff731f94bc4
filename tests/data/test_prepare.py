import numpy as np
import pyarrow.parquet as pq

from lmrec.data.dataset import PreparedDataset
from lmrec.data.prepare import PrepareOptions, build_sequences, prepare
from lmrec.data.readers import RawData
from lmrec.data.sources import load_ml100k


def test_ml100k_counts_order_and_ties(ml100k):
    ds = PreparedDataset(ml100k)
    c = ds.manifest["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (943, 1682, 100_000)
    seq = pq.read_table(ml100k / "sequences.parquet").to_pydict()
    ties = 0
    for ts in seq["timestamps"]:
        assert all(a <= b for a, b in zip(ts, ts[1:]))  # chronological
        ties += ts[-1] == ts[-2]
    # RecBole's convention (stable sort): for 415 of 943 users the test and valid items share a timestamp.
    assert ties == 415


def test_stable_sort_keeps_source_order_of_ties():
    raw = RawData(users=["u"] * 4 + ["v"] * 3, items=["c", "a", "b", "d", "a", "b", "c"],
                  timestamps=[5, 1, 5, 0, 2, 2, 2], item_text={i: [("t", i)] for i in "abcd"}, source="t")
    s = build_sequences(raw, PrepareOptions())
    ids = s["item_ids"]
    assert [ids[i] for i in s["sequences"][0]] == ["d", "a", "c", "b"]  # c before b: file order at t=5
    assert [ids[i] for i in s["sequences"][1]] == ["a", "b", "c"]


def test_leave_one_out_has_no_leakage(ml100k):
    ds = PreparedDataset(ml100k)
    seq = pq.read_table(ml100k / "sequences.parquet").to_pydict()["items"]
    test, valid = ds.examples("test"), ds.examples("valid")
    for u in range(ds.num_users):
        s = seq[u]
        assert list(ds.train[u]) == s[:-2]
        assert ds.valid_target[u] == s[-2] and ds.test_target[u] == s[-1]
    # the test input includes the valid item as its last history item, truncated to max_history_len
    assert all(h[-1] == ds.valid_target[u] for h, u in zip(test.histories, test.users))
    assert max(len(h) for h in test.histories) == ds.max_history_len
    assert all(h[-1] == ds.train[u][-1] for h, u in zip(valid.histories, valid.users))
    rng = np.random.default_rng(0)
    ex = ds.train_examples(rng)
    for u, h, t in zip(ex.users, ex.histories, ex.targets):
        tr = list(ds.train[u])
        cut = len(tr) - tr[::-1].index(t) - 1 if t in tr else None
        assert cut is not None and list(h) == tr[max(0, cut - ds.max_history_len):cut]
    # several samples per user: distinct cut points, each history the prefix before its target
    ex = ds.train_examples(np.random.default_rng(1), samples_per_user=3)
    per_user = np.bincount(ex.users, minlength=ds.num_users)
    assert all(per_user[u] == min(3, len(ds.train[u]) - 1) for u in range(ds.num_users) if len(ds.train[u]) >= 2)
    seen = set()
    for u, h, t in zip(ex.users, ex.histories, ex.targets):
        tr = list(ds.train[u])
        cut = tr.index(t)
        assert (u, cut) not in seen and list(h) == tr[max(0, cut - ds.max_history_len):cut]
        seen.add((u, cut))
    assert not np.all(np.diff(ex.users) >= 0)  # shuffled across users


def test_cold_start_items_never_in_train_or_valid(tmp_path):
    raw = load_ml100k()
    out = prepare(raw, tmp_path / "cold", PrepareOptions(split="cold", cold_ratio=0.1, seed=3))
    ds = PreparedDataset(out)
    seq = pq.read_table(out / "sequences.parquet").to_pydict()["items"]
    tested = ds.examples("test")
    train_items = set(np.concatenate(ds.train).tolist()) | {v for v in ds.valid_target if v is not None}
    cold_targets = set(tested.targets.tolist())
    assert ds.manifest["counts"]["cold_items"] == 168
    assert len(tested) > 500 and not (cold_targets & train_items)
    assert set(ds.new_items().tolist()) == set(range(ds.num_items)) - train_items >= cold_targets
    for h, u, t in zip(tested.histories, tested.users, tested.targets):
        full = seq[u]
        first = full.index(t)
        assert not (set(full[:first]) & cold_targets)  # history = warm items strictly before the target
        assert list(h) == full[:first][-ds.max_history_len:]
    # the same seed draws the same cold items
    again = prepare(raw, tmp_path / "cold2", PrepareOptions(split="cold", cold_ratio=0.1, seed=3))
    assert PreparedDataset(again).test_target == ds.test_target


def test_k_core_filter():
    users = [u for u in "abc" for _ in range(4)]
    items = ["x", "y", "z", "q", "x", "y", "z", "r", "x", "y", "z", "s"]
    raw = RawData(users, items, list(range(12)), {i: [("t", i)] for i in "xyzqrs"}, "t")
    s = build_sequences(raw, PrepareOptions(k_core=2))
    assert s["item_ids"] == ["x", "y", "z"]  # q, r, s occur once
    assert s["dropped_interactions"] == 3
    assert [len(q) for q in s["sequences"]] == [3, 3, 3]


def test_ml100k_from_the_recbole_wheel(tmp_path, monkeypatch):
    """The second source: the recbole wheel from the package index, ml-100k extracted from it alone."""
    from lmrec.data import sources

    monkeypatch.setenv("LMREC_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "_ml100k_from_recbole_package", lambda: None)
    path, source = sources.obtain_ml100k(log=lambda m: None)
    assert path == tmp_path / "ml-100k" and "recbole wheel" in source
    assert sorted(p.name for p in path.iterdir()) == ["SOURCE", "ml-100k.inter", "ml-100k.item", "ml-100k.kg",
                                                      "ml-100k.link", "ml-100k.user"]
    assert not list(tmp_path.glob("*.partial"))
    assert sources.obtain_ml100k(log=lambda m: None) == (path, source)  # cached


def test_train_items_exclude_cold_items(tmp_path):
    out = prepare(load_ml100k(), tmp_path / "c", PrepareOptions(split="cold", cold_ratio=0.1, seed=3))
    ds = PreparedDataset(out)
    known = set(ds.train_items().tolist())
    assert known.isdisjoint(ds.examples("test").targets.tolist())
    assert known == set(np.concatenate(ds.train).tolist())

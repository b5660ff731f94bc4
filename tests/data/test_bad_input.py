"""Every kind of bad input gives one clear message (file, row, column, what was expected), exit code 2,
no traceback, and no output directory left behind."""

import pytest

from tests.conftest import run_cli

GOOD_ITEMS = "item_id,title,brand\ni1,Red Shoe,Acme\ni2,Blue Hat,Hatco\ni3,Green Sock,Acme\n"
GOOD_INTER = "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\nu2,i2,1\nu2,i3,2\nu2,i1,3\n"


def _prepare(tmp_path, inter: bytes | str, items: bytes | str = GOOD_ITEMS, suffix=".csv", extra=()):
    (tmp_path / f"inter{suffix}").write_bytes(inter.encode() if isinstance(inter, str) else inter)
    (tmp_path / f"items{suffix}").write_bytes(items.encode() if isinstance(items, str) else items)
    out = tmp_path / "out"
    res = run_cli("data", "prepare", tmp_path / f"inter{suffix}", out, "--items", tmp_path / f"items{suffix}",
                  "--text", "title,brand", *extra)
    return res, out


def _assert_clean_error(res, out, *fragments):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in res.stderr, res.stderr
    assert not out.exists() and not list(out.parent.glob(".out*"))


def test_good_input_works(tmp_path):
    res, out = _prepare(tmp_path, GOOD_INTER)
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize("inter, fragments", [
    ("user_id,item,timestamp\nu1,i1,1\n", ["inter.csv", "row 1", "column 'item_id'", "missing column"]),
    ("user_id,item_id,timestamp\nu1,i1,1\nu1,i9,2\n", ["inter.csv", "row 3", "column 'item_id'", "'i9'",
                                                     "no entry in the item file"]),
    ("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,\n", ["inter.csv", "row 3", "column 'timestamp'", "missing"]),
    ("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,yesterday\n", ["row 3", "'yesterday' is not a number"]),
    ("", ["inter.csv", "empty"]),
    ("user_id,item_id,timestamp\n", ["inter.csv", "no interactions"]),
    ("user_id,item_id,timestamp\nu1,,1\n", ["row 2", "column 'item_id'", "missing value"]),
])
def test_bad_interactions(tmp_path, inter, fragments):
    res, out = _prepare(tmp_path, inter)
    _assert_clean_error(res, out, *fragments)


def test_non_utf8(tmp_path):
    res, out = _prepare(tmp_path, GOOD_INTER.encode() + b"u3,i1,\xff\xfe9\n")
    _assert_clean_error(res, out, "inter.csv", "row 8", "not valid UTF-8")


def test_duplicated_item_ids(tmp_path):
    res, out = _prepare(tmp_path, GOOD_INTER, GOOD_ITEMS + "i2,Blue Hat again,Hatco\n")
    _assert_clean_error(res, out, "items.csv", "row 5", "duplicated item id 'i2'", "row 3")


def test_wrong_path(tmp_path):
    out = tmp_path / "out"
    res = run_cli("data", "prepare", tmp_path / "nope.csv", out, "--text", "title")
    _assert_clean_error(res, out, "nope.csv", "file not found")


def test_bad_jsonl_line(tmp_path):
    inter = '{"user_id": "u1", "item_id": "i1", "timestamp": 1}\n{"user_id": "u1", oops}\n'
    res, out = _prepare(tmp_path, inter, '{"item_id": "i1", "title": "x", "brand": "y"}\n', suffix=".jsonl")
    _assert_clean_error(res, out, "inter.jsonl", "row 2", "not valid JSON")


def test_too_few_interactions_per_user(tmp_path):
    res, out = _prepare(tmp_path, "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\n")
    _assert_clean_error(res, out, "no user is left", "at least 3 interactions")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1e-4\n  lrr: 2\n")
    res = run_cli("finetune", "--config", cfg, "--data", tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.lrr: unknown key" in res.stderr and str(cfg) in res.stderr


def test_a_text_field_longer_than_the_csv_default_limit_is_read(tmp_path):
    """A product description of a megabyte (the csv module stops at 128 KiB by default; JSONL accepts it)."""
    from lmrec.data.dataset import PreparedDataset

    long = "word " * 200_000
    items = f'item_id,title,brand\ni1,"{long}",Acme\ni2,Blue Hat,Hatco\ni3,Green Sock,Acme\n'
    res, out = _prepare(tmp_path, GOOD_INTER, items)
    assert res.returncode == 0, res.stderr
    ds = PreparedDataset(out)
    assert ds.item_text[ds.item_index["i1"]] == [("title", long.strip()), ("brand", "Acme")]


def test_a_gbk_file_gets_a_hint_how_to_convert_it(tmp_path):
    items = "item_id,title,brand\ni1,红色跑鞋,安踏\ni2,蓝色帽子,李宁\ni3,绿色袜子,安踏\n".encode("gbk")
    res, out = _prepare(tmp_path, GOOD_INTER, items)
    _assert_clean_error(res, out, "items.csv", "not valid UTF-8", "GBK/GB18030",
                        "iconv -f GB18030 -t UTF-8 items.csv > items.utf8.csv")
    res, out = _prepare(tmp_path, GOOD_INTER.encode() + b"u3,i1,\xff\xfe9\n")  # not Chinese: no such hint
    _assert_clean_error(res, out, "not valid UTF-8")
    assert "GBK" not in res.stderr


def test_iso_8601_timestamps_order_events_like_numbers(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmrec.data.readers import read_interactions

    # u1's events out of file order, in three ISO spellings (a date, UTC, another zone) and one number
    inter = ("user_id,item_id,timestamp\nu1,i3,2023-01-05T12:00:00Z\nu1,i1,2023-01-05\n"
             "u1,i2,2023-01-05 19:00:00+08:00\nu2,i2,1\nu2,i3,2\nu2,i1,3\n")
    (tmp_path / "inter.csv").write_text(inter)
    users, items, times, _ = read_interactions(tmp_path / "inter.csv", "user_id", "item_id", "timestamp")
    assert times[:3] == [1672920000.0, 1672876800.0, 1672916400.0]  # 12:00Z, 00:00Z, 11:00Z
    res, out = _prepare(tmp_path, inter)
    assert res.returncode == 0, res.stderr
    import lmrec.data.dataset as d

    ds = d.PreparedDataset(out)
    u1 = ds.user_ids.index("u1")
    order = [*ds.train[u1], ds.valid_target[u1], ds.test_target[u1]]
    assert [ds.item_ids[i] for i in order] == ["i1", "i2", "i3"]
    # Parquet timestamp columns arrive as datetimes
    t = [datetime.datetime(2023, 1, 5, h) for h in (12, 0, 11)]
    pq.write_table(pa.table({"user_id": ["u1"] * 3, "item_id": ["i3", "i1", "i2"], "timestamp": t}),
                   tmp_path / "inter.parquet")
    _, _, times, _ = read_interactions(tmp_path / "inter.parquet", "user_id", "item_id", "timestamp")
    assert times == [1672920000.0, 1672876800.0, 1672916400.0]

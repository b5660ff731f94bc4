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

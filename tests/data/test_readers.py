"""The three source layouts read into the same RawData."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmrec.api import load_raw
from lmrec.data.dataset import PreparedDataset
from lmrec.data.prepare import prepare
from lmrec.errors import DataError


def test_amazon_2018_layout(tmp_path):
    reviews = [{"reviewerID": "A1", "asin": "B1", "unixReviewTime": 3, "overall": 5.0},
               {"reviewerID": "A1", "asin": "B2", "unixReviewTime": 1},
               {"reviewerID": "A1", "asin": "B9", "unixReviewTime": 2},  # no meta: dropped and counted
               {"reviewerID": "A1", "asin": "B3", "unixReviewTime": 4}]
    meta = [{"asin": "B1", "title": "Lip Balm", "brand": "Acme", "category": ["Beauty", "Lips"]},
            {"asin": "B2", "title": "口红", "brand": "品牌", "category": ["美妆"]},
            {"asin": "B3", "title": "Soap"}]
    (tmp_path / "r.json").write_text("\n".join(json.dumps(r) for r in reviews))
    (tmp_path / "m.json").write_text("\n".join(json.dumps(m, ensure_ascii=False) for m in meta))
    raw = load_raw(tmp_path / "r.json", fmt="amazon", items=tmp_path / "m.json")
    assert raw.items == ["B1", "B2", "B3"] and raw.notes == {"interactions_without_item_text_dropped": 1}
    assert raw.item_text["B1"] == [("title", "Lip Balm"), ("brand", "Acme"), ("category", "Beauty Lips")]
    assert raw.item_text["B2"] == [("title", "口红"), ("brand", "品牌"), ("category", "美妆")]
    ds = PreparedDataset(prepare(raw, tmp_path / "out"))
    assert [ds.item_ids[i] for i in ds.train[0]] == ["B2"]  # sorted by time: B2, B1, B3
    assert ds.item_ids[ds.valid_target[0]] == "B1" and ds.item_ids[ds.test_target[0]] == "B3"


def test_parquet_table_with_column_mapping_and_text_in_rows(tmp_path):
    pq.write_table(pa.table({"uid": [1, 1, 1], "sku": ["x", "y", "z"], "ts": [10.0, 20.0, 30.0],
                             "name": ["红色 鞋", "Hat", "Sock"]}), tmp_path / "log.parquet")
    raw = load_raw(tmp_path / "log.parquet", user_col="uid", item_col="sku", time_col="ts", text=["title=name"])
    assert raw.users == ["1", "1", "1"] and raw.item_text["x"] == [("title", "红色 鞋")]


def test_recbole_atomic_default_text_columns(tmp_path):
    (tmp_path / "d.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\t2\nu\tc\t3\n")
    (tmp_path / "d.item").write_text("item_id:token\tname:token_seq\tprice:float\ta\tA a\t1\nb\tB\t2\nc\tC\t3\n"
                                     .replace("\ta\tA", "\na\tA"))
    raw = load_raw(tmp_path / "d.inter")
    assert raw.item_text["a"] == [("name", "A a")]  # float columns are not text by default


def test_table_needs_text_columns(tmp_path):
    (tmp_path / "t.csv").write_text("user_id,item_id,timestamp\nu,a,1\n")
    with pytest.raises(Exception, match="text columns"):
        load_raw(tmp_path / "t.csv")
    with pytest.raises(DataError, match="missing text column"):
        load_raw(tmp_path / "t.csv", text=["title"])

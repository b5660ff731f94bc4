"""OpenOneRec-format chat parquet: read/write round trip, bad rows, the data config, and the stream —
file assignment across ranks × workers, packing, and exact resume from a StatefulDataLoader state."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from lmrec.data.chat_format import SCHEMA, ChatRow, iter_rows, parse_row, write_shards
from lmrec.data.data_config import DataMixConfig, load_data_config, source_files
from lmrec.data.stream import ChatStream, collate_packs, epoch_files
from lmrec.errors import ConfigError, DataError


def corpus(root, files: int, rows: int, source: str = "rec", length=lambda i: 3 + i % 7):
    """``files`` shards of ``rows`` rows; the assistant reply of row i is its length in words."""
    out = []
    for i in range(files * rows):
        n = length(i)
        out.append(ChatRow(f"{source}-{i}", source, [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": " ".join(["w"] * n)}]))
    return write_shards(out, root, rows_per_file=rows)


def encode(row: ChatRow) -> dict:
    """Token ids that identify the row: [uuid number] * (reply words + 1); labels on all but the first."""
    k = int(row.uuid.split("-")[1])
    n = len(row.messages[-1]["content"].split()) + 1
    return {"input_ids": [k] * n, "labels": [-100] + [k] * (n - 1)}


def stream(paths, cfg, rank=0, world=1):
    return ChatStream([paths], ["rec"], cfg, encode, rank=rank, world=world)


def uuids_of(packs):
    """The row numbers in emitted packs (each sample's first token)."""
    out = []
    for p in packs:
        prev = None
        for t, pos in zip(p["input_ids"], p["position_ids"]):
            if pos == 0:
                out.append(t)
            prev = t
        assert prev is not None
    return out


def test_rows_round_trip_in_both_content_forms_and_segments(tmp_path):
    rows = [ChatRow("a", "rec", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi 你好"},
                                 {"role": "assistant", "content": "<|sid_begin|><s_a_1><|sid_end|>"}], None, {"k": 1}),
            ChatRow("b", "wiki", None, ["plain text, ", "second part"])]
    (path,) = write_shards(rows, tmp_path / "out", rows_per_file=10)
    assert path.name == "part-00000-of-00001.parquet"
    assert json.loads((tmp_path / "out" / "file_list.json").read_text()) == [path.name]
    table = pq.read_table(path)
    assert table.schema.names == ["uuid", "source", "metadata", "messages", "segments"]
    raw = table.to_pylist()
    assert json.loads(raw[0]["messages"])[1] == {"role": "user", "content": [{"type": "text", "text": "hi 你好"}]}
    assert [parse_row(r, path, i + 1) for i, r in enumerate(raw)] == rows
    # OpenOneRec also writes content as a plain string; several text parts are joined
    plain = {"uuid": "c", "source": "rec", "metadata": "{}", "messages": json.dumps(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "x"},
                                                                             {"type": "text", "text": "y"}]}])}
    assert parse_row(plain, path, 3).messages == [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "xy"}]


def test_shards_and_row_groups(tmp_path):
    paths = corpus(tmp_path / "c", files=3, rows=4)
    assert [p.name for p in paths] == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    assert [n for n, _ in iter_rows(paths[1])] == [1, 2, 3, 4]
    assert not list((tmp_path).glob(".*partial"))


@pytest.mark.parametrize("change, fragments", [
    ({"messages": '[{"role": "user", "content": "q"'}, ["row 1", "column 'messages'", "not valid JSON"]),
    ({"messages": '[{"role": "robot", "content": "q"}]'}, ["turn 0: unknown role 'robot'"]),
    ({"messages": '[{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]'},
     ["turn 0, part 0", "type 'image'", "only text is read"]),
    ({"messages": None, "segments": None}, ["row 1", "neither 'messages' nor 'segments'"]),
    ({"messages": '[{"role": "user", "content": "q"}]'}, ["no assistant turn"]),
])
def test_bad_rows_are_named(tmp_path, change, fragments):
    raw = {"uuid": "u", "source": "s", "metadata": "{}", "messages": '[{"role": "user", "content": "q"}]',
           "segments": None, **change}
    with pytest.raises(DataError) as e:
        parse_row(raw, tmp_path / "f.parquet", 1)
    for f in ["f.parquet", *fragments]:
        assert f in str(e.value)


def test_an_empty_file_is_named(tmp_path):
    pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet: the file is empty"):
        source_files(DataMixConfig(sources=[str(tmp_path / "empty.parquet")]).sources[0])


def test_openonerec_dataset_config_is_accepted_as_it_is(tmp_path):
    corpus(tmp_path / "c", files=2, rows=3)
    (tmp_path / "list.json").write_text(json.dumps([str(tmp_path / "c")]))
    cfg_file = tmp_path / "stg1.json"
    cfg_file.write_text(json.dumps({
        "name": "chat_completion_parquet", "sources": str(tmp_path / "list.json"), "base_model_dir": "/m",
        "max_length": 30000, "num_epochs": 3, "num_workers": 2, "model_class": "Qwen3ForCausalLM",
        "itemic_id_range": [151669, 176246], "only_assistant_loss": True, "local_shuffle_buffer_size": 10000,
        "local_shuffle_random_fetch": True, "add_think_pattern": False, "max_sample_length": 20000}))
    cfg = load_data_config(cfg_file)
    assert (cfg.max_length, cfg.num_epochs, cfg.sample_limit) == (30000, 3, 20000)
    assert len(source_files(cfg.sources[0])) == 2
    cfg_file.write_text(json.dumps({"sources": str(tmp_path / "list.json"), "max_lenght": 10}))
    with pytest.raises(ConfigError, match="max_lenght: unknown key"):
        load_data_config(cfg_file)


def test_every_file_is_read_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path):
    paths = corpus(tmp_path / "c", files=10, rows=5)
    cfg = DataMixConfig(sources=["x"], max_length=64, num_epochs=2, local_shuffle_buffer_size=4,
                        pack_buffer_size=4, seed=3)
    seen = []
    for rank in range(2):
        loader = StatefulDataLoader(stream(paths, cfg, rank, 2), batch_size=None, num_workers=2)
        seen += uuids_of(list(loader))
    assert sorted(seen) == sorted(list(range(50)) * 2)  # every row once per epoch, none twice
    files_of = [epoch_files([paths], [1.0], 3, e) for e in range(2)]
    assert files_of[0] != files_of[1] and sorted(files_of[0]) == sorted(files_of[1])  # reshuffled per epoch


def test_weights_repeat_or_subsample_files(tmp_path):
    a, b = corpus(tmp_path / "a", 4, 2), corpus(tmp_path / "b", 10, 2, source="txt")
    files = epoch_files([a, b], [2.0, 0.3], seed=0, epoch=0)
    assert sum(s == 0 for s, _ in files) == 8 and sum(s == 1 for s, _ in files) == 3
    assert len({f for s, f in files if s == 0}) == 4


def test_packs_fill_max_length_and_labels_never_cross_samples(tmp_path):
    paths = corpus(tmp_path / "c", files=4, rows=25, length=lambda i: 5 + (i * 37) % 60)
    cfg = DataMixConfig(sources=["x"], max_length=128, local_shuffle_buffer_size=16, pack_buffer_size=32)
    packs = list(stream(paths, cfg))
    assert sorted(uuids_of(packs)) == list(range(100))
    assert all(len(p["input_ids"]) <= 128 for p in packs)
    real = sum(len(p["input_ids"]) for p in packs[:-3]) / (128 * len(packs[:-3]))
    assert real > 0.95
    batch = collate_packs(packs[:2], pad_id=0, length=128)
    for p, ids, lab, pos in zip(packs, batch["input_ids"], batch["labels"], batch["position_ids"]):
        assert ids[: len(p["input_ids"])].tolist() == p["input_ids"]
        starts = (pos == 0).nonzero().flatten().tolist()
        assert all(lab[s] == -100 for s in starts)  # a sample's first token is never a target
        n = len(p["input_ids"])
        assert (lab[n:] == -100).all() and pos[n:].tolist() == list(range(128 - n))


def test_over_length_samples_are_dropped_or_truncated_and_counted(tmp_path):
    paths = corpus(tmp_path / "c", files=1, rows=10, length=lambda i: 30 if i % 3 == 0 else 4)
    cfg = DataMixConfig(sources=["x"], max_length=64, max_sample_length=16, pack_buffer_size=2)
    s = stream(paths, cfg)
    assert sorted(uuids_of(list(s))) == [i for i in range(10) if i % 3]
    assert s.counts.too_long["rec"] == 4 and s.counts.samples["rec"] == 6
    t = stream(paths, cfg.model_copy(update={"over_length": "truncate"}))
    packs = list(t)
    assert sorted(uuids_of(packs)) == list(range(10)) and t.counts.too_long["rec"] == 4


def test_bad_rows_stop_or_are_skipped_and_counted(tmp_path):
    good = [ChatRow(f"rec-{i}", "rec", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}])
            for i in range(6)]
    recs = [r.to_record() for r in good]
    recs[2]["messages"] = "[not json"
    recs[4]["messages"] = json.dumps([{"role": "user", "content": "q"}])
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(recs, schema=SCHEMA), path)
    with pytest.raises(DataError, match="bad.parquet, row 3, column 'messages': not valid JSON"):
        list(stream([path], DataMixConfig(sources=["x"], max_length=64)))
    s = stream([path], DataMixConfig(sources=["x"], max_length=64, bad_rows="skip"))
    assert sorted(uuids_of(list(s))) == [0, 1, 3, 5] and s.counts.bad_rows["rec"] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_loader_state_continues_with_exactly_the_same_packs(tmp_path, workers):
    paths = corpus(tmp_path / "c", files=6, rows=7, length=lambda i: 3 + (i * 13) % 20)
    cfg = DataMixConfig(sources=["x"], max_length=48, num_epochs=2, local_shuffle_buffer_size=9,
                        pack_buffer_size=5, seed=1)
    make = lambda: StatefulDataLoader(stream(paths, cfg), batch_size=2, num_workers=workers,  # noqa: E731
                                      collate_fn=lambda b: collate_packs(b, 0, 48))
    full = [b["input_ids"] for b in make()]
    loader = make()
    it = iter(loader)
    head = [next(it)["input_ids"] for _ in range(7)]
    state = json.loads(json.dumps(loader.state_dict()))  # the state is plain JSON
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(full) == len(head) + len(rest) > 10
    for a, b in zip(full, head + rest):
        assert a.equal(b)

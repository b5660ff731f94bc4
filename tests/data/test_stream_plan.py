"""A stream's plan before it starts: the schedule's estimate against the packs a stream really makes, every
rank gets files, files and rows of a split the data config does not train on are refused; and a resume on
another number of dataloader workers is a clear error."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lmrec.data.chat_format import SCHEMA, ChatRow, write_shards
from lmrec.data.data_config import DataMixConfig
from lmrec.data.stream import ChatStream, collate_packs, epoch_files
from lmrec.errors import ConfigError, LmrecError
from tests.data.test_stream import corpus, encode, uuids_of


def real_steps(plan, mix, world, batch_size, grad_accum):
    """Optimizer steps of the stream as the loop runs it: every rank's batches, until the first rank's end."""
    per_rank = []
    for rank in range(world):
        s = ChatStream(plan.files, ["rec", "txt"][: len(plan.files)], mix, encode, rank=rank, world=world,
                       weights=[x.weight for x in mix.sources])
        batches = StatefulDataLoader(s, batch_size=batch_size, num_workers=mix.num_workers, collate_fn=lambda b: b)
        per_rank.append(sum(1 for _ in batches) // grad_accum)
    return min(per_rank)


@pytest.mark.parametrize("world, workers, batch_size, grad_accum, max_length", [
    (1, 0, 2, 1, 128), (2, 2, 1, 2, 128), (1, 2, 4, 1, 512), (3, 0, 2, 1, 256)])
def test_the_schedules_estimate_is_within_10_percent_of_the_real_steps(tmp_path, world, workers, batch_size,
                                                                       grad_accum, max_length):
    """Long-tailed lengths (a few over-length samples dropped), two sources with weights 1 and 0.5, 2 epochs:
    the estimate from a sampled tokenization is within 10 % of the steps the stream really makes — the rows
    (one sample per pack) are several times more."""
    from lmrec.data.stream_plan import estimated_steps, scan

    long_tail = lambda i: 3 + (i * 37) % 60 + (200 if i % 17 == 0 else 0)  # noqa: E731
    corpus(tmp_path / "rec", files=6, rows=150, length=long_tail)
    corpus(tmp_path / "txt", files=4, rows=100, source="txt", length=lambda i: 20 + i % 90)
    mix = DataMixConfig(sources=[{"path": str(tmp_path / "rec")}, {"path": str(tmp_path / "txt"), "weight": 0.5}],
                        max_length=max_length, max_sample_length=200, num_workers=workers, pack_buffer_size=16,
                        local_shuffle_buffer_size=32, num_epochs=2)
    plan = scan(mix, encode)
    estimate, _ = estimated_steps(plan, mix, [1.0, 0.5], world, batch_size, grad_accum)
    real = real_steps(plan, mix, world, batch_size, grad_accum)
    assert abs(estimate / real - 1) <= 0.10, (estimate, real)
    rows = sum(plan.rows(f) for e in range(2) for _, f in epoch_files(plan.files, [1.0, 0.5], 0, e))
    assert rows / (batch_size * grad_accum * world) > 2.5 * real  # what one sample per pack would have said


def test_ranks_get_files_first_and_a_rank_without_one_is_refused(tmp_path):
    from lmrec.data.stream import reader_share
    from lmrec.data.stream_plan import check_readers, scan

    for n in range(1, 9):
        for world in range(1, 5):
            for workers in range(1, 4):
                shares = [[reader_share(list(range(n)), r, world, w, workers) for w in range(workers)]
                          for r in range(world)]
                assert sorted(sum(sum(shares, []), [])) == list(range(n))  # every file once
                assert all(sum(s, []) for s in shares) == (n >= world)  # every rank has one from n = world
    corpus(tmp_path / "c", files=3, rows=4)
    mix = DataMixConfig(sources=[str(tmp_path / "c")], num_workers=2)
    plan = scan(mix, encode)
    with pytest.raises(ConfigError, match=r"3 parquet file\(s\) per epoch .* to 4 ranks.*at least 4 files"):
        check_readers(plan, mix, [1.0], world=4)
    said = []
    check_readers(plan, mix, [1.0], world=3, log=said.append)  # one file per rank, one idle worker each
    assert said and "3 worker(s) get no file and idle" in said[0]
    check_readers(plan, mix.model_copy(update={"num_workers": 1}), [1.0], world=3, log=said.append)
    assert len(said) == 1


def test_a_row_of_a_split_not_trained_on_is_refused_and_never_skipped(tmp_path):
    """A file without lmrec's footer key (written by another tool, or by an older ``gen samples``): the row's
    metadata.split stops the stream, whatever ``bad_rows`` says, unless train_splits names it."""
    recs = [ChatRow(f"rec-{i}", "rec", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    metadata={"split": "test" if i == 2 else "train"}).to_record() for i in range(5)]
    pq.write_table(pa.Table.from_pylist(recs, schema=SCHEMA), tmp_path / "mixed.parquet")
    for bad_rows in ("error", "skip"):
        cfg = DataMixConfig(sources=["x"], max_length=64, bad_rows=bad_rows)
        with pytest.raises(ConfigError, match=r"mixed.parquet, row 3: holds 'test' samples .*train_splits"):
            list(ChatStream([[tmp_path / "mixed.parquet"]], ["rec"], cfg, encode))
    cfg = DataMixConfig(sources=["x"], max_length=64, train_splits=["train", "test"])
    assert sorted(uuids_of(list(ChatStream([[tmp_path / "mixed.parquet"]], ["rec"], cfg, encode)))) == list(range(5))


def test_a_file_of_a_split_not_trained_on_is_refused_from_its_footer(tmp_path):
    from lmrec.data.stream_plan import scan

    rows = [ChatRow(f"rec-{i}", "rec", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}],
                    metadata={"split": "valid"}) for i in range(4)]
    (valid,) = write_shards(rows, tmp_path / "samples" / "valid", rows_per_file=10, split="valid")
    corpus(tmp_path / "samples" / "train", files=1, rows=4)
    mix = DataMixConfig(sources=[str(tmp_path / "samples" / "**" / "*.parquet")])
    with pytest.raises(ConfigError, match=rf"{valid}: holds 'valid' samples .*train_splits: \['train'\]"):
        scan(mix, encode)  # before a row is read
    assert len(scan(mix.model_copy(update={"train_splits": ["train", "valid"]}), encode).files[0]) == 2


def test_a_resume_on_another_number_of_workers_names_both(tmp_path):
    from transformers.modeling_outputs import CausalLMOutput

    from lmrec.training.checkpoints import Checkpointing, Resume, checkpoint_dirs
    from lmrec.training.loop import StreamStage, fit, make_accelerator

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Embedding(64, 1)

        def forward(self, input_ids, labels, num_items_in_batch=None, **_):
            return CausalLMOutput(loss=self.w(input_ids).pow(2).mean())

    paths = corpus(tmp_path / "c", files=4, rows=10)
    cfg = DataMixConfig(sources=["x"], max_length=32, pack_buffer_size=2)

    def loader(workers):
        return lambda epoch: StatefulDataLoader(ChatStream([paths], ["rec"], cfg, encode), batch_size=1,
                                                num_workers=workers, collate_fn=lambda b: collate_packs(b, 0, 32))

    stage = StreamStage("s", 1e-3, num_training_steps=8, max_steps=3)
    root = tmp_path / "ck"
    fit(make_accelerator("no", seed=0), Tiny(), loader(1), stage, checkpointing=Checkpointing(root, save_steps=1),
        log=lambda m: None)
    middle = checkpoint_dirs(root / "s")[0]  # step 2: not finished, so the stream goes on from it
    assert json.loads((middle / "trainer_state.json").read_text())["finished"] is False
    with pytest.raises(LmrecError, match="saved with num_workers 1 and this run has num_workers 0"):
        fit(make_accelerator("no", seed=0), Tiny(), loader(0), stage,
            checkpointing=Checkpointing(root, 1, resume=Resume(root, middle)), log=lambda m: None)

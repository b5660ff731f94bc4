"""The stage's type picks the loop: a ``Stage`` runs epochs of a map-style loader, a ``StreamStage`` one pass
over a stream that keeps its own position. A loader of the other kind is refused before anything is built,
with a message naming the type to use."""

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lmrec.training.loop import Stage, StreamStage, data_loader, fit, make_accelerator
from tests.training.toy import Toy


class Rows(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([{"x": torch.ones(2)}] * 4)


def test_a_stream_stage_refuses_a_map_style_loader():
    loader = data_loader([{"x": torch.ones(4, 2)}], seed=0)
    with pytest.raises(ValueError, match=r"\[s\] a StreamStage .* DataLoader has no load_state_dict: .* with Stage$"):
        fit(make_accelerator("no", seed=0), Toy(), lambda e: loader, StreamStage("s", 0.1, num_training_steps=4),
            log=lambda m: None)


def test_a_stage_refuses_a_stream_loader():
    loader = StatefulDataLoader(Rows(), batch_size=2)
    with pytest.raises(ValueError, match=r"\[s\] a Stage trains epoch by epoch .* StatefulDataLoader keeps its own "
                                         r"position .* with StreamStage\(tag, lr, num_training_steps=\.\.\.\)$"):
        fit(make_accelerator("no", seed=0), Toy(), lambda e: loader, Stage("s", 1, 0.1), log=lambda m: None)


def test_a_stream_stage_is_one_epoch_with_a_schedule_of_its_own_length():
    stage = StreamStage("s", 0.1, num_training_steps=8, max_steps=3)
    assert (stage.epochs, stage.num_training_steps, stage.max_steps) == (1, 8, 3)
    with pytest.raises(TypeError, match="epochs"):  # a stream is read once: not the caller's to say
        StreamStage("s", 0.1, epochs=2, num_training_steps=8)
    with pytest.raises(TypeError, match="num_training_steps"):  # a stream has no length to size it from
        StreamStage("s", 0.1)
    with pytest.raises(ValueError, match="num_training_steps >= 1"):
        StreamStage("s", 0.1, num_training_steps=0)


def test_a_stream_resumes_only_on_as_many_processes_as_wrote_it(monkeypatch, tmp_path):
    """Each rank's position in a stream is its own: a checkpoint written by 2 processes resumed by 1 would
    silently drop the other rank's files and buffers. Refused with the count to use."""
    from dataclasses import asdict

    import lmrec.training.loop as loop
    from lmrec.errors import LmrecError

    monkeypatch.setattr(loop, "load_checkpoint", lambda *a, **k: {**asdict(loop.LoopState()), "processes": 2})
    restored = []
    monkeypatch.setattr(loop, "restore_loader", lambda *a: restored.append(a))

    class Plan:  # resume this stage from tmp_path
        root, resume = tmp_path, type("R", (), {"checkpoint_for": lambda self, tag: tmp_path})()

    stage, loader = StreamStage("s", 0.1, num_training_steps=4), StatefulDataLoader(Rows(), batch_size=2)
    with pytest.raises(LmrecError, match=r"2 process\(es\) wrote it and this run has 1.*resume on 2 process"):
        loop._resume(make_accelerator("no", seed=0), stage, Plan(), loader, None, 0, lambda m: None)
    assert restored == []
    monkeypatch.setattr(loop, "load_checkpoint", lambda *a, **k: {**asdict(loop.LoopState()), "processes": 1})
    loop._resume(make_accelerator("no", seed=0), stage, Plan(), loader, None, 0, lambda m: None)
    assert len(restored) == 1  # the same count resumes

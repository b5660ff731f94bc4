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

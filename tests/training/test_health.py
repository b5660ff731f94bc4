"""A non-finite training loss stops the run with a message naming the step, before any checkpoint or
validation of the diverged model; the checkpoints written before it stay."""

from pathlib import Path

import pytest
import torch

from lmrec.errors import TrainingDiverged
from lmrec.training.checkpoints import Checkpointing, checkpoint_dirs
from lmrec.training.loop import Stage, data_loader, fit, make_accelerator
from tests.training.toy import Toy


def batches(bad_at: int | None, n: int = 8):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(3, 4, generator=g)
        if i == bad_at:
            x[0, 0] = float("nan")  # a broken row: this step's loss (and every later one) is NaN
        out.append({"x": x, "y": torch.randn(3, generator=g)})
    return out


def run(tmp_path: Path, bad_at, validate=None, log_every=4):
    acc = make_accelerator("no", seed=0)
    ck = Checkpointing(tmp_path / "checkpoints", save_steps=2)
    data = batches(bad_at)
    stage = Stage("toy", epochs=2, lr=1e-2, log_every=log_every, validate=validate)
    return fit(acc, Toy(inputs=4), lambda e: data_loader(data, seed=e), stage, checkpointing=ck, log=lambda m: None)


def test_a_nan_loss_stops_the_run_naming_its_step_and_keeps_earlier_checkpoints(tmp_path):
    validated = []
    with pytest.raises(TrainingDiverged, match="from optimizer step 3 "):
        run(tmp_path, bad_at=2, validate=lambda: validated.append(1) or {"ndcg@10": 1.0})
    kept = [p.name for p in checkpoint_dirs(tmp_path / "checkpoints" / "toy")]
    assert kept == ["step-00000002"]  # saved before the bad step; step 4's save found the NaN first
    assert validated == []  # the diverged model was never validated (so never kept as the best)


def test_a_finite_run_is_not_stopped(tmp_path):
    r = run(tmp_path, bad_at=None)
    assert r.global_step == 16 and all(torch.isfinite(torch.tensor(h["loss"])) for h in r.history)


def test_the_check_waits_for_the_log_interval_but_never_for_the_end_of_the_run(tmp_path):
    """A NaN after the last logged step is still caught at the end of the epoch (before validation)."""
    validated = []
    with pytest.raises(TrainingDiverged, match="from optimizer step 8 "):
        run(tmp_path, bad_at=7, validate=lambda: validated.append(1) or {"ndcg@10": 0.5}, log_every=100)
    assert validated == []

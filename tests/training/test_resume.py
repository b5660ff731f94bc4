"""Exact resume of finetuning: a run SIGKILLed mid-epoch, or in the middle of writing a checkpoint, and
resumed with ``train.resume_from=auto`` ends with bit-identical weights and the same metrics as an
uninterrupted run (CPU, fixed seed)."""

import json

import pytest

from tests.conftest import run_cli
from tests.training.resume_helpers import HANG, assert_same_weights, checkpoints, run_and_kill
from tests.training.test_distributed import synthetic_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("resume")
    data = synthetic_dataset(root / "data")
    args = ["finetune", "--data", data, f"model.backbone={tiny_backbone}", "model.max_token_num=64",
            "train.stage1_epochs=3", "train.stage2_epochs=2", "train.batch_size=8", "eval.batch_size=16",
            "train.item_grad=batch", "train.save_steps=4", "train.patience=5"]
    ref = run_cli(*args, f"output_dir={root / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root, args


def _compare(a, b):
    assert_same_weights(a / "model" / "model.safetensors", b / "model" / "model.safetensors")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["test"] == mb["test"] and ma["valid"] == mb["valid"]
    assert ma["history"] == mb["history"]


def test_sigkill_mid_stage_then_resume_is_exact(setup):
    root, args = setup
    run = root / "killed"
    # killed after the second stage-1 checkpoint (mid-epoch: 10 steps per epoch, a save every 4)
    run_and_kill([*args, f"output_dir={run}"], lambda: len(checkpoints(run, "stage1")) >= 2, root / "k.log")
    assert not (run / "model").exists()
    # the loop's extra state (stage 1's item table) is stored without pickle: safetensors + JSON
    last = checkpoints(run, "stage1")[-1]
    assert (last / "extra_state.safetensors").exists() and (last / "extra_state.json").exists()
    assert not list(last.glob("*.pt"))
    res = run_cli(*args, f"output_dir={run}", "train.resume_from=auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    _compare(root / "ref", run)
    assert len(checkpoints(run, "stage1")) <= 2  # save_total_limit


def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one(setup):
    root, args = setup
    run, marker = root / "hung", root / "marker"
    run_and_kill([*args, f"output_dir={run}"], marker.exists, root / "h.log", script=HANG,
                 env={"HANG_AT_SAVE": "3", "HANG_MARKER": str(marker)})
    partial = marker.read_text()
    assert partial.endswith(".partial")  # killed with the files of the third checkpoint half-way in place
    done = checkpoints(run, "stage1")
    assert len(done) == 2 and all((d / "model.safetensors").exists() for d in done)
    res = run_cli(*args, f"output_dir={run}", "train.resume_from=auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {done[-1]}" in res.stdout + res.stderr
    _compare(root / "ref", run)


def test_resume_from_a_finished_run_and_bad_paths(setup, tmp_path):
    root, args = setup
    res = run_cli(*args, f"output_dir={root / 'ref'}", f"train.resume_from={tmp_path}")
    assert res.returncode == 2
    assert "neither a checkpoint" in res.stderr and "Traceback" not in res.stderr

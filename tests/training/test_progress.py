"""Progress bars are drawn on a terminal only; in a log file (nohup, Slurm, CI) the loop prints one line
every ``log_every`` steps with the same figures instead of carriage-return frames."""

import re

import torch

from lmrec.progress import progress, step_line


def test_no_bar_in_a_log_file_and_one_on_request(capsys, monkeypatch):
    for _ in progress(range(300), "train"):  # pytest's captured stderr is not a terminal
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LMREC_PROGRESS", "1")
    for _ in progress(range(300), "train", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "train:" in err and "300/300" in err


def test_a_step_line_has_the_figures_of_the_bar():
    line = step_line("stage1 epoch 2/20", "batch", 40, 200, 20.0, 40, loss=3.21449, lr=0.0012)
    assert line == "[stage1 epoch 2/20] batch 40/200  loss 3.214  lr 0.0012  2 batch/s  ETA 1m20s"
    assert step_line("gen_stage2", "step", 7200, 90000, 3600.0, 7200).endswith("ETA 11h30m")
    # resumed at 100: the rate is of the steps this process ran; no ETA past the end or without a total
    assert "1 step/s" in step_line("s", "step", 110, None, 10.0, 10) and "ETA" not in step_line(
        "s", "step", 110, None, 10.0, 10)


def test_the_loop_prints_a_line_every_log_every_steps_in_a_log_file(tmp_path, capsys):
    from lmrec.config import IdRunConfig
    from lmrec.training.loop import Stage, data_loader
    from lmrec.training.run import Run
    from tests.training.toy import Toy

    batches = [{"x": torch.ones(4, 2) * i} for i in range(6)]
    cfg = IdRunConfig(output_dir=str(tmp_path / "run"))
    with Run(cfg, "t", log=lambda m: None) as run:
        run.fit(Toy(target=1.0), lambda e: data_loader(batches, seed=e), Stage("toy", 2, 0.1, log_every=2))
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.startswith("[toy epoch")]
    assert [re.match(r"\[toy epoch (\d)/2\] batch (\d)/6  loss [\d.]+  lr [\d.e-]+  [\d.e+]+ batch/s", ln).groups()
            for ln in lines] == [("1", "2"), ("1", "4"), ("1", "6"), ("2", "2"), ("2", "4"), ("2", "6")]
    assert "ETA" in lines[0] and "\r" not in out.out + out.err

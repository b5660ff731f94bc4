"""Progress bars redirected to a log file redraw rarely (a per-batch redraw floods nohup/Slurm logs)."""

import time

from lmrec.progress import progress


def test_bar_in_a_log_file_draws_at_start_and_end_only(capsys):
    bar = progress(range(300), "train")  # pytest's captured stderr is not a terminal
    for i in bar:
        bar.set_postfix(loss=f"{i:.4f}", refresh=False)
        time.sleep(0.001)
    draws = capsys.readouterr().err.count("train:")
    assert 1 <= draws <= 3, draws

    bar = progress(range(300), "train", mininterval=0)  # the same loop, redrawing every item: the check can fail
    for i in bar:
        bar.set_postfix(loss=f"{i:.4f}", refresh=False)
    assert capsys.readouterr().err.count("train:") > 50

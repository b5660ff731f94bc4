"""The CLI with ``Accelerator.save_state`` hanging (after writing its files, before the checkpoint is
completed) at the N-th checkpoint: lets a test SIGKILL a run in the middle of saving."""

import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

_save = Accelerator.save_state
_calls = {"n": 0}


def _hanging_save(self, output_dir=None, **kwargs):
    out = _save(self, output_dir, **kwargs)
    _calls["n"] += 1
    if _calls["n"] == int(os.environ["HANG_AT_SAVE"]):
        Path(os.environ["HANG_MARKER"]).write_text(str(output_dir))
        time.sleep(600)
    return out


Accelerator.save_state = _hanging_save

if __name__ == "__main__":
    from lmrec.cli.main import app

    sys.argv[0] = "lmrec"
    app()

"""Run a CLI command in a subprocess and SIGKILL it at a chosen moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

from lmrec.training.checkpoints import checkpoint_dirs

HANG = Path(__file__).with_name("hang_in_save.py")


def run_and_kill(args: list, when: Callable[[], bool], log: Path, script: Path | None = None,
                 env: dict | None = None, timeout: float = 300) -> None:
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "lmrec.cli.main"]
    with open(log, "w") as out:
        p = subprocess.Popen(cmd + [str(a) for a in args], stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "COLUMNS": "250", **(env or {})})
        deadline = time.time() + timeout
        while p.poll() is None and time.time() < deadline:
            if when():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return
            time.sleep(0.02)
        p.kill()
    raise AssertionError(f"the run ended (or timed out) before the kill point; log:\n{log.read_text()[-3000:]}")


def checkpoints(run: Path, tag: str) -> list[Path]:
    """A run's complete checkpoints of one stage, oldest first."""
    return checkpoint_dirs(run / "checkpoints" / tag)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), f"{k} differs"

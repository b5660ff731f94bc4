"""Progress bars: live on a terminal, sparse in a log file.

Redirected to a file (nohup, Slurm, CI), a bar that redraws ten times a second writes megabytes of
carriage-return lines; there it redraws at most once every ``LOG_INTERVAL_S`` seconds instead.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable=None, desc: str | None = None, show: bool = True, **kw) -> tqdm:
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    kw.setdefault("mininterval", 0.1 if interactive else LOG_INTERVAL_S)
    return tqdm(iterable, desc=desc, disable=not show, leave=False, **kw)

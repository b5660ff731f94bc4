"""Progress bars on a terminal only.

Redirected to a file (nohup, Slurm, CI), a bar writes carriage-return frames that fill the file; there the
bars are off and the training loop prints one line every ``train.log_every`` steps with the same figures
(:func:`step_line`). ``LMREC_PROGRESS=1`` / ``0`` forces the bars on / off.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    """Progress bars are drawn: stderr is a terminal, unless ``LMREC_PROGRESS`` says otherwise."""
    forced = os.environ.get("LMREC_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return getattr(sys.stderr, "isatty", lambda: False)()


def quiet_library_bars() -> None:
    """The libraries' own bars (transformers' "Loading weights", "Writing model shards"; huggingface_hub's)
    follow the same rule: off where lmrec's are. Set before they are imported: both read it at import."""
    if not interactive():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress(iterable=None, desc: str | None = None, show: bool = True, **kw) -> tqdm:
    kw.setdefault("mininterval", 0.1)
    return tqdm(iterable, desc=desc, disable=not (show and interactive()), leave=False, **kw)


def step_line(desc: str, unit: str, pos: int, total: int | None, elapsed_s: float, done: int,
              **values: float) -> str:
    """One log line with a bar's figures: ``[stage1 epoch 2/20] batch 40/200  loss 3.214  lr 0.0012
    2.31 batch/s  ETA 1m09s``. The rate and the ETA come from what this process has run (``done`` units in
    ``elapsed_s``), not from a resumed run's earlier part."""
    parts = [f"[{desc}] {unit} {pos}" + (f"/{total}" if total else "")]
    parts += [f"{k} {v:.4g}" for k, v in values.items()]
    if done > 0 and elapsed_s > 0:
        rate = done / elapsed_s
        parts.append(f"{rate:.3g} {unit}/s")
        if total and total > pos:
            left = round((total - pos) / rate)
            parts.append("ETA " + (f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600
                                   else f"{left // 60}m{left % 60:02d}s"))
    return "  ".join(parts)

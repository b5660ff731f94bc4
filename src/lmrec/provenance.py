"""Where a number comes from: the date, the code, the hardware and the command, recorded next to every
metric lmrec writes (``metrics.json`` of every run, ``compare.json``), so that a figure quoted in the
documentation can name all four (``docs/results.py`` renders the results page from such records)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path


def provenance() -> dict:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lmrec": _version(),
        "commit": _commit(),
        "command": " ".join(["lmrec" if Path(sys.argv[0]).name in ("lmrec", "main.py") else sys.argv[0],
                             *sys.argv[1:]]),
        "hardware": hardware(),
        "torch": torch.__version__,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
    }


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmrec")
    except PackageNotFoundError:
        return None


def hardware() -> str:
    """``"2 CPU cores (…model…)"``, plus the accelerator's name where there is one."""
    import torch

    cpu = f"{os.cpu_count()} CPU cores"
    model = _cpu_model()
    out = f"{cpu} ({model})" if model else cpu
    if torch.cuda.is_available():
        out += f", {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _commit() -> str | None:
    """The git commit of the lmrec source that runs, with ``+dirty`` when it has uncommitted changes; None
    outside a git checkout (an installed wheel)."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=src,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None

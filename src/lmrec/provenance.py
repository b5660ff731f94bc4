"""Where a number comes from: the date, the code, the hardware and the command, recorded next to every
metric lmrec writes (``metrics.json`` of every run, ``compare.json``), so that a figure quoted in the
documentation can name all four (``docs/results.py`` renders the results page from such records)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


def provenance() -> dict:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lmrec": _version(),
        "commit": _commit(),
        "command": _command(),
        "hardware": hardware(),
        "torch": torch.__version__,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
    }


def _command() -> str:
    """The command line as a user types it: ``lmrec ...`` for the CLI, ``python bench/x.py ...`` for a script."""
    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if first.name in ("lmrec", "main.py"):
        head = "lmrec"
    elif first.suffix == ".py":
        try:
            head = f"python {first.resolve().relative_to(Path.cwd())}"
        except ValueError:
            head = f"python {first}"
    else:
        head = str(first)
    return " ".join([head, *sys.argv[1:]])


@dataclass
class Table:
    """One table a benchmark printed: its title, columns, rows (cells as printed) and what a reader must know."""

    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""

    def __post_init__(self):
        bad = [r for r in self.rows if len(r) != len(self.columns)]
        if bad:
            raise ValueError(f"table {self.title!r}: a row has {len(bad[0])} cells for {len(self.columns)} columns: "
                             f"{bad[0]}")
        self.rows = [[str(c) for c in r] for r in self.rows]


def write_record(path: str | Path, *tables: Table, command: str | None = None) -> Path:
    """A benchmark's tables with where they come from (:func:`provenance`; ``command``: the one a user runs,
    where this script is a step of it), as ``docs/results.py add`` reads them (every ``bench/*.py --record
    PATH``); written to a temporary name and renamed."""
    import json

    from lmrec.io import atomic_file

    if not tables:
        raise ValueError(f"{path}: a record needs at least one table")
    prov = provenance()
    rec = {"tables": [asdict(t) for t in tables], "provenance": {**prov, "command": command or prov["command"]}}
    return atomic_file(path, lambda tmp: tmp.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n"))


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
    """The git commit of the lmrec source that runs, with ``+dirty`` when it (or ``bench/``) has uncommitted changes
    or Python files git does not track; None outside a git checkout (an installed wheel), unless
    ``$LMREC_COMMIT`` names it (a copy of a checkout without its ``.git``, as on a benchmark machine)."""
    src = Path(__file__).resolve().parent
    given = os.environ.get("LMREC_COMMIT") or None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return given
        # the package and, in a checkout, the benchmarks beside it (a record's figures come from both)
        paths = ["."] + (["../../bench"] if (src.parents[1] / "bench").is_dir() else [])
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths], cwd=src,
                                capture_output=True, text=True, timeout=5).stdout.splitlines()
        # a changed file, or a new Python file (a script not yet committed); not a benchmark's untracked output
        dirty = [line for line in status if not line.startswith("??") or line.endswith(".py")]
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return given

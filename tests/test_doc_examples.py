"""Every shell and Python block of the README and the documentation is run here, on the small example shop
(`examples/shop`), or is marked on the line above it as not run, with the reason:

    <!-- not run: trains on all of MovieLens-100k (minutes); tests/test_cli_e2e.py runs the quickstart -->

The blocks of one page run in order in one directory (a page's later commands use what its earlier ones
made), as a reader at the repository's root would run them: `source .venv/bin/activate` lines are skipped
(the test's own environment has lmrec), everything else runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?:^<!-- not run: (?P<reason>[^\n]*?) -->\n)?^```(?P<lang>bash|python)\n(?P<body>.*?)^```",
                   re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, the reason it is not run or None) of every bash/python block of a page."""
    return [(m["lang"], m["body"], m["reason"]) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def test_every_block_runs_or_says_why_not():
    unmarked_empty = [(p.name, i) for p in PAGES for i, (_, _, why) in enumerate(blocks(p)) if why is not None
                      and len(why.strip()) < 10]
    assert unmarked_empty == [], "a 'not run' marker needs its reason"
    assert sum(why is None for p in PAGES for _, _, why in blocks(p)) >= 3  # the examples a newcomer starts with


RUN = [p for p in PAGES if any(why is None for _, _, why in blocks(p))]


@pytest.mark.parametrize("page", RUN, ids=[str(p.relative_to(ROOT)) for p in RUN])
def test_the_examples_of_a_page_run_as_written(page, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LMREC_PROGRESS": "0", "LMREC_REPORT": "0", "COLUMNS": "200"}  # (reports: tests/test_report.py)
    for n, (lang, code, why) in enumerate(blocks(page)):
        if why is not None:
            continue
        if lang == "bash":
            code = "\n".join(ln for ln in code.splitlines() if not ln.startswith("source .venv/"))
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:
            cmd = [sys.executable, "-c", code]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{page.name}, block {n + 1}:\n{code}\n--- stderr:\n{res.stderr[-3000:]}"


def test_the_example_shops_are_what_their_script_writes(tmp_path):
    """`examples/make_shop.py` is deterministic and the committed shops are its output."""
    import runpy

    make = runpy.run_path(str(ROOT / "examples" / "make_shop.py"))["main"]
    for name, zh in (("shop", False), ("shop_zh", True)):
        make(tmp_path / name, zh=zh)
        for f in ("clicks.csv", "items.csv"):
            assert (tmp_path / name / f).read_bytes() == (ROOT / "examples" / name / f).read_bytes(), (name, f)

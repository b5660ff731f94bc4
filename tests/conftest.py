"""Shared fixtures: tiny tokenizers/backbones built in the tests, and the real MovieLens-100k."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training commands write report.html at the end (~2 s of plotting each); the tests that check reports turn
# it on for their run (run_cli(..., env={"LMREC_REPORT": "1"})).
os.environ.setdefault("LMREC_REPORT", "0")
# Under pytest-xdist (run.sh runs the suite on two workers) each worker takes one core: one thread for torch
# in the worker and in the processes its tests start, not two workers of two threads each on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
ITEM_TEXTS = [
    [("title", "Toy Story"), ("year", "1995"), ("genres", "Animation Children's Comedy")],
    [("title", "GoldenEye"), ("year", "1995"), ("genres", "Action Adventure Thriller")],
    [("title", "Four Rooms"), ("year", "1995"), ("genres", "Thriller")],
    [("title", "Get Shorty"), ("year", "1995"), ("genres", "Action Comedy Drama")],
    [("title", "Copycat"), ("year", "1995"), ("genres", "Crime Drama Thriller")],
]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit code, stdout, stderr as a user sees them)."""
    env = {**os.environ, "COLUMNS": "250", **(env or {})}  # rich tables unfolded, so that tests can search them
    return subprocess.run([sys.executable, "-m", "lmrec.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


def walk_interactions(users: int = 60, items: int = 40, steps: int = 8):
    """(users, items, times) of users walking the catalog in strides of 1–3 from a random start: learnable."""
    import numpy as np

    rng = np.random.default_rng(0)
    u, i, t = [], [], []
    for user in range(users):
        cur = int(rng.integers(items))
        for step in range(steps):
            u.append(f"u{user}"), i.append(f"i{cur}"), t.append(float(step))
            cur = (cur + 1 + user % 3) % items
    return u, i, t


# What `one_thread` (below) does for this process, for a subprocess that trains: run_cli(..., env=ONE_THREAD).
# On a busy machine a second thread of a tiny model waits for the other process's cores: a `gen train` run
# took twice as long on two threads as on one (on an idle machine, about the same).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread():
    """One thread: models this small train faster on it (a second one costs more in hand-offs than it adds,
    the more so on a shared machine), and the numbers do not depend on the machine's core count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny random-init Longformer (allenai layout) with a WordPiece tokenizer trained on item text."""
    from lmrec.recformer.backbones import build_default_backbone

    texts = [" ".join(f"{k} {v}" for k, v in t) for t in ITEM_TEXTS] * 3
    out = tmp_path_factory.mktemp("backbone")
    return build_default_backbone(texts, out, hidden_size=32, layers=2, heads=2, vocab_size=200,
                                  max_positions=128, attention_window=8)


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory) -> Path:
    """The real MovieLens-100k prepared with leave-one-out (obtained as `lmrec data prepare` does)."""
    from lmrec.api import prepare

    return prepare("ml-100k", tmp_path_factory.mktemp("data") / "ml-100k")


TINY = ["model.default_hidden_size=32", "model.default_layers=1", "model.default_heads=2",
        "model.default_vocab_size=2000", "model.max_token_num=64", "train.stage1_epochs=1", "train.stage2_epochs=1",
        "train.batch_size=32", "train.samples_per_user=2", "train.item_grad=batch", "model.pooler_type=mean"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A RecFormer finetuned through the CLI on ml-100k with a tiny model (tests/test_cli_e2e.py, test_report.py)."""
    root = tmp_path_factory.mktemp("e2e")
    res = run_cli("data", "prepare", "ml-100k", root / "ml")
    assert res.returncode == 0, res.stderr
    assert '"interactions": 100000' in res.stdout and "source:" in res.stdout
    res = run_cli("finetune", "--data", root / "ml", f"output_dir={root / 'run'}", *TINY, env={"LMREC_REPORT": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report: {root / 'run' / 'report.html'}" in res.stderr
    assert "RecFormer" in res.stdout and "popularity" in res.stdout and "random" in res.stdout
    return root

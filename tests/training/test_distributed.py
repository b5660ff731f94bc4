"""Two CPU processes (gloo) under torchrun: both ranks finish with the same model and the run's outputs."""

import json
import os
import subprocess
from pathlib import Path

from lmrec.data.prepare import prepare
from lmrec.data.readers import RawData
from tests.training.test_launch import torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")


def synthetic_dataset(path: Path, users: int = 40, items: int = 30, seed: int = 0, text: dict | None = None) -> Path:
    """A generated dataset (not real data): users walk through items with a preferred stride. ``text``:
    item id → key/value text (default: generated titles)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    u, i, t = [], [], []
    for user in range(users):
        cur, stride = int(rng.integers(items)), 1 + user % 3
        for step in range(int(rng.integers(6, 12))):
            u.append(f"u{user}"), i.append(f"i{cur}"), t.append(float(step))
            cur = (cur + stride) % items
    text = text or {f"i{k}": [("title", f"thing {k} {'red' if k % 2 else 'blue'}"), ("kind", f"kind {k % 5}")]
                    for k in range(items)}
    return prepare(RawData(u, i, t, text, "synthetic"), path)


def test_two_processes_end_with_the_same_model(tmp_path, tiny_backbone):
    data = synthetic_dataset(tmp_path / "data")
    out = tmp_path / "run"
    overrides = [f"model.backbone={tiny_backbone}", "model.max_token_num=64", "train.stage1_epochs=2",
                 "train.stage2_epochs=1", "train.batch_size=4", "eval.batch_size=8", "train.item_grad=batch"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(tmp_path / "logs"), str(WORKER), str(data), str(out), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    hashes = {p.name: p.read_text() for p in out.glob("rank*-of-2.sha256")}
    assert set(hashes) == {"rank0-of-2.sha256", "rank1-of-2.sha256"}
    assert len(set(hashes.values())) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["users"] == 40  # every user evaluated once across the two shards
    assert len(metrics["history"]["stage1"]) == 2 and len(metrics["history"]["stage2"]) == 1


def test_contrastive_gather_equals_single_process(tmp_path, tiny_backbone):
    """2 processes × 4 pairs with items gathered across ranks == 1 process × 8 pairs: same loss, and the
    DDP gradient equals the single-process one (the gathered copies send their gradients back)."""
    out = tmp_path / "result.json"
    cmd = [*torchrun(tmp_path / "logs"), str(Path(__file__).with_name("contrastive_worker.py")), str(tiny_backbone),
           str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert abs(r["ddp_loss"] - r["single_loss"]) < 1e-6  # the logits are float32 (the encoders run in float64)
    assert r["grad_max"] > 1e-5 and r["grad_max_diff"] < 1e-6 * r["grad_max"]

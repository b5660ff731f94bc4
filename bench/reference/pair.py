"""What the two-model reference scripts share: their command line (DATA MODEL_A MODEL_B [--record OUT.json])
and the two saved recommenders, loaded on the CPU and readied for the dataset's catalog."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lmrec.api import load_recommender, model_label  # noqa: E402
from lmrec.data.dataset import PreparedDataset  # noqa: E402


def ready(path: Path, ds: PreparedDataset):
    """A saved recommender, loaded on the CPU and readied for the dataset's catalog."""
    return load_recommender(path, device="cpu").ready_for(ds.item_ids, ds.item_text)


def two_models(description: str):
    """(the parsed arguments, the dataset, the two recommenders, their labels)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("data", type=Path)
    ap.add_argument("model_a", type=Path)
    ap.add_argument("model_b", type=Path)
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    ds = PreparedDataset(args.data)
    models = (args.model_a, args.model_b)
    recs = [ready(m, ds) for m in models]
    return args, ds, recs, [model_label(m) for m in models]

"""The independent check of ``lmrec baseline``: RecBole 1.2.1 itself on MovieLens-100k, on the protocol of
lmrec's tables (leave-one-out by time, full ranking over all items, validation NDCG@10 for early stopping,
RecBole's defaults otherwise: CE loss, no negative sampling, Adam 1e-3, batch 2048, patience 10).

Not a dependency of lmrec and not run by its tests: install RecBole in a separate environment and run

    pip install recbole==1.2.1 colorlog==4.7.2 texttable thop 'pandas<3'
    python bench/reference/recbole_ml100k.py SASRec 0      # or GRU4Rec; seed; optional max epochs

It prints one ``RESULT {json}`` line (best validation and test metrics). RecBole trains one sample per
prefix (~97k a epoch) and takes ~5 min an epoch on 2 CPU cores; on a GPU machine ~7-14 s. The shims below
let RecBole 1.2.1 run on NumPy 2 and torch >= 2.6 (it aliases ``np.float_``, imports ``ray.tune`` for
hyper-parameter search only, and loads its own pickled checkpoint with ``torch.load``'s old default).
The measured numbers are in the README ("Baselines").
"""

import json
import os
import sys
import time
import types

import numpy as np

for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, old):
        setattr(np, old, new)
_ray = types.ModuleType("ray")
_ray.tune = types.ModuleType("ray.tune")
sys.modules.setdefault("ray", _ray)
sys.modules.setdefault("ray.tune", _ray.tune)
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import recbole  # noqa: E402
import torch  # noqa: E402
from recbole.quick_start import run_recbole  # noqa: E402


def main(model: str, seed: int, epochs: int = 300) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {
        "data_path": os.path.dirname(recbole.__file__) + "/dataset_example",  # the ml-100k lmrec prepares
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "train_neg_sample_args": None, "loss_type": "CE",
        "metrics": ["Recall", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "seed": seed, "reproducibility": True, "show_progress": False,
        "device": dev, "use_gpu": dev == "cuda", "epochs": epochs,
        "checkpoint_dir": f"/tmp/recbole_saved/{model}-{seed}", "log_wandb": False,
    }
    t = time.time()
    res = run_recbole(model=model, dataset="ml-100k", config_dict=cfg)
    return {"model": model, "seed": seed, "seconds": round(time.time() - t, 1), "device": dev,
            "best_valid": {k: float(v) for k, v in res["best_valid_result"].items()},
            "test": {k: float(v) for k, v in res["test_result"].items()}}


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in ("SASRec", "GRU4Rec"):
        sys.exit("usage: recbole_ml100k.py SASRec|GRU4Rec [seed] [max epochs]")
    out = main(args[0], int(args[1]) if len(args) > 1 else 0, int(args[2]) if len(args) > 2 else 300)
    print("RESULT", json.dumps(out), flush=True)

"""Is a model's drop from validation to test in its inputs or in the targets? (docs/baselines.md, RecFormer.)

Two saved recommenders of one comparison seed (e.g. RecFormer and SASRec), each scored on the same users with
the inputs and targets shifted one step at a time: the validation pairs (train → valid item), the test pairs
(train + valid item → test item), the same histories with the other split's targets (train → test item, two
steps ahead; train minus its last item → valid item) and the last training pair (train minus its last item →
that item). Full ranking over the catalog, NDCG@10, no history excluded — the comparison's protocol. The ratio
column is the first model's figure over the second's: where it moves with the targets but not with the
histories, the difference lies in which items are the targets.

    python bench/reference/shifted_targets.py DATA MODEL_A MODEL_B [--record OUT.json]
(e.g. RUNS/recformer/seed-0/model RUNS/sasrec/seed-0/model of `lmrec compare`; any saved recommender works.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pair import two_models  # noqa: E402

from lmrec.data.dataset import Examples, PreparedDataset  # noqa: E402
from lmrec.eval.evaluator import evaluate  # noqa: E402
from lmrec.provenance import Table, write_record  # noqa: E402


def cases(ds: PreparedDataset) -> dict[str, Examples]:
    """The five (inputs → targets) sets, over the users that have both a validation and a test target."""
    valid, test = ds.examples("valid"), ds.examples("test")
    keep = np.isin(valid.users, test.users)
    hist = [h for h, k in zip(valid.histories, keep, strict=True) if k]
    short = [h[:-1] for h in hist]
    return {"validation: train → valid item": Examples(test.users, hist, valid.targets[keep]),
            "test: train + valid item → test item": test,
            "train → test item (2 steps)": Examples(test.users, hist, test.targets),
            "train minus last → valid item (2 steps)": Examples(test.users, short, valid.targets[keep]),
            "train minus last → last train item": Examples(test.users, short, np.array([h[-1] for h in hist]))}


def main() -> None:
    args, ds, recs, names = two_models(__doc__.splitlines()[0])
    rows, sets = [], cases(ds)
    for label, ex in sets.items():
        a, b = (evaluate(r.rank_fn(), ex, ks=[10])["ndcg@10"] for r in recs)
        rows.append([label, f"{a:.4f}", f"{b:.4f}", f"{a / b:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    if args.record:
        write_record(args.record, Table(
            title="The same users with shifted inputs and targets (NDCG@10, full ranking)",
            columns=["inputs → targets", names[0], names[1], f"{names[0]} / {names[1]}"], rows=rows,
            note=f"{len(sets['test: train + valid item → test item'])} users; models {args.model_a} and "
                 f"{args.model_b}; no history excluded"))


if __name__ == "__main__":
    main()

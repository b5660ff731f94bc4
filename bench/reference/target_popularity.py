"""Where does one model win and the other lose: NDCG@10 by how popular the target item is (docs/baselines.md).

Two saved recommenders of one comparison seed (e.g. RecFormer and SASRec), scored on the validation and the test
pairs of the comparison's protocol (full ranking over the catalog, no history excluded), the users split into
four groups of about equal size by their target's number of training interactions (quartiles, per split; where
many targets share a count the quartile edges can coincide, and a group that is left empty is dropped — the
others keep their numbers). A row also gives the mean training count of the items each model puts in its top 10:
a model that ranks by popularity more than the other shows it there.

    python bench/reference/target_popularity.py DATA MODEL_A MODEL_B [--record OUT.json]
(e.g. RUNS/recformer/seed-0/model RUNS/sasrec/seed-0/model of `lmrec compare`; any saved recommender works.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pair import two_models  # noqa: E402

from lmrec.data.dataset import Examples  # noqa: E402
from lmrec.eval.evaluator import evaluate  # noqa: E402
from lmrec.provenance import Table, write_record  # noqa: E402


def groups(ex: Examples, counts: np.ndarray) -> dict[str, Examples]:
    """The whole split and its four quartiles of the target's training count (ties kept in the lower one)."""
    if not len(ex):
        raise SystemExit("the split has no users")
    c = counts[ex.targets]
    edges = np.quantile(c, [0.25, 0.5, 0.75])
    which = np.searchsorted(edges, c, side="left")
    out = {"all targets": ex}
    for g in range(4):
        keep = np.flatnonzero(which == g)
        if not len(keep):  # quartiles that coincide (many ties): the group is in the one below
            continue
        lo, hi = c[keep].min(), c[keep].max()
        out[f"quartile {g + 1}: target seen {lo}–{hi} times"] = Examples(
            ex.users[keep], [ex.histories[i] for i in keep], ex.targets[keep])
    return out


def top10(rec, ex: Examples, num_users: int) -> np.ndarray:
    """(users of the dataset, 10): each user's top 10 item indices (-1: none there, fewer than 10 with a finite
    score), for the users of ``ex`` — once per split; each group reads its users' rows."""
    found = np.concatenate([rec.top_k(ex.histories[s:s + 256], 10, exclude_history=False)[1].cpu().numpy()
                            for s in range(0, len(ex), 256)])
    out = np.full((num_users, 10), -1, dtype=np.int64)
    out[ex.users] = found
    return out


def mean_count(found: np.ndarray, counts: np.ndarray) -> float:
    """The mean training count of the items in ``found`` (-1 skipped)."""
    return float(counts[found[found >= 0]].mean())


def main() -> None:
    args, ds, recs, names = two_models(__doc__.splitlines()[0])
    counts = ds.train_item_counts()
    rows = []
    for split in ("valid", "test"):
        examples = ds.examples(split)
        tops = [top10(r, examples, ds.num_users) for r in recs]
        for label, ex in groups(examples, counts).items():
            a, b = (evaluate(r.rank_fn(), ex, ks=[10])["ndcg@10"] for r in recs)
            pa, pb = (mean_count(t[ex.users], counts) for t in tops)
            rows.append([split, label, str(len(ex)), f"{a:.4f}", f"{b:.4f}", f"{a / b:.2f}" if b else "—",
                         f"{pa:.0f}", f"{pb:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    if args.record:
        write_record(args.record, Table(
            title="NDCG@10 by the target's training count (full ranking)",
            columns=["split", "targets", "users", names[0], names[1], f"{names[0]} / {names[1]}",
                     f"{names[0]}: top-10 items' mean count", f"{names[1]}: top-10 items' mean count"],
            rows=rows, note=f"models {args.model_a} and {args.model_b}; no history excluded; quartiles of "
                            "the target's number of training interactions, per split"))


if __name__ == "__main__":
    main()

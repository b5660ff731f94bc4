"""Is model A better than model B, or is the difference the users' noise? A paired comparison of NDCG@10.

Saved recommenders of one or more comparison seeds, A and B of each seed scored on the same users and targets
(the comparison's protocol: full ranking over the catalog, no history excluded). Each user's NDCG@10 under A
minus under B, averaged over the seeds (leave-one-out gives every seed the same users and targets, so the seeds
are not independent samples: the user is the unit), then its mean over the users with a standard error and a
95 % interval (normal approximation: hundreds of users; ``lmrec.eval.metrics.paired_difference``, which
``lmrec compare`` reports against SASRec from the ranks its runs wrote; this script scores saved models again,
on either split). An interval that holds 0 is a difference the split's users cannot tell from chance; a rule
that adopts a setting when it validates better in every one of three seeds adopts such a difference about one
time in eight (1/2³).

    python bench/reference/paired.py DATA A_SEED0 B_SEED0 [A_SEED1 B_SEED1 ...] [--split valid] [--record OUT]
(e.g. RUNS/hybrid/seed-0/model RUNS/sasrec/seed-0/model ... of `lmrec compare`; any saved recommenders work.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pair import ready  # noqa: E402

from lmrec.api import model_label  # noqa: E402
from lmrec.data.dataset import PreparedDataset  # noqa: E402
from lmrec.eval.evaluator import evaluate  # noqa: E402
from lmrec.eval.metrics import ndcg_per_user, paired_difference  # noqa: E402
from lmrec.provenance import Table, write_record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("models", type=Path, nargs="+", help="A and B of each seed, in pairs")
    ap.add_argument("--split", choices=["valid", "test", "both"], default="valid")
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    if len(args.models) % 2:
        raise SystemExit(f"{len(args.models)} models: give them in pairs, A then B of each seed")
    ds = PreparedDataset(args.data)
    splits = ("valid", "test") if args.split == "both" else (args.split,)
    scores = {s: [] for s in splits}  # per split: one (users,) array per model, in the order given
    for path in args.models:
        rec = ready(path, ds)
        for s in splits:
            ranks = evaluate(rec.rank_fn(), ds.examples(s), ks=[10], return_ranks=True)[1]
            scores[s].append(ndcg_per_user(ranks, 10))
    rows = []
    for s in splits:
        g = np.stack(scores[s])
        r = paired_difference(g[0::2], g[1::2])
        rows.append([s, str(g.shape[1]), str(len(args.models) // 2), f"{r['a']:.4f}", f"{r['b']:.4f}",
                     f"{r['diff']:+.4f}", f"{r['se']:.4f}", f"[{r['low']:+.4f}, {r['high']:+.4f}]",
                     " ".join(f"{x:+.4f}" for x in r["per_seed"])])
        print(" | ".join(rows[-1]), flush=True)
    if args.record:
        a, b = model_label(args.models[0]), model_label(args.models[1])
        write_record(args.record, Table(
            title="Paired NDCG@10 difference over users (A − B)",
            columns=["split", "users", "seeds", f"A ({a})", f"B ({b})", "A − B", "standard error", "95 % interval",
                     "A − B per seed"],
            rows=rows, note="models (A, B per seed): " + ", ".join(map(str, args.models))
                            + "; full ranking, no history excluded"))


if __name__ == "__main__":
    main()

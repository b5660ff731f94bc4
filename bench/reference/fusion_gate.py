"""Would a per-user gate beat the fusion's one weight? (docs/baselines.md, "The fusion".)

For each seed of a finished ``lmrec compare ... --models ...,fusion`` this reads the fused model the comparison
saved (its ID model, generative model and semantic IDs), scores every validation user under every (rule,
weight) the fusion tries, and compares by 5-fold cross-validation over the validation users:

* the reference — one (rule, weight) for every user, chosen on the other folds (what ``lmrec.fusion`` does);
* gates — one (rule, weight) per bin of one per-user feature (2, 3 or 4 quantile bins), each bin's choice made
  on the other folds. The features are what both models say about the user before the target is known: the
  top beam's probability and the beams' entropy (renormalised over the beams), the beams' share of the
  generative model's probability mass (log), the ID model's top probability (log), how many of the ID
  model's top 10 items the beams' top 10 hold, and the history's length (log).

Validation only: the test split is not read. Usage:
    python bench/reference/fusion_gate.py RUNS_DIR [--seeds 0,1,2] [--record OUT.json]
(RUNS_DIR: the comparison's output directory, holding fusion/seed-<s>/model/fusion.json.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lmrec.data.dataset import PreparedDataset  # noqa: E402
from lmrec.fusion import RULES, FusedRecommender, read_spec  # noqa: E402
from lmrec.provenance import Table, write_record  # noqa: E402

FEATURES = ("top beam p", "beam entropy", "beam mass", "ID top p", "top-10 overlap", "history length")
WEIGHTS = tuple(np.round(np.linspace(0, 1, 11), 1))
FOLDS = 5


def user_table(rec: FusedRecommender, examples, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(users × features, users × (rule, weight) NDCG@10) over the validation users."""
    feats, gains = [], []
    all_items = torch.arange(len(rec.item_ids))
    for start in range(0, len(examples), batch):
        hist, targets = examples.histories[start:start + batch], examples.targets[start:start + batch]
        items, raw = rec.gen.beam_search(hist, rec.beams)
        raw = raw.float().cpu().masked_fill(items.cpu() < 0, float("-inf"))
        parts = rec.parts(hist, list(RULES), (items, raw))
        ranks = np.stack([rec.ranks(parts, hist, targets, w, rule=r)[0] for r in RULES for w in WEIGHTS], 1)
        gains.append(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0))
        logits = rec._id_logits(parts["user"], all_items)
        q, logq = parts["beam_logq"].exp(), parts["beam_logq"]
        top10 = logits.topk(10).indices
        overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top10, parts["beam_items"][:, :10],
                                                                          strict=True)]
        feats.append(torch.stack([q.max(-1).values, -(q * logq.nan_to_num(neginf=0.0)).sum(-1),
                                  torch.logsumexp(raw, -1), logits.max(-1).values - parts["lse"],
                                  torch.tensor(overlap, dtype=torch.float),
                                  torch.tensor([np.log1p(len(h)) for h in hist], dtype=torch.float)], 1).numpy())
    return np.concatenate(feats), np.concatenate(gains)


def cross_validated(feat: np.ndarray | None, gains: np.ndarray, bins: int, seed: int = 0) -> float:
    """Mean NDCG@10 of held-out users, each fold's choices (one per bin of ``feat``; one in all: None) made
    on the other folds."""
    fold = np.random.default_rng(seed).permutation(len(gains)) % FOLDS
    out = np.empty(len(gains))
    for k in range(FOLDS):
        fit, held = fold != k, fold == k
        if feat is None:
            out[held] = gains[held][:, gains[fit].mean(0).argmax()]
            continue
        edges = np.quantile(feat[fit], np.linspace(0, 1, bins + 1)[1:-1])
        fit_bin, held_bin = np.digitize(feat[fit], edges), np.digitize(feat[held], edges)
        fallback = gains[fit].mean(0).argmax()
        choice = np.array([gains[fit][fit_bin == b].mean(0).argmax() if (fit_bin == b).any() else fallback
                           for b in range(bins)])
        out[held] = gains[held][np.arange(held.sum()), choice[held_bin]]
    return float(out.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    columns = ["seed", "ID model", "one weight", "worst gate", "best gate", "best / one", "gates above one"]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        fused = args.runs / "fusion" / f"seed-{seed}" / "model"
        spec = read_spec(fused)
        feats, gains = user_table(FusedRecommender.load(fused), PreparedDataset(spec["data"]).examples("valid"))
        one = cross_validated(None, gains, 1)
        gates = {(name, b): cross_validated(feats[:, i], gains, b) for i, name in enumerate(FEATURES)
                 for b in (2, 3, 4)}
        (name, b), best = max(gates.items(), key=lambda kv: kv[1])
        rows.append([seed, spec.get("id_model_name", "?"), f"{one:.4f}", f"{min(gates.values()):.4f}",
                     f"{best:.4f} ({name}, {b} bins)", f"{best / one:.3f}",
                     f"{sum(v > one for v in gates.values())} of {len(gates)}"])
        print(" | ".join(f"{c}: {v}" for c, v in zip(columns, rows[-1], strict=True)), flush=True)
    if args.record:
        write_record(args.record, Table(
            title="A per-user gate against the fusion's one weight (validation NDCG@10, 5-fold CV over users)",
            columns=columns, rows=rows,
            note="18 gates: 6 features × 2, 3 or 4 quantile bins, each bin's rule and weight chosen on the other "
                 "folds; the test split is not read"))


if __name__ == "__main__":
    main()

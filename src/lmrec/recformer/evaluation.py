"""RecFormer's end-of-run evaluation: test and valid metrics next to popularity, and on a cold-start split
the new-item protocol (each target ranked among the items never seen before test time)."""

from __future__ import annotations

from lmrec.data.dataset import PreparedDataset
from lmrec.eval.baselines import baselines, new_items_protocol
from lmrec.eval.evaluator import evaluate
from lmrec.recformer.recommender import Recommender


def evaluate_all(rec: Recommender, ds: PreparedDataset, ev, acc=None, item_batch_size: int = 256
                 ) -> tuple[dict, tuple]:
    """Test and valid metrics of the recommender and of popularity, on the same split; and (the test examples,
    their ranks) for ``Run.finish``."""
    kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=acc)
    out: dict = {}
    if not rec.has_item_table:
        rec.encode_items(item_batch_size, acc)
    rank_fn = rec.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size)
    test = ds.examples("test")
    out["test"], ranks = evaluate(rank_fn, test, desc="test", return_ranks=True, **kw)
    out["valid"] = evaluate(rank_fn, ds.examples("valid"), desc="valid", **kw)
    for split, key in (("test", "baselines"), ("valid", "baselines_valid")):
        out[key] = baselines(ds, split, exclude_history=ev.exclude_history, **kw)
    new = evaluate_new_items(rec, ds, ev, acc)
    if new is not None:
        out["test_new_items"] = new
    return out, (test, ranks)


def evaluate_new_items(rec: Recommender, ds: PreparedDataset, ev, acc=None) -> dict | None:
    """On a cold-start split, each test target ranked among the items never seen before test time
    (:func:`~lmrec.eval.baselines.new_items_protocol`); None on other splits."""
    return new_items_protocol(
        ds, lambda new: rec.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size, candidates=new),
        ks=ev.ks, exclude_history=ev.exclude_history, batch_size=ev.batch_size, accelerator=acc)

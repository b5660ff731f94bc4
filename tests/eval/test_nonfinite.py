"""A diverged model never scores: non-finite scores rank last in every family (dot ranking, beam search, the
ID baselines), are counted and reported, validation never keeps such an epoch, and `lmrec doctor` and
`lmrec evaluate` say so (issue 21, point 1)."""

import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmrec.eval.ranking import target_ranks, top_k
from tests.conftest import ONE_THREAD, run_cli
from tests.training.test_distributed import synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """By hand: non-finite scores are the lowest and all equal; higher + half the ties, the target aside."""
    ranks = []
    for s, t in zip(scores, targets.tolist()):
        bad = ~torch.isfinite(s)
        others = torch.ones_like(bad)
        others[t] = False
        if bad[t]:
            ranks.append(float((~bad & others).sum() + 0.5 * (bad & others).sum()))
        else:
            ranks.append(float(((s > s[t]) & ~bad & others).sum() + 0.5 * ((s == s[t]) & others).sum()))
    return torch.tensor(ranks, dtype=torch.float64)


def test_non_finite_scores_rank_last_never_first():
    g = torch.Generator().manual_seed(0)
    q, items = torch.randn(6, 4, generator=g), torch.randn(30, 4, generator=g)
    items[[2, 7, 19]] = float("nan")  # three broken items
    items[11, 0] = float("inf")  # an overflowed one: its scores are ±inf or NaN
    q[4] = float("nan")  # a user whose history encodes to NaN: every score NaN
    targets = torch.tensor([2, 5, 7, 11, 5, 0])  # broken targets, finite targets, the NaN user
    expected = _reference_ranks(q @ items.T, targets)
    for chunk in (1, 7, 30):
        ranks, bad = target_ranks(q, items, targets, chunk_size=chunk, return_nonfinite=True)
        assert torch.equal(ranks, expected), chunk
        assert bad.all()  # every user saw a non-finite score (the broken items)
    # a NaN target ranks below every finite item: 26 finite others, 3 broken ones tie with it
    assert expected[0] == 26 + 0.5 * 3 and expected[4] == 0.5 * 29  # the NaN user: all tied, the middle
    # a model with every weight NaN ranks the target in the middle, far from the top (it ranked first: 0)
    nan_ranks = target_ranks(torch.full((3, 4), float("nan")), torch.full((100, 4), float("nan")),
                             torch.tensor([0, 50, 99]))
    assert nan_ranks.tolist() == [49.5] * 3
    finite = target_ranks(q[:4], torch.randn(30, 4, generator=g), targets[:4], return_nonfinite=True)[1]
    assert not finite.any()


def test_top_k_never_returns_a_non_finite_item():
    g = torch.Generator().manual_seed(1)
    q, items = torch.randn(3, 4, generator=g), torch.randn(12, 4, generator=g)
    items[[0, 5, 6]] = float("nan")
    q[2] = float("nan")
    s, i = top_k(q, items, 12, chunk_size=5)
    scores = q[:2] @ items.T
    finite = [torch.isfinite(r).nonzero().flatten() for r in scores]
    for b in range(2):  # the 9 finite items in score order, then -1 with -inf
        order = finite[b][scores[b, finite[b]].argsort(descending=True)]
        assert i[b, :9].tolist() == order.tolist() and i[b, 9:].tolist() == [-1] * 3
        assert torch.isinf(s[b, 9:]).all()
    assert i[2].tolist() == [-1] * 12  # nothing to recommend from a NaN history


def test_the_evaluator_counts_and_reports_users_with_non_finite_scores(caplog):
    from lmrec.data.dataset import Examples
    from lmrec.eval.evaluator import dot_rank_fn, evaluate

    g = torch.Generator().manual_seed(2)
    users, items = torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g)
    users[[3, 7]] = float("nan")  # two users diverged
    ex = Examples(np.arange(10), [np.array([u]) for u in range(10)], np.arange(10) + 20)  # history = [user]
    fn = dot_rank_fn(lambda hs: users[[int(h[0]) for h in hs]], items)
    with caplog.at_level(logging.WARNING, logger="lmrec"):
        m = evaluate(fn, ex, ks=[10], batch_size=4)
    assert m["nonfinite"] == 2 and m["users"] == 10
    assert "2 of 10 users had non-finite scores" in caplog.text
    ranks = evaluate(fn, ex, ks=[10], return_ranks=True)[1]
    assert ranks[[3, 7]].tolist() == [39 * 0.5] * 2  # every score NaN: all tied, in the middle, not 0
    healthy = evaluate(dot_rank_fn(lambda hs: users[[0] * len(hs)], items), ex, ks=[10])
    assert "nonfinite" not in healthy  # a healthy model's metrics keep their keys


def test_a_diverged_id_baseline_scores_zero_not_one(tmp_path):
    """SASRec with every weight NaN: every target used to rank 0 (recall@10 = NDCG@10 = 1.0)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.evaluator import evaluate
    from lmrec.idrec.models import IdRecConfig, IdSeqRec
    from lmrec.idrec.train import rank_fn

    ds = PreparedDataset(synthetic_dataset(tmp_path / "data"))
    model = IdSeqRec(IdRecConfig(num_items=ds.num_items, hidden_size=16, heads=2, inner_size=32))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    m = evaluate(rank_fn(model), ds.examples("test"), ks=[10])
    assert m["recall@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["mrr"] < 0.1
    assert m["nonfinite"] == m["users"] == 40


def test_popularity_is_finite_and_unchanged(tmp_path):
    """Popularity goes through the same ranker: finite counts, no count of non-finite users, the same ranks
    as a hand count of more popular items (+ half the ties)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.baselines import popularity_rank_fn

    ds = PreparedDataset(synthetic_dataset(tmp_path / "data"))
    ex = ds.examples("test")
    ranks, bad = popularity_rank_fn(ds)(ex.histories, ex.targets)
    counts = ds.train_item_counts()
    by_hand = [(counts > counts[t]).sum() + 0.5 * ((counts == counts[t]).sum() - 1) for t in ex.targets]
    assert ranks.tolist() == by_hand and not bad.any()


class _PoisonedPaths(torch.nn.Module):
    """A causal LM whose next-token log-probabilities are NaN after one token: the paths through it diverged."""

    def __init__(self, model, poison: int):
        from lmrec.generative.beam import _cache_argument

        super().__init__()
        self.model, self.poison, self.config = model, poison, model.config
        self.cache_kw = _cache_argument(model)  # the wrapped model's keyword: past_key_values before 5.2x

    def forward(self, input_ids, cache=None, **kw):  # `cache` named: beam search reads the signature
        out = self.model(input_ids=input_ids, **kw, **({self.cache_kw: cache} if cache is not None else {}))
        hit = (input_ids == self.poison)[..., -out.logits.shape[1]:]
        out.logits = out.logits.masked_fill(hit[..., None], float("nan"))
        return out


def test_beam_search_keeps_finite_paths_first(tmp_path):
    """torch.topk ranks NaN as the largest value: the NaN paths took the first beams (pushing finite items
    out). Now every finite item comes first, best first, equal to brute-force scoring; the paths through the
    poisoned token come last as item -1 with a NaN score (what the evaluator counts)."""
    from lmrec.generative.beam import SidTrie, constrained_beam_search
    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.samples import pad_batch
    from lmrec.generative.vocab import load_lm

    build_default_lm(["title: Toy Story; year: 1995", "hello world"] * 10, tmp_path / "lm", hidden_size=32,
                     layers=1, heads=2, kv_heads=1, head_dim=16, vocab_size=300)
    model, tok = load_lm(tmp_path / "lm")
    model.eval()
    codes = np.array([[a, b] for a in range(3) for b in range(4)])  # 12 items, 3 first-level codes
    level_ids = [[20, 21, 22], [30, 31, 32, 33]]
    trie = SidTrie(codes, level_ids)
    prompts = [[40, 41, 42], [50, 60]]
    batch = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, left=True)
    items, scores = constrained_beam_search(_PoisonedPaths(model, 21), trie, batch, beams=15)
    finite_items = [i for i in range(12) if codes[i, 0] != 1]
    for b, p in enumerate(prompts):
        ref = {}
        for i in finite_items:
            toks = [level_ids[0][codes[i, 0]], level_ids[1][codes[i, 1]]]
            with torch.no_grad():
                lp = model(torch.tensor([p + toks])).logits.log_softmax(-1)[0]
            ref[i] = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(toks))
        order = sorted(ref, key=ref.get, reverse=True)
        assert items[b, :8].tolist() == order
        assert scores[b, :8].numpy() == pytest.approx([ref[i] for i in order], abs=1e-4)
        assert items[b, 8:].tolist() == [-1] * 7 and torch.isnan(scores[b, 8:12]).all()
    few, _ = constrained_beam_search(_PoisonedPaths(model, 21), trie, batch, beams=3)
    assert (few >= 0).all()  # a narrow beam keeps finite items, not the NaN paths


def test_validation_never_keeps_a_non_finite_epoch(tmp_path):
    """Epoch 2's validation is better on paper but saw non-finite scores: epoch 1 stays the best, and its
    model is what on_best saved. A stage whose every validation is non-finite stops the run with a message."""
    from lmrec.config import IdRunConfig
    from lmrec.errors import LmrecError
    from lmrec.training.loop import Stage, data_loader
    from lmrec.training.run import Run
    from tests.training.toy import Toy

    wrapped = Toy()
    loader = lambda epoch: data_loader([{"x": torch.randn(4, 2)}] * 2, seed=epoch)  # noqa: E731
    valid = iter([{"ndcg@10": 0.1, "users": 5}, {"ndcg@10": 0.9, "users": 5, "nonfinite": 1},
                  {"ndcg@10": float("nan"), "users": 5}])
    kept = []
    cfg = IdRunConfig(output_dir=str(tmp_path / "run"))
    with Run(cfg, "t", log=lambda m: None) as run:
        r = run.fit(wrapped, loader, Stage("s", 3, 1e-2, lambda: next(valid), on_best=lambda m, e: kept.append(e)))
    assert kept == [1] and r.best_epoch == 1 and r.best_metrics["ndcg@10"] == 0.1
    assert r.history[1]["valid_nonfinite"] == 1
    bad = iter([{"ndcg@10": float("nan"), "users": 5}, {"ndcg@10": 0.5, "users": 5, "nonfinite": 5}])
    with pytest.raises(LmrecError, match="none of its 2 validation"), \
            Run(cfg.model_copy(update={"output_dir": str(tmp_path / "run2")}), "t", log=lambda m: None) as run:
        run.fit(wrapped, loader, Stage("s", 2, 1e-2, lambda: next(bad), on_best=lambda m, e: kept.append(e)))
    assert kept == [1] and not (tmp_path / "run2").exists()  # a failed run leaves nothing behind
    said, bad = [], iter([{"ndcg@10": float("nan"), "users": 5}])  # finetune's stage 2 keeps stage 1's best
    with Run(cfg.model_copy(update={"output_dir": str(tmp_path / "run3")}), "t", log=said.append) as run:
        r = run.fit(wrapped, loader, Stage("s2", 1, 1e-2, lambda: next(bad)), fallback="the best stage-1 state")
    assert r.best_epoch == -1 and any("keeping the best stage-1 state" in line for line in said)


def _nan_copy(src, dst, *, table_rows=None):
    """A copy of a saved recommender with every weight NaN (or, with ``table_rows``, only those item-table
    rows NaN and the weights untouched)."""
    shutil.copytree(src, dst)
    if table_rows is None:
        state = load_file(str(dst / "model.safetensors"))
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
                  str(dst / "model.safetensors"))
    else:
        table = load_file(str(dst / "item_table.safetensors"))
        table["item_embeddings"][table_rows] = float("nan")
        save_file(table, str(dst / "item_table.safetensors"))
    return dst


def test_a_nan_recformer_evaluates_to_zero_as_a_new_user_sees_it(trained, tmp_path):
    """The acceptance of point 1: the quickstart-style RecFormer with every weight NaN printed recall@10,
    NDCG@10 and MRR 1.0000 through `lmrec evaluate`; now ~0, with a warning naming the users."""
    model = _nan_copy(trained / "run" / "model", tmp_path / "nan")
    res = run_cli("evaluate", "--model", model, "--data", trained / "ml", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-2000:]
    row = next(line for line in res.stdout.splitlines() if "RecFormer" in line)
    values = [float(x) for x in row.replace("│", " ").split()[1:5]]  # recall@10, ndcg@10, mrr@10, mrr
    assert max(values) < 0.01, row
    assert "943 of 943 users had non-finite scores" in res.stdout + res.stderr
    # a few NaN rows of the item table: those items are never recommended and never outrank a finite target
    import lmrec
    from lmrec.data.dataset import PreparedDataset

    ds = PreparedDataset(trained / "ml")
    rows = list(range(0, 1682, 7))
    part = _nan_copy(trained / "run" / "model", tmp_path / "part", table_rows=rows)
    recs = lmrec.recommend(part, ["50", "181", "258"], k=20)
    assert len(recs) == 20 and not {it for it, _, _ in recs} & {ds.item_ids[r] for r in rows}
    m = lmrec.evaluate(part, trained / "ml", ks=[10])
    assert m["nonfinite"] == 943  # every user met the NaN items


def test_doctor_fails_a_backbone_that_gives_nan(tmp_path, tiny_backbone):
    """`lmrec doctor --finetune-epochs 1` on a backbone whose weights are NaN: the finetuning check fails
    (it used to PASS with metrics 1.0: "metrics are finite" could never fail)."""
    from lmrec.recformer.doctor import run_doctor

    nan = tmp_path / "nan"
    shutil.copytree(tiny_backbone, nan)
    weights = next(p for p in nan.iterdir() if p.name.endswith(".safetensors"))
    state = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              str(weights))
    data = synthetic_dataset(tmp_path / "data")
    checks = run_doctor(nan, finetune_epochs=1, data=data, log=lambda m: None)
    smoke = next(c for c in checks if c.name.startswith("finetune"))
    assert smoke.ok is False and ("finite" in smoke.detail.lower() or "nan" in smoke.detail.lower()), smoke.detail
    checks = run_doctor(tiny_backbone, finetune_epochs=1, data=data, log=lambda m: None)
    assert next(c for c in checks if c.name.startswith("finetune")).ok is True


def test_a_comparison_over_seeds_carries_the_count():
    """`lmrec compare` averages metrics over seeds: a seed with non-finite users is counted, not a KeyError."""
    from lmrec.compare import summarize

    healthy = {"ndcg@10": 0.2, "users": 10}
    s = summarize([healthy, {"ndcg@10": 0.0, "users": 10, "nonfinite": 10}])
    assert s["mean"] == {"ndcg@10": 0.1} and s["nonfinite"] == 10
    assert "nonfinite" not in summarize([healthy, healthy])

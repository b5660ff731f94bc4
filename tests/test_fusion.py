"""The fusion of an ID model and the generative model (lmrec.fusion): its ranks against a dense reference
computation, complementary models fused above both, the weight chosen on valid, and — on real tiny models
trained here — its ends equal to each model alone, its saved model ranking the same, and the comparison's
fusion row fusing the comparison's own runs."""

import json
import os
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import ONE_THREAD, run_cli
from tests.generative.test_learning import EVAL, PROMPT, shop  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
cli = partial(run_cli, env=ONE_THREAD)


class FakeId:
    """An ID model's calls: a fixed user vector per history, that of its newest item the model knows
    (``users``: by item id; ``none``: for a history of items it never saw), and item vectors."""

    def __init__(self, item_ids, users: dict[str, np.ndarray], items: np.ndarray, none=None):
        self.ids, self.item_index = list(item_ids), {it: i for i, it in enumerate(item_ids)}
        self.users, self.items = users, torch.as_tensor(items, dtype=torch.float32)
        self.none = np.zeros(items.shape[1]) if none is None else none

    def item_vectors(self):
        return self.items

    def user(self, history_ids):
        known = [i for i in history_ids if i in self.item_index]
        return self.users[known[-1]] if known else self.none

    def encode_histories(self, histories):  # the ID model's own rows
        return torch.stack([torch.as_tensor(self.user([self.ids[r] for r in h]), dtype=torch.float32)
                            for h in histories])


class FakeGen:
    """The generative model's calls: fixed beams (items, log-probabilities) per history's last item, in the
    catalog's indices (``-1`` / ``-inf`` pad a short list)."""

    def __init__(self, item_ids, beams: dict[int, tuple[list[int], list[float]]]):
        self.ds = SimpleNamespace(item_ids=list(item_ids), item_text=[[("title", i)] for i in item_ids])
        self.beams = beams

    def beam_search(self, histories, k):
        items = torch.full((len(histories), k), -1)
        scores = torch.full((len(histories), k), float("-inf"))
        for b, h in enumerate(histories):
            it, sc = self.beams[int(h[-1])]
            items[b, : len(it)], scores[b, : len(it)] = torch.as_tensor(it[:k]), torch.as_tensor(sc[:k])
        return items, scores


def reference_ranks(user, items, rows, beams, histories, targets, w, exclude_history, pool=None, rule="mixture"):
    """The fusion written out densely in float64 — mixture: p over the items the ID model knows, q over the
    beams, (1 − w) p + w q; rrf: (1 − w) / (61 + ID rank) + w / (61 + beam position) — then the evaluator's
    rank (strictly higher + half the ties, excluded history never counted)."""
    out = []
    for b, (h, t) in enumerate(zip(histories, targets)):
        logits = np.array([user[b] @ items[r] if r >= 0 else -np.inf for r in rows], dtype=np.float64)
        it, sc = beams[b]
        if rule == "rrf":
            id_rank = np.empty(len(rows))
            id_rank[np.argsort(-logits, kind="stable")] = np.arange(len(rows))
            p = np.where(np.isfinite(logits), 1 / (61 + id_rank), 0.0)
            q = np.zeros(len(rows))
            q[it] = 1 / (61 + np.arange(len(it)))
        else:
            p = np.exp(logits - logits[np.isfinite(logits)].max())
            p /= p.sum()
            q = np.zeros(len(rows))
            e = np.exp(np.array(sc) - max(sc))
            q[it] = e / e.sum()
        s = (1 - w) * p + w * q
        keep = np.ones(len(rows), bool) if pool is None else np.isin(np.arange(len(rows)), pool)
        keep[t] = False
        if exclude_history:
            keep[list(h)] = False
        higher = (s > s[t] * (1 + 1e-5)) & keep
        tied = (np.abs(s - s[t]) <= s[t] * 1e-5) & keep
        out.append(higher.sum() + 0.5 * tied.sum())
    return np.array(out)


@pytest.mark.parametrize("rule", ["mixture", "rrf"])
@pytest.mark.parametrize("exclude_history", [False, True])
def test_fused_ranks_equal_a_dense_reference_over_chunks_and_unknown_items(exclude_history, rule):
    from lmrec.fusion import FusedRecommender

    rng = np.random.default_rng(0)
    n, known = 23, 19  # the last 4 catalog items are new to the ID model
    ids = [f"i{k}" for k in range(n)]
    id_ids = ids[:known][::-1]  # the ID model's own order differs from the catalog's
    vecs = rng.normal(size=(known, 5))
    users = {i: rng.normal(size=5) for i in ids}
    beams = {k: (rng.choice(n, size=6, replace=False).tolist(), sorted(rng.normal(size=6) * 2, reverse=True))
             for k in range(n)}
    histories = [rng.choice(n, size=3, replace=False) for _ in range(40)]
    targets = np.array([rng.integers(n) for _ in histories])
    fake_id = FakeId(id_ids, users, vecs)
    rec = FusedRecommender(fake_id, FakeGen(ids, beams), weight=0.5, beams=6, rule=rule, chunk_size=4)
    rows = [id_ids.index(i) if i in id_ids else -1 for i in ids]
    u = np.stack([fake_id.user([ids[i] for i in h]) for h in histories])
    b = [beams[int(h[-1])] for h in histories]
    parts = rec.parts(histories)
    for w in (0.0, 0.3, 0.5, 1.0):
        got, bad = rec.ranks(parts, histories, targets, w, exclude_history)
        np.testing.assert_array_equal(got, reference_ranks(u, vecs, rows, b, histories, targets, w, exclude_history,
                                                           rule=rule))
        assert not bad.any()
    # among candidates only (the new-item protocol): the probabilities stay the catalog's
    pool = np.union1d(targets, rng.choice(n, size=8, replace=False))
    got, _ = rec.ranks(parts, histories, targets, 0.4, exclude_history, candidates=pool)
    np.testing.assert_array_equal(got, reference_ranks(u, vecs, rows, b, histories, targets, 0.4, exclude_history,
                                                       pool, rule))
    # a new item outside the beams has no mass at w=0 and ties with the other such items, never first
    t_new = np.array([known] * len(histories))
    got, _ = rec.ranks(parts, histories, t_new, 0.0)
    assert (got >= known - 1).all()


@pytest.mark.parametrize("rule", ["mixture", "rrf"])
def test_complementary_models_fused_rank_above_both(rule):
    """Half of the transitions only the ID model knows, the other half only the generative model: each alone
    scores about half; the mixture ranks both kinds at the top."""
    from lmrec.eval.metrics import compute_metrics
    from lmrec.fusion import FusedRecommender

    n = 30
    ids = [f"i{k}" for k in range(n)]
    eye = np.eye(n)
    # from item k: the ID model is sure of k+1 and ranks k+2 last, the generative model is sure of k+2
    rng = np.random.default_rng(0)
    users = {ids[k]: 8 * eye[(k + 1) % n] - eye[(k + 2) % n] + rng.uniform(-0.5, 0, n) for k in range(n)}
    beams = {k: ([(k + 2) % n], [-0.1]) for k in range(n)}
    rec = FusedRecommender(FakeId(ids, users, eye), FakeGen(ids, beams), weight=0.5, beams=1, rule=rule)
    histories = [np.array([k]) for k in range(n)]
    targets = np.array([(k + 1 + k % 2) % n for k in range(n)])  # even users go +1, odd users +2
    parts = rec.parts(histories)
    ndcg = {w: compute_metrics(rec.ranks(parts, histories, targets, w)[0])["ndcg@10"] for w in (0.0, 0.5, 1.0)}
    assert ndcg[0.5] > max(ndcg[0.0], ndcg[1.0]) + 0.2, ndcg


@pytest.mark.parametrize("rule", ["mixture", "rrf"])
def test_fused_with_a_model_that_knows_new_items_they_keep_its_order_among_themselves(rule):
    """An ID model that scores every item (the hybrid: new items by their text) fused with beams that never
    reach the new items: among the new items the fused ranks are that model's own, under every weight below 1
    — the cold-start ability survives the fusion; an ID model that never saw them leaves them unranked (tied)."""
    from lmrec.eval.ranking import target_ranks
    from lmrec.fusion import FusedRecommender

    n, new = 24, np.arange(16, 24)  # items 16..23 are new: no beam ever holds one
    ids = [f"i{k}" for k in range(n)]
    rng = np.random.default_rng(1)
    items = rng.normal(size=(n, 6))
    users = {it: rng.normal(size=6) for it in ids}
    beams = {k: ([int(x) for x in rng.permutation(16)[:5]], sorted(rng.normal(size=5), reverse=True)) for k in range(n)}
    hyb = FakeId(ids, users, items)
    histories = [np.array([k]) for k in range(16)]
    targets = rng.choice(new, size=16)
    alone = target_ranks(hyb.encode_histories(histories), hyb.item_vectors()[new],
                         torch.as_tensor(np.searchsorted(new, targets)))
    for w in (0.0, 0.3, 0.9):
        rec = FusedRecommender(hyb, FakeGen(ids, beams), weight=w, beams=5, rule=rule)
        fused = rec.ranks(rec.parts(histories), histories, targets, w, candidates=new)[0]
        np.testing.assert_array_equal(fused, alone.numpy())
    # the same items unknown to the ID model: all tied among themselves, the middle rank whatever the target
    sas = FakeId(ids[:16], {it: users[it] for it in ids[:16]}, items[:16])
    rec = FusedRecommender(sas, FakeGen(ids, beams), weight=0.3, beams=5, rule=rule)
    np.testing.assert_array_equal(rec.ranks(rec.parts(histories), histories, targets, 0.3, candidates=new)[0],
                                  np.full(16, (len(new) - 1) / 2))


def test_fuse_chooses_the_id_model_on_valid_with_one_beam_search(shop, two_models, tmp_path, monkeypatch):  # noqa: F811
    """Two ID models given by name: each one's validation figures equal fusing it alone, the one (with its rule
    and weight) that validates best is chosen and saved, and the generative model searches each validation
    batch once, not once per ID model."""
    from lmrec.config import IdRunConfig, load_config
    from lmrec.data.dataset import PreparedDataset
    from lmrec.fusion import FusedRecommender, fuse
    from lmrec.generative.recommender import GenerativeRecommender
    from lmrec.idrec.train import train_baseline

    sas, gen = two_models
    gru = train_baseline(load_config(None, [f"output_dir={tmp_path / 'gru'}", "model.arch=gru4rec", "train.epochs=8",
                                            "train.batch_size=16", "model.hidden_size=32", "train.lr=3e-3"],
                                     schema=IdRunConfig), shop / "data", log=lambda m: None)
    kw = {"beams": 10, "ks": [10], "weights": [0.0, 0.5, 1.0], "log": lambda m: None}
    alone = {n: fuse(shop / "data", d, gen.model_dir, shop / "sids", tmp_path / n, **kw)["tried"]
             for n, d in (("sasrec", sas.model_dir), ("gru4rec", gru.model_dir))}
    searched = []
    search = GenerativeRecommender.beam_search

    def counting(self, histories, k):
        searched.append(len(histories))
        return search(self, histories, k)

    monkeypatch.setattr(GenerativeRecommender, "beam_search", counting)
    both = fuse(shop / "data", {"sasrec": sas.model_dir, "gru4rec": gru.model_dir}, gen.model_dir, shop / "sids",
                tmp_path / "both", **kw, batch_size=16)
    assert both["tried"] == {"sasrec": alone["sasrec"]["sasrec"], "gru4rec": alone["gru4rec"]["gru4rec"]}
    best = max((v, n, r, w) for n, by_rule in both["tried"].items() for r, by_w in by_rule.items()
               for w, v in by_w.items())
    assert both["valid"]["ndcg@10"] == best[0] and both["tried"][both["id_model"]][both["rule"]][
        f"{both['weight']:g}"] == best[0]
    ds = PreparedDataset(shop / "data")
    n_valid, n_test = len(ds.examples("valid")), len(ds.examples("test"))
    # one search per batch of validation users for both ID models, then one per batch of the test users
    assert sum(searched) == n_valid + n_test and len(searched) == -(-n_valid // 16) + -(-n_test // 16)
    spec = json.loads((tmp_path / "both" / "fusion.json").read_text())
    chosen = {"sasrec": sas.model_dir, "gru4rec": gru.model_dir}[both["id_model"]]
    assert spec["made_at"]["id_model"] == str(chosen.resolve()) and spec["id_model_name"] == both["id_model"]
    assert FusedRecommender.load(tmp_path / "both").id_rec.model.config.arch == both["id_model"]


@pytest.mark.parametrize("rule", ["mixture", "rrf"])
@pytest.mark.parametrize("broken", ["id", "generative"])
def test_a_diverged_model_in_the_fusion_is_flagged_and_ranks_its_users_last(rule, broken):
    """A NaN from either model (a diverged run's) never scores: those users are counted as non-finite and
    their targets rank below every item, whatever the weight — a NaN model must not score NDCG 1.0."""
    from lmrec.fusion import FusedRecommender

    n = 12
    ids = [f"i{k}" for k in range(n)]
    users = {i: np.ones(n) for i in ids}
    beams = {k: ([(k + 1) % n, (k + 2) % n], [-0.5, -1.0]) for k in range(n)}
    if broken == "id":
        users["i3"] = np.full(n, np.nan)
    else:
        beams[3] = ([4, 5], [float("nan"), -1.0])
    rec = FusedRecommender(FakeId(ids, users, np.eye(n)), FakeGen(ids, beams), weight=0.5, beams=2, rule=rule)
    histories = [np.array([k]) for k in range(n)]
    targets = np.array([(k + 1) % n for k in range(n)])
    for w in (0.0, 0.5, 1.0):
        ranks, bad = rec.ranks(rec.parts(histories), histories, targets, w)
        assert bad.tolist() == [k == 3 for k in range(n)], (w, bad)
        assert ranks[3] >= (n - 1) / 2, (w, ranks)  # last or tied with the other NaNs, never on top


def test_fusion_weights_and_beams_are_checked():
    from lmrec.errors import LmrecError
    from lmrec.fusion import FusedRecommender

    ids = ["a", "b"]
    for kw in ({"weight": 1.5, "beams": 2}, {"weight": 0.5, "beams": 0}):
        with pytest.raises(LmrecError, match="weight|beam"):
            FusedRecommender(FakeId(ids, {}, np.eye(2)), FakeGen(ids, {}), **kw)


@pytest.fixture(scope="module")
def two_models(shop, tmp_path_factory):  # noqa: F811
    """SASRec and the generative model (stage 2) trained on the shop: (sasrec run, generative run)."""
    from lmrec.api import train_generative
    from lmrec.config import IdRunConfig, load_config
    from lmrec.idrec.train import train_baseline

    root = tmp_path_factory.mktemp("fusion")
    sas = train_baseline(load_config(None, [f"output_dir={root / 'sasrec'}", "train.epochs=20", "train.batch_size=16",
                                            "model.hidden_size=32", "train.lr=3e-3", "train.patience=3"],
                                     schema=IdRunConfig), shop / "data", log=lambda m: None)
    gen = train_generative(shop / "data", shop / "sids", shop / "lm", output_dir=root / "gen", stage="2",
                           log=lambda m: None, overrides=[*PROMPT, *EVAL, "train.epochs=6", "train.eval_every=6",
                                                          "train.batch_size=8"])
    return sas, gen


def test_fusion_of_trained_models_ends_at_each_model_alone_and_its_saved_model_ranks_the_same(
        shop, two_models, tmp_path):  # noqa: F811
    import lmrec.api
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.baselines import baselines
    from lmrec.eval.evaluator import evaluate
    from lmrec.fusion import FusedRecommender, fuse

    sas, gen = two_models
    said = []
    out = fuse(shop / "data", sas.model_dir, gen.model_dir, shop / "sids", tmp_path / "fused", beams=10, ks=[10],
               log=said.append)
    # weight 0 is SASRec alone and weight 1 the generative model alone: their own validation figures
    assert list(out["tried"]) == ["sasrec"] and out["id_model"] == "sasrec"  # named by the model's own arch
    tried_sas = out["tried"]["sasrec"]
    assert tried_sas["mixture"]["0"] == pytest.approx(sas.metrics["valid"]["ndcg@10"], abs=1e-12)
    assert tried_sas["mixture"]["1"] == pytest.approx(gen.metrics["valid"]["ndcg@10"], abs=1e-12)
    tried = [v for by_weight in tried_sas.values() for v in by_weight.values()]
    assert out["valid"]["ndcg@10"] == max(tried) == tried_sas[out["rule"]][f"{out['weight']:g}"]  # chosen on valid
    assert said[-1] == f"fusion: sasrec × generative, {out['rule']} with weight {out['weight']:g}"
    pop = baselines(PreparedDataset(shop / "data"), "test", ks=[10])["popularity"]["ndcg@10"]
    assert out["test"]["ndcg@10"] >= 2 * pop, (out["test"], pop)
    # the saved model: fusion.json names both models and the weight; loaded, it ranks test the same
    spec = json.loads((tmp_path / "fused" / "fusion.json").read_text())
    assert spec["weight"] == out["weight"] and spec["beams"] == 10
    rec = FusedRecommender.load(tmp_path / "fused", shop / "data")
    again = evaluate(rec.rank_fn(), PreparedDataset(shop / "data").examples("test"), ks=[10])
    assert again == out["test"]
    # and through the commands every recommender takes (the dataset it was fused on is in fusion.json)
    assert lmrec.api.evaluate(tmp_path / "fused", shop / "data", ks=[10], device="cpu") == out["test"]
    first = rec.item_ids[0]
    r = cli("recommend", "--model", tmp_path / "fused", "--history", first, "-k", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    top = rec.recommend([first], k=5)
    assert len(top) == 5 and first not in [i for i, _, _ in top]  # the history is left out
    assert all(i in r.stdout for i, _, _ in top)
    r = cli("evaluate", "--model", tmp_path / "fused", "--data", shop / "data", "--ks", "10", "--device", "cpu")
    assert r.returncode == 0 and "fusion (SASRec × generative)" in r.stdout and "RecFormer" not in r.stdout
    assert f"{out['test']['ndcg@10']:.4f}" in r.stdout
    r = cli("evaluate", "--model", sas.model_dir, "--data", shop / "data", "--device", "cpu")
    assert r.returncode == 0 and "SASRec" in r.stdout and "RecFormer" not in r.stdout, r.stdout


def test_a_fused_model_directory_that_is_broken_is_one_message(shop, two_models, tmp_path):  # noqa: F811
    from lmrec.fusion import FusedRecommender, fuse
    from lmrec.modelfiles import ModelFileError

    sas, gen = two_models
    with pytest.raises(ModelFileError, match="no fusion.json"):
        FusedRecommender.load(tmp_path, shop / "data")
    fuse(shop / "data", sas.model_dir, gen.model_dir, shop / "sids", tmp_path / "f", beams=10, ks=[10],
         weights=[0.5], log=lambda m: None)
    spec = json.loads((tmp_path / "f" / "fusion.json").read_text())
    gone = {**spec, "id_model": str(tmp_path / "gone"),
            "made_at": {**spec["made_at"], "id_model": str(tmp_path / "gone")}}
    for broken, match in (({**spec, "weight": "high"}, "'weight'"), (gone, "id_model: .* is not a directory"),
                          ({**spec, "made_at": ["x"]}, "'made_at' is not a mapping"),
                          ({**spec, "made_at": {"data": ""}}, "'made_at' is not a mapping of non-empty")):
        (tmp_path / "f" / "fusion.json").write_text(json.dumps(broken))
        with pytest.raises(ModelFileError, match=match):
            FusedRecommender.load(tmp_path / "f", shop / "data")
    (tmp_path / "f" / "fusion.json").write_text("{")
    with pytest.raises(ModelFileError, match="not JSON"):
        FusedRecommender.load(tmp_path / "f", shop / "data")


def test_a_fused_model_moved_with_its_models_or_alone_ranks_the_same(shop, two_models, tmp_path):  # noqa: F811
    """fusion.json names its parts relative to its own directory, and where they were when fused: a run tree
    copied elsewhere as one (the originals gone) and a fused model moved alone both load and rank the same."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.evaluator import evaluate
    from lmrec.fusion import FusedRecommender, fuse, read_spec
    from lmrec.modelfiles import ModelFileError

    sas, gen = two_models
    tree = tmp_path / "a"
    for src, name in ((shop / "data", "data"), (shop / "sids", "sids"), (sas.model_dir, "sasrec"),
                      (gen.model_dir, "gen")):
        shutil.copytree(src, tree / name)
    out = fuse(tree / "data", tree / "sasrec", tree / "gen", tree / "sids", tree / "runs" / "fused", beams=10,
               ks=[10], weights=[0.5], log=lambda m: None)
    spec = json.loads((tree / "runs" / "fused" / "fusion.json").read_text())
    assert spec["id_model"] == "../../sasrec" and spec["made_at"]["id_model"] == str((tree / "sasrec").resolve())
    shutil.move(tree, tmp_path / "b")  # the whole tree elsewhere: nothing left where it was fused
    test = PreparedDataset(tmp_path / "b" / "data").examples("test")
    moved = FusedRecommender.load(tmp_path / "b" / "runs" / "fused")
    assert evaluate(moved.rank_fn(), test, ks=[10]) == out["test"]
    shutil.move(tmp_path / "b", tree)  # back, and the fused model alone elsewhere: found where they were
    shutil.move(tree / "runs" / "fused", tmp_path / "alone")
    assert evaluate(FusedRecommender.load(tmp_path / "alone").rank_fn(), test, ks=[10]) == out["test"]
    # copied alone into another tree whose ID model is another one: not taken for the one fused
    other = tmp_path / "other"
    shutil.copytree(tree, other)
    shutil.copytree(tmp_path / "alone", other / "runs" / "fused")
    weights = other / "sasrec" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # trained again, say: other weights
    spec = read_spec(other / "runs" / "fused")
    assert spec["id_model"] == str((tree / "sasrec").resolve())  # where it was fused: the same files
    shutil.rmtree(tree)
    with pytest.raises(ModelFileError, match=r"id_model: .*other/sasrec is not what was fused"):
        read_spec(other / "runs" / "fused")


def test_a_fused_model_written_through_a_link_names_its_parts_from_where_it_is(shop, two_models, tmp_path):  # noqa: F811
    """``out`` a symbolic link: the atomic write replaces the link by the directory, so the relative paths are
    taken from there, not from the link's target."""
    from lmrec.fusion import fuse, read_spec

    sas, gen = two_models
    (tmp_path / "target").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "fused").symlink_to(tmp_path / "target")
    fuse(shop / "data", sas.model_dir, gen.model_dir, shop / "sids", tmp_path / "runs" / "fused", beams=10, ks=[10],
         weights=[0.5], log=lambda m: None)
    spec = json.loads((tmp_path / "runs" / "fused" / "fusion.json").read_text())
    assert Path(os.path.normpath(tmp_path / "runs" / "fused" / spec["id_model"])) == Path(sas.model_dir).resolve()
    assert read_spec(tmp_path / "runs" / "fused")["id_model"] == str(Path(sas.model_dir).resolve())


def test_the_comparisons_fusion_row_fuses_its_own_runs_of_both_models(shop, two_models, tmp_path, monkeypatch):  # noqa: F811
    """`lmrec compare --models fusion`: the same seed's SASRec and generative runs are made with the settings
    given for their rows (trained first when missing, read back after), fused, and recorded like any row;
    runs made under another eval.exclude_history than the fusion's are refused."""
    import shutil

    from lmrec import compare
    from lmrec.errors import LmrecError

    sas, gen = two_models
    calls = []

    def fake_sasrec(data, run, seed, overrides, log, config=None):  # the trained model stands in for a run
        calls.append(("sasrec", seed, [o for o in overrides if o != "train.overwrite=true"], config))
        shutil.copytree(sas.run_dir, run, dirs_exist_ok=True)
        return sas.metrics["test"]

    def fake_generative(data, run, seed, overrides, log, config=None):
        calls.append(("generative", seed, [o for o in overrides if o != "train.overwrite=true"], config))
        shutil.copytree(gen.run_dir, run / "stage2", dirs_exist_ok=True)
        shutil.copytree(shop / "sids", run / "sids", dirs_exist_ok=True)
        return gen.metrics["test"]

    monkeypatch.setitem(compare.RUNNERS, "sasrec", fake_sasrec)
    monkeypatch.setitem(compare.RUNNERS, "generative", fake_generative)
    kw = {"models": ["fusion"], "seeds": [0], "overrides": {"generative": ["eval.ks=[10]"], "fusion": ["eval.ks=[10]"]},
          "presets": {}, "log": lambda m: None}
    result = compare.compare(shop / "data", tmp_path / "cmp", **kw)
    assert calls == [("sasrec", 0, [], None), ("generative", 0, ["eval.ks=[10]"], None)]
    row = result["models"]["fusion"]
    saved = json.loads((tmp_path / "cmp" / "fusion" / "seed-0" / "metrics.json").read_text())
    assert row["per_seed"] == [saved["test"]] and saved["parts"]["generative"].endswith("generative/seed-0")
    assert json.loads((tmp_path / "cmp" / "fusion" / "seed-0" / "model" / "fusion.json").read_text())["beams"] == 10
    # each run's test ranks give its recorded figure; the fusion's NDCG@10 is paired with SASRec's (a run here)
    from lmrec.eval.metrics import ndcg_at_k

    runs = {"fusion": "fusion/seed-0", "sasrec": "sasrec/seed-0", "generative": "generative/seed-0/stage2"}
    ndcg = {n: ndcg_at_k(np.load(tmp_path / "cmp" / d / "test_ranks.npz")["ranks"], 10) for n, d in runs.items()}
    assert ndcg == pytest.approx({"fusion": saved["test"]["ndcg@10"], "sasrec": sas.metrics["test"]["ndcg@10"],
                                  "generative": gen.metrics["test"]["ndcg@10"]})
    assert result["paired"]["reference"] == "sasrec"
    assert result["paired"]["models"]["fusion"]["diff"] == pytest.approx(ndcg["fusion"] - ndcg["sasrec"])
    compare.compare(shop / "data", tmp_path / "cmp", **kw)  # everything read back: nothing trained again
    assert len(calls) == 2
    with pytest.raises(LmrecError, match="exclude_history"):
        compare.compare(shop / "data", tmp_path / "cmp", **{**kw, "overrides": {
            **kw["overrides"], "fusion": ["eval.ks=[10]", "eval.exclude_history=true"]}})


def test_a_fused_model_is_served_like_any_model_and_refuses_new_items(shop, two_models, tmp_path):  # noqa: F811
    """`lmrec serve --model FUSED`: answers equal `lmrec recommend`'s (scores: the fused log-probabilities);
    POST /items is 409; a broken fusion.json stops the command before the server starts."""
    import httpx

    import lmrec
    from lmrec.data.dataset import PreparedDataset
    from lmrec.fusion import fuse
    from lmrec.serve.app import build_app
    from tests.serve.test_serve import Server

    sas, gen = two_models
    fuse(shop / "data", sas.model_dir, gen.model_dir, shop / "sids", tmp_path / "fused", beams=10, ks=[10],
         weights=[0.5], log=lambda m: None)
    ids = PreparedDataset(shop / "data").item_ids
    hist = [ids[3], ids[4]]
    expected = lmrec.recommend(tmp_path / "fused", hist, k=5, device="cpu")
    with Server(build_app(model=str(tmp_path / "fused"), log=lambda m: None)) as srv:
        srv.wait_ready()
        meta = httpx.get(srv.url + "/metadata").json()
        assert meta["family"] == "fusion" and meta["weight"] == 0.5 and meta["catalog_size"] == len(ids)
        assert meta["id_model_name"] == "sasrec"
        r = httpx.post(srv.url + "/recommend", json={"history": hist, "k": 5}).json()
        assert [x["item_id"] for x in r["items"]] == [e[0] for e in expected]
        np.testing.assert_allclose([x["score"] for x in r["items"]], [e[2] for e in expected], rtol=1e-5)
        r = httpx.post(srv.url + "/items", json={"items": [{"item_id": "new", "text": {"title": "a new thing"}}]})
        assert r.status_code == 409 and "fused model" in r.json()["error"]
    spec = json.loads((tmp_path / "fused" / "fusion.json").read_text())
    nowhere = str(tmp_path / "nowhere")
    (tmp_path / "fused" / "fusion.json").write_text(json.dumps({**spec, "sids": nowhere,
                                                                "made_at": {**spec["made_at"], "sids": nowhere}}))
    r = cli("serve", "--model", tmp_path / "fused")
    assert r.returncode == 2 and "sids" in r.stderr and "is not a directory" in r.stderr, r.stderr


def test_the_quickstart_fuses_its_generative_model_with_the_id_model_that_validates_best(shop, tmp_path):  # noqa: F811
    """With SASRec, the hybrid and the generative model trained, the quickstart's table has one fusion row: the
    ID model, rule and weight chosen on valid (weight 0 validates as that ID model alone), named in the row; the
    fused model is saved beside the others."""
    from lmrec.fusion import is_fused_model
    from lmrec.pipeline import quickstart_others

    recformer = SimpleNamespace(model_dir=None, metrics={"valid": {"ndcg@10": 0.0}})  # hybrid's text: MiniLM
    small = {"sasrec": ["train.epochs=10", "train.batch_size=16", "model.hidden_size=32", "train.lr=3e-3"],
             "hybrid": ["train.epochs=4", "train.batch_size=16", "model.hidden_size=32", "train.lr=3e-3"],
             "generative": ["train.epochs=2", "train.eval_every=2", "train.batch_size=8", "eval.beams=10",
                            "eval.ks=[10]"]}
    rows, walls, added = quickstart_others(shop / "data", tmp_path, recformer, sasrec=True, hybrid=True,
                                           generative=True, sid_source="sasrec", overrides=small,
                                           log=lambda m: None)
    fused = added["fusion"]
    assert set(fused["tried"]) == {"sasrec", "hybrid"}
    label = {"sasrec": "SASRec", "hybrid": "hybrid"}[fused["id_model"]]
    assert rows[f"fusion ({label} × generative)"] == fused["test"] and "fusion" in walls
    for name in ("sasrec", "hybrid"):
        assert fused["tried"][name]["mixture"]["0"] == pytest.approx(added[name]["valid"]["ndcg@10"], abs=1e-12)
        assert fused["tried"][name]["mixture"]["1"] == pytest.approx(added["generative"]["valid"]["ndcg@10"],
                                                                     abs=1e-12)
    best = max(v for by_rule in fused["tried"].values() for by_w in by_rule.values() for v in by_w.values())
    assert fused["valid"]["ndcg@10"] == best
    assert is_fused_model(fused["model_dir"])
    _the_quickstart_pairs_every_row_with_sasrec(tmp_path, rows, added)


def _the_quickstart_pairs_every_row_with_sasrec(tmp_path, rows, added):
    """Every model's test ranks are saved (relative to the quickstart's directory) and give its row's figures;
    the quickstart's paired table is each row's per-user NDCG@10 minus SASRec's (a reference computation from
    the ranks files), in the table's order; a ranks file of another run, a damaged one and a row with other
    seeds than the reference's give "—" and why, never a crash; metrics.json keeps the pairs."""
    from rich.console import Console

    from lmrec.cli.compare import _join_metrics
    from lmrec.cli.report import print_paired
    from lmrec.compare import paired_runs
    from lmrec.eval.evaluator import read_ranks
    from lmrec.eval.metrics import compute_metrics, ndcg_per_user

    assert not any(Path(m["ranks"]).is_absolute() for m in added.values())
    ranks = {name: read_ranks(tmp_path / m["ranks"]) for name, m in added.items()}
    for name, m in added.items():
        assert compute_metrics(ranks[name]["ranks"], [10])["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-12)
        assert rows[m["row"]] == m["test"]
    # a stand-in for RecFormer's run: the hybrid's ranks under its own run directory
    rf = tmp_path / "recformer"
    rf.mkdir()
    shutil.copy(tmp_path / added["hybrid"]["ranks"], rf / "test_ranks.npz")
    (rf / "metrics.json").write_text(json.dumps({"test": added["hybrid"]["test"]}))
    result = SimpleNamespace(run_dir=rf, metrics={"test": added["hybrid"]["test"]})
    paired = _join_metrics(result, added, tmp_path)
    assert list(paired["models"]) == ["recformer", "hybrid", "generative", "fusion"] and paired["reference"] == "sasrec"
    ref = ndcg_per_user(ranks["sasrec"]["ranks"], 10)
    for name in ("hybrid", "generative", "fusion"):
        d = ndcg_per_user(ranks[name]["ranks"], 10) - ref
        assert paired["models"][name]["diff"] == pytest.approx(float(np.mean(d)), abs=1e-12)
        assert paired["models"][name]["se"] == pytest.approx(float(np.std(d, ddof=1) / np.sqrt(len(d))), abs=1e-12)
    assert paired["models"]["recformer"] == paired["models"]["hybrid"]
    saved = json.loads((rf / "metrics.json").read_text())
    assert saved["paired"] == json.loads(json.dumps(paired))
    assert saved["test"] == added["hybrid"]["test"] and saved["sasrec"]["row"] == "SASRec (item IDs)"

    fusion, generative = tmp_path / added["fusion"]["ranks"], tmp_path / added["generative"]["ranks"]
    with open(fusion, "wb") as f:  # not the ranks the fusion's figures came from
        np.savez(f, **{**ranks["fusion"], "ranks": ranks["fusion"]["ranks"] + 1})
    generative.write_bytes(generative.read_bytes()[:100])  # a damaged file
    paired = _join_metrics(result, added, tmp_path)
    assert "not the run's" in paired["models"]["fusion"]["missing"]
    assert "not a per-user ranks file" in paired["models"]["generative"]["missing"]
    two = paired_runs("sasrec", {"sasrec": [(tmp_path / added["sasrec"]["ranks"], added["sasrec"]["test"])],
                                 "recformer": [(rf / "test_ranks.npz", added["hybrid"]["test"])] * 2}, lambda m: None)
    assert "2 seeds against the reference sasrec's 1" in two["models"]["recformer"]["missing"]
    console = Console(record=True, width=160)
    print_paired(paired, {"recformer": "RecFormer", **{n: m["row"] for n, m in added.items()}}, console)
    text = console.export_text()
    hybrid = paired["models"]["hybrid"]
    assert f"{hybrid['diff']:+.4f}" in text and f"[{hybrid['low']:+.4f}, {hybrid['high']:+.4f}]" in text
    assert "SASRec (item IDs)" in text and "reference" in text and "no paired figure" in text


def test_the_comparisons_fusion_takes_each_id_model_it_compares_or_the_one_named():
    """fusion:id_model=auto (the default) fuses every ID model among the compared ones — their settings as
    given for their rows — and SASRec when there is none; a named one alone; a wrong name is refused."""
    from lmrec.compare import fused_parts
    from lmrec.errors import ConfigError

    over = {"hybrid": ["train.epochs=3"], "generative": ["eval.beams=20"]}
    parts = fused_parts(["recformer", "sasrec", "hybrid", "generative", "fusion"], over, {"generative": "g.yaml"})
    assert parts == {"sasrec": ([], None), "hybrid": (["train.epochs=3"], None),
                     "generative": (["eval.beams=20"], "g.yaml")}
    assert list(fused_parts(["generative", "fusion"])) == ["sasrec", "generative"]
    assert list(fused_parts(["sasrec", "hybrid", "fusion"], {"fusion": ["id_model=gru4rec"]})) == ["gru4rec",
                                                                                                   "generative"]
    with pytest.raises(ConfigError, match="id_model"):
        fused_parts(["fusion"], {"fusion": ["id_model=bert4rec"]})

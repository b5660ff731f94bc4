"""ID-based baselines: the training windows, causality, learning on sequential data, the command."""

import json
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ONE_THREAD, run_cli
from tests.training.test_distributed import synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
cli = partial(run_cli, env=ONE_THREAD)  # the commands on one thread too (conftest.ONE_THREAD)


def test_every_target_is_trained_once_per_epoch_with_context():
    from lmrec.idrec.train import training_windows

    seqs = [np.arange(n) * 7 % 101 for n in (1, 2, 5, 50, 51, 52, 130)]
    for s in seqs:
        windows = training_windows([s], max_len=50)
        trained = [(int(x[i]) - 1, int(y[i])) for x, y in windows for i in range(len(y)) if y[i] >= 0]
        assert [t for _, t in trained] == s[1:].tolist()  # each next item once, in order
        pairs = {(int(a), int(b)) for a, b in zip(s[:-1], s[1:])}
        assert set(trained) == pairs  # the input at a labelled position is the item just before its target
        for x, y in windows[1:]:  # later windows: full length, at least 25 items of context for each target
            assert len(x) == 50 and (y[:25] < 0).all()


@pytest.mark.parametrize("arch", ["sasrec", "gru4rec"])
def test_a_position_never_sees_later_items(arch):
    from lmrec.idrec.models import IdRecConfig, IdSeqRec

    torch.manual_seed(0)
    model = IdSeqRec(IdRecConfig(arch=arch, num_items=20, hidden_size=16, heads=2, inner_size=32)).eval()
    a = torch.tensor([[3, 5, 7, 9, 11, 0]])
    b = a.clone()
    b[0, 3:] = torch.tensor([2, 4, 6])
    with torch.no_grad():
        ha, hb = model.encode(a), model.encode(b)
        user = model.user_vectors(a, torch.tensor([5]))
    assert torch.allclose(ha[:, :3], hb[:, :3], atol=1e-6) and not torch.allclose(ha[:, 3], hb[:, 3])
    assert torch.allclose(user, ha[:, 4], atol=1e-6)


def _recbole_sasrec_encode(model, ids):
    """RecBole 1.2.1's SASRec forward written out (eval mode): embeddings + positions → LayerNorm; per layer
    post-norm multi-head causal attention with separate Q/K/V, then dense → GELU → dense, residual, LayerNorm."""
    cfg = model.config
    x = model.item_embeddings(ids) + model.positions.weight[: ids.shape[1]][None]
    x = model.norm(x)
    L, d = ids.shape[1], cfg.hidden_size // cfg.heads
    causal = torch.triu(torch.full((L, L), float("-inf")), 1)
    for layer in model.blocks.layers:
        wq, wk, wv = layer.self_attn.in_proj_weight.chunk(3)
        bq, bk, bv = layer.self_attn.in_proj_bias.chunk(3)
        heads = lambda t: t.view(t.shape[0], L, cfg.heads, d).transpose(1, 2)  # noqa: E731
        q, k, v = heads(x @ wq.T + bq), heads(x @ wk.T + bk), heads(x @ wv.T + bv)
        att = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + causal, -1) @ v
        att = layer.self_attn.out_proj(att.transpose(1, 2).reshape(x.shape))
        x = layer.norm1(att + x)
        ff = layer.linear2(torch.nn.functional.gelu(layer.linear1(x)))
        x = layer.norm2(ff + x)
    return x


def test_sasrec_matches_recboles_computation_and_dropout_placement():
    from lmrec.idrec.models import IdRecConfig, IdSeqRec

    torch.manual_seed(0)
    model = IdSeqRec(IdRecConfig(arch="sasrec", num_items=30, hidden_size=16, heads=2, inner_size=32, max_len=8))
    ids = torch.tensor([[3, 5, 7, 9, 11, 2, 1, 4], [8, 6, 4, 2, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(model.eval().encode(ids)[0], _recbole_sasrec_encode(model, ids)[0], atol=1e-5)
    # RecBole initialises Q, K, V like every linear layer, normal(0, 0.02), not torch's Xavier
    w = torch.cat([layer.self_attn.in_proj_weight.flatten() for layer in model.blocks.layers])
    assert abs(w.std().item() - 0.02) < 0.003
    # dropout where RecBole has it (embeddings, attention weights, after attention, after the feed-forward),
    # not between the two feed-forward layers: with every other dropout off, training mode is deterministic
    model.train()
    for layer in model.blocks.layers:
        layer.dropout1.p = layer.dropout2.p = layer.self_attn.dropout = 0.0
    model.dropout.p = 0.0
    with torch.no_grad():
        assert torch.allclose(model.encode(ids), model.encode(ids))


@pytest.mark.parametrize("arch", ["sasrec", "gru4rec"])
def test_baseline_learns_the_sequences_and_its_saved_model_ranks_the_same(arch, tmp_path):
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.evaluator import evaluate
    from lmrec.idrec.models import IdSeqRec
    from lmrec.idrec.train import rank_fn

    data = synthetic_dataset(tmp_path / "data", users=120, items=30)
    out = tmp_path / "run"
    res = cli("baseline", arch, "--data", data, "--output-dir", out, "train.epochs=12", "train.batch_size=16",
              "model.hidden_size=32", "model.dropout=0.1", "train.lr=3e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["users"] == 120 and m["test"]["ndcg@10"] > 3 * m["baselines"]["popularity"]["ndcg@10"]
    assert ("SASRec" if arch == "sasrec" else "GRU4Rec") in res.stdout
    again = evaluate(rank_fn(IdSeqRec.from_pretrained(out / "model")), PreparedDataset(data).examples("test"))
    assert again["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-9)
    # the saved model is a recommender like any other: `lmrec evaluate` and `recommend` take it
    import lmrec

    assert lmrec.evaluate(out / "model", data, ks=(10,), device="cpu")["ndcg@10"] == pytest.approx(
        m["test"]["ndcg@10"], abs=1e-9)
    ds = PreparedDataset(data)
    hist = [ds.item_ids[i] for i in ds.examples("test").histories[0]]
    top = lmrec.recommend(out / "model", hist, k=5, device="cpu")
    assert len(top) == 5 and not {it for it, _, _ in top} & set(hist)
    assert [s for _, _, s in top] == sorted((s for _, _, s in top), reverse=True)


def test_baseline_rejects_what_it_cannot_run(tmp_path):
    data = synthetic_dataset(tmp_path / "data", users=10, items=12)
    res = cli("baseline", "bert4rec", "--data", data, "--output-dir", tmp_path / "a")
    assert res.returncode == 2 and "sasrec, gru4rec" in res.stderr and not (tmp_path / "a").exists()
    from lmrec.config import IdRunConfig, load_config
    from lmrec.errors import ConfigError, LmrecError
    from lmrec.idrec.train import train_baseline

    with pytest.raises(ConfigError, match="multiple of heads"):
        load_config(None, ["model.heads=3"], schema=IdRunConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["model.hiden_size=32"], schema=IdRunConfig)

    with pytest.raises(LmrecError, match="not a prepared dataset"):
        train_baseline(IdRunConfig(output_dir=str(tmp_path / "c")), tmp_path / "nope")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """`lmrec compare --models sasrec,gru4rec --seeds 0,1` on a small data set: (data, out, result, summary)."""
    root = tmp_path_factory.mktemp("compare")
    data = synthetic_dataset(root / "data", users=60, items=20)
    out = root / "cmp"
    res = cli("compare", "--data", data, "--models", "sasrec,gru4rec", "--seeds", "0,1", "--output-dir", out,
              "--set", "sasrec:train.epochs=2", "--set", "gru4rec:train.epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    return data, out, res, json.loads((out / "compare.json").read_text())


def test_compare_pairs_each_model_with_sasrec_over_the_test_users(compared, tmp_path):
    """GRU4Rec's NDCG@10 minus SASRec's over the test users: each user's difference averaged over the seeds,
    from the ranks each run wrote (checked here against the evaluator's formula, computed apart)."""
    data, finished, res, summary = compared
    out = finished
    paired = summary["paired"]
    assert paired["reference"] == "sasrec" and list(paired["models"]) == ["gru4rec"]
    per_user = {}
    for name in ("sasrec", "gru4rec"):
        seeds = [np.load(out / name / f"seed-{s}" / "test_ranks.npz") for s in (0, 1)]
        assert all((f["users"] == seeds[0]["users"]).all() for f in seeds)
        per_user[name] = np.mean([[1 / math.log2(r + 2) if r < 10 else 0.0 for r in f["ranks"]] for f in seeds], 0)
    d = per_user["gru4rec"] - per_user["sasrec"]
    g = paired["models"]["gru4rec"]
    assert g["diff"] == pytest.approx(summary["models"]["gru4rec"]["mean"]["ndcg@10"]
                                      - summary["models"]["sasrec"]["mean"]["ndcg@10"]) == pytest.approx(d.mean())
    assert g["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d))) and g["users"] == len(d) == 60
    assert "ndcg@10 − sasrec [95 % over users]" in res.stdout and f"{g['diff']:+.4f} [{g['low']:+.4f}, " in res.stdout
    import importlib.util

    spec = importlib.util.spec_from_file_location("results", ROOT / "docs" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    rec = results.record_from(out / "compare.json", "t", "A comparison", {})  # the results page shows it too
    assert rec["columns"][-1] == "ndcg@10 − sasrec [95 % over users]" and [r[-1][:7] for r in rec["rows"]] == [
        "referen", f"{g['diff']:+.4f}", "", ""]
    from lmrec.compare import compare
    from lmrec.errors import LmrecError

    # ranks that do not give the figures a run recorded (here another run's), or no ranks file at all, are never
    # paired: the row says why, the comparison goes on; no reference asked: no pairing
    out = tmp_path / "cmp"
    shutil.copytree(finished, out)
    logs: list[str] = []
    kw = dict(models=["gru4rec", "sasrec"], seeds=[0, 1], log=logs.append,
              overrides={"sasrec": ["train.epochs=2"], "gru4rec": ["train.epochs=2"]})
    ranks = out / "gru4rec" / "seed-1" / "test_ranks.npz"
    shutil.copy(out / "sasrec" / "seed-1" / "test_ranks.npz", ranks)
    why = compare(data, out, **kw)["paired"]["models"]["gru4rec"]["missing"]
    assert why.startswith(f"{ranks} gives ") and "not the run's" in why
    assert any(m.startswith("gru4rec − sasrec: no paired interval") for m in logs)
    ranks.write_text("broken")
    assert "not a per-user ranks file" in compare(data, out, **kw)["paired"]["models"]["gru4rec"]["missing"]
    assert "paired" not in compare(data, out, **kw, reference=None)
    with pytest.raises(LmrecError, match="--reference bert4rec: not among the comparison's runs"):
        compare(data, out, **{**kw, "seeds": [0]}, reference="bert4rec")


def test_compare_reports_mean_and_std_over_seeds(compared, tmp_path):
    data, finished, res, summary = compared
    out = tmp_path / "cmp"  # a copy: this test trains some runs again
    shutil.copytree(finished, out)
    for name in ("sasrec", "gru4rec"):
        r = summary["models"][name]
        values = [m["ndcg@10"] for m in r["per_seed"]]
        assert len(values) == 2 and (out / name / "seed-1" / "metrics.json").exists()
        assert r["mean"]["ndcg@10"] == pytest.approx(np.mean(values))
        assert r["std"]["ndcg@10"] == pytest.approx(np.std(values, ddof=1))
        assert f"{r['mean']['ndcg@10']:.4f} ± {r['std']['ndcg@10']:.4f}" in res.stdout
    assert "popularity" in summary["baselines"] and "random (expected)" in res.stdout
    # where the numbers come from, recorded with them; the results page reads them back
    prov = summary["provenance"]
    assert prov["command"].startswith("lmrec compare --data") and prov["hardware"].endswith(")")
    assert prov["date"][:2] == "20" and json.loads((out / "sasrec" / "seed-0" / "metrics.json").read_text()
                                                   )["provenance"]["command"] == prov["command"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("results", ROOT / "docs" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    rec = results.record_from(out / "compare.json", "t", "A comparison", {})
    assert rec["rows"][0][0] == "sasrec" and rec["rows"][0][1] == (
        f"{summary['models']['sasrec']['mean']['ndcg@10']:.4f} ± {summary['models']['sasrec']['std']['ndcg@10']:.4f}")
    assert rec["provenance"]["commit"] == prov["commit"] and rec["provenance_recorded_by"] == "lmrec"
    from lmrec.compare import compare
    from lmrec.errors import LmrecError

    # a second comparison reads finished runs back; other overrides train again
    logs: list[str] = []
    again = compare(data, out, models=["sasrec"], seeds=[0, 1], overrides={"sasrec": ["train.epochs=2"]},
                    log=logs.append)
    assert again["models"]["sasrec"]["per_seed"] == summary["models"]["sasrec"]["per_seed"]
    assert sum("finished before" in m for m in logs) == 2
    logs.clear()
    other = compare(data, out, models=["sasrec"], seeds=[0], overrides={"sasrec": ["train.epochs=1"]},
                    log=logs.append)
    assert not any("finished before" in m for m in logs)
    assert json.loads((out / "sasrec" / "seed-0" / "metrics.json").read_text())["epochs_run"] == 1
    assert other["models"]["sasrec"]["per_seed"][0] == json.loads(
        (out / "sasrec" / "seed-0" / "compare_run.json").read_text())["test"]

    # a preset (here a YAML file) is where a model's runs start; the overrides still win over it
    preset = tmp_path / "short.yaml"
    preset.write_text("train:\n  epochs: 3\n  patience: 1\n")
    compare(data, out, models=["sasrec"], seeds=[0], presets={"sasrec": str(preset)}, log=logs.append)
    saved = json.loads((out / "sasrec" / "seed-0" / "compare_run.json").read_text())
    assert saved["config"] == str(preset)
    run_cfg = (out / "sasrec" / "seed-0" / "run_config.yaml").read_text()
    assert "epochs: 3" in run_cfg and "patience: 1" in run_cfg

    with pytest.raises(LmrecError, match="bert4rec"):
        compare(data, tmp_path / "bad", models=["sasrec", "bert4rec"], seeds=[0])
    with pytest.raises(LmrecError, match="not found"):
        compare(data, tmp_path / "bad", models=["sasrec"], seeds=[0], presets={"sasrec": "no-such-preset"})
    with pytest.raises(LmrecError, match="not among the compared models"):
        compare(data, tmp_path / "bad", models=["sasrec"], seeds=[0], presets={"recformer": "recformer-30min"})
    assert not (tmp_path / "bad").exists()
    res = cli("compare", "--data", data, "--models", "sasrec", "--preset", "sasrec", "--output-dir", tmp_path / "b")
    assert res.returncode == 2 and "expected MODEL:NAME" in res.stderr and not (tmp_path / "b").exists()


def _walks_with_positions(path, split: str, items: int = 40, users: int = 120):
    """Users walk the items in catalogue order (strides 1–3); an item's text vector is its place on a circle,
    so the next item follows from the text alone — what a new item needs to be recommended."""
    from lmrec.data.prepare import PrepareOptions, prepare
    from lmrec.data.readers import RawData

    rng = np.random.default_rng(0)
    u, i, t = [], [], []
    for user in range(users):
        cur, stride = int(rng.integers(items)), 1 + user % 3
        for step in range(10):
            u.append(f"u{user}"), i.append(f"i{cur}"), t.append(float(step))
            cur = (cur + stride) % items
    text = {f"i{k}": [("title", f"thing {k}")] for k in range(items)}
    data = prepare(RawData(u, i, t, text, "walks"), path, PrepareOptions(split=split, cold_ratio=0.2))
    from lmrec.data.dataset import PreparedDataset

    ds = PreparedDataset(data)
    angle = np.array([2 * np.pi * int(x.removeprefix("i")) / items for x in ds.item_ids])
    return data, np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(2 * angle)], 1)


def test_the_hybrid_learns_and_ranks_new_items_by_their_text(tmp_path):
    """arch=hybrid: SASRec whose items are an ID vector (trained items) + projected text; it beats popularity
    on seen items and, on a cold split, ranks the new items (no ID vector) well above random by text."""
    import lmrec
    from lmrec.config import IdRunConfig, load_config
    from lmrec.idrec.train import train_baseline

    base = ["train.epochs=8", "train.batch_size=16", "model.hidden_size=32", "model.dropout=0.1", "train.lr=3e-3"]
    data, text = _walks_with_positions(tmp_path / "loo", "loo")
    cfg = load_config(None, [f"output_dir={tmp_path / 'h'}", "model.arch=hybrid", *base], schema=IdRunConfig)
    m = train_baseline(cfg, data, log=lambda s: None, text_vectors=text).metrics
    assert m["test"]["ndcg@10"] > 3 * m["baselines"]["popularity"]["ndcg@10"], m["test"]
    # a saved hybrid evaluates (and serves) like any model: the same numbers from its directory
    assert lmrec.evaluate(tmp_path / "h" / "model", data, ks=(10,), device="cpu")["ndcg@10"] == pytest.approx(
        m["test"]["ndcg@10"], abs=1e-9)
    # its validation figure (what early stopping chose by) is the saved model's: the training-time ID dropout
    # stays out of the item table the validation ranks with
    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.evaluator import evaluate
    from lmrec.idrec.recommender import IdRecommender

    valid = evaluate(IdRecommender.from_pretrained(tmp_path / "h" / "model").rank_fn(),
                     PreparedDataset(data).examples("valid"))
    assert valid["ndcg@10"] == pytest.approx(m["valid"]["ndcg@10"], abs=1e-9)

    cold, text = _walks_with_positions(tmp_path / "cold", "cold", items=120, users=240)  # 24 new items
    cfg = load_config(None, [f"output_dir={tmp_path / 'c'}", "model.arch=hybrid", "model.id_dropout=0.5", *base],
                      schema=IdRunConfig)
    run = train_baseline(cfg, cold, log=lambda s: None, text_vectors=text).metrics
    new = lmrec.evaluate(tmp_path / "c" / "model", cold, ks=(10,), candidates="new", with_baselines=True, device="cpu")
    assert new["test"]["mrr"] > 3 * new["baselines"]["random"]["mrr"], new
    # the run reports the same protocol itself (the quickstart's new-items table shows it)
    assert run["test_new_items"]["test"]["mrr"] == pytest.approx(new["test"]["mrr"], abs=1e-9)
    assert run["test_new_items"]["baselines"]["random"]["mrr"] == pytest.approx(new["baselines"]["random"]["mrr"])
    assert run["test_new_items"]["candidates"] == 24
    with pytest.raises(Exception, match="text vectors"):
        train_baseline(load_config(None, [f"output_dir={tmp_path / 'x'}"], schema=IdRunConfig), data,
                       text_vectors=text)


def test_compare_reuses_the_same_seeds_run_and_trains_it_only_when_missing(tmp_path, monkeypatch):
    """The generative and hybrid rows of `lmrec compare` take the same seed's RecFormer / SASRec run: read back
    when it finished, trained once when it is missing."""
    from lmrec import compare

    calls = []

    def fake(data, run, seed, overrides, log, config=None):
        calls.append((run.name, seed))
        (run / "model").mkdir(parents=True)
        (run / "model" / "items.parquet").write_text("")
        (run / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": 0.5}}))
        return {"ndcg@10": 0.25}

    monkeypatch.setitem(compare.RUNNERS, "recformer", fake)
    out = tmp_path / "cmp" / "hybrid" / "seed-3"
    for _ in range(2):
        model, valid = compare._trained(tmp_path / "data", out, 3, "recformer", print)
        assert model == tmp_path / "cmp" / "recformer" / "seed-3" / "model" and valid == {"ndcg@10": 0.5}
    assert calls == [("seed-3", 3)]
    # the comparison's own recformer row (no overrides, no preset) reads that run back: not trained again
    row = compare._run_once("recformer", tmp_path / "data", tmp_path / "cmp" / "recformer" / "seed-3", 3, [], None,
                             print)
    assert row == {"ndcg@10": 0.25} and calls == [("seed-3", 3)]


def test_a_row_finished_under_other_settings_is_trained_again(tmp_path, monkeypatch):
    """What a finished row must match includes the configuration its run resolves to (lmrec's defaults, the
    preset's contents, the overrides): a preset file edited since, or a row marked done by an lmrec that did
    not record it (its defaults may differ), is trained again, and the log says why."""
    from lmrec import compare

    calls = []

    def fake_sasrec(data, run, seed, overrides, log, config=None):
        calls.append(Path(config).read_text())
        return {"ndcg@10": 0.2}

    monkeypatch.setitem(compare.RUNNERS, "sasrec", fake_sasrec)
    data = synthetic_dataset(tmp_path / "data", users=20, items=10)
    preset, out, logs = tmp_path / "sasrec.yaml", tmp_path / "cmp", []
    preset.write_text("train:\n  lr: 0.001\n")

    def run():
        logs.clear()
        compare.compare(data, out, models=["sasrec"], seeds=[0], presets={"sasrec": str(preset)}, log=logs.append)

    run(), run()
    assert len(calls) == 1 and any(m.startswith("sasrec seed 0: finished before, read from") for m in logs)
    preset.write_text("train:\n  lr: 0.002\n")  # the same file, other contents
    run()
    assert calls[1:] == ["train:\n  lr: 0.002\n"]
    assert "sasrec seed 0: the run there had other settings: training again" in logs
    done = out / "sasrec" / "seed-0" / "compare_run.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "settings"}))
    run()
    assert len(calls) == 3 and any("(not recorded by the lmrec that ran it)" in m for m in logs), logs
    run()
    assert len(calls) == 3  # marked done again, with its settings


def test_a_row_is_trained_again_when_a_run_it_took_was_trained_again(tmp_path, monkeypatch):
    """The hybrid takes the same seed's RecFormer run: the comparison runs RecFormer first whatever the order
    given (the table keeps that order), reads both back when nothing changed, and trains the hybrid again when
    RecFormer was trained again (here: other overrides) — never a row computed from a run that is gone."""
    from lmrec import compare
    from lmrec.errors import LmrecError

    calls = []

    def fake_recformer(data, run, seed, overrides, log, config=None):
        calls.append("recformer")
        overrides = [o for o in overrides if o != "train.overwrite=true"]  # the comparison owns its runs
        (run / "model").mkdir(parents=True, exist_ok=True)
        (run / "model" / "items.parquet").write_text(str(overrides))
        (run / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": 0.5}}))
        return {"ndcg@10": 0.25 + 0.01 * len(overrides)}

    def fake_hybrid(data, run, seed, overrides, log, config=None):
        model, _ = compare._trained(data, run, seed, "recformer", log)
        calls.append(("hybrid", (model / "items.parquet").read_text()))
        return {"ndcg@10": 0.3}

    monkeypatch.setitem(compare.RUNNERS, "recformer", fake_recformer)
    monkeypatch.setitem(compare.RUNNERS, "hybrid", fake_hybrid)
    data = synthetic_dataset(tmp_path / "data", users=20, items=10)
    out, logs = tmp_path / "cmp", []
    res = compare.compare(data, out, models=["hybrid", "recformer"], seeds=[0], log=logs.append)
    assert calls == ["recformer", ("hybrid", "[]")] and list(res["models"]) == ["hybrid", "recformer"]
    calls.clear()
    compare.compare(data, out, models=["hybrid", "recformer"], seeds=[0], log=logs.append)
    assert calls == [] and sum("finished before" in m for m in logs) == 2
    logs.clear()
    res = compare.compare(data, out, models=["hybrid", "recformer"], seeds=[0], log=logs.append,
                          overrides={"recformer": ["train.lr=1e-3"]})
    assert calls == ["recformer", ("hybrid", "['train.lr=1e-3']")], calls  # the hybrid on the new RecFormer
    assert "hybrid seed 0: recformer trained again since this run took it: training again" in logs
    assert res["models"]["recformer"]["per_seed"] == [{"ndcg@10": 0.26}]
    calls.clear()
    compare.compare(data, out, models=["hybrid"], seeds=[0], log=logs.append)  # the row alone: still current
    assert calls == []
    # a row marked done before lmrec recorded what it took: read back, and said so
    done = out / "hybrid" / "seed-0" / "compare_run.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "inputs"}))
    logs.clear()
    compare.compare(data, out, models=["hybrid"], seeds=[0], log=logs.append)
    assert calls == [] and any("(the runs it took were not recorded)" in m for m in logs)
    # a RecFormer run finished under other settings (here: marked by an lmrec that recorded none) is not taken
    # by the hybrid alone either: trained again with its own overrides, then the hybrid on it
    done = out / "recformer" / "seed-0" / "compare_run.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "settings"}))
    (out / "hybrid" / "seed-0" / "compare_run.json").unlink()  # the hybrid's row must run
    calls.clear()
    compare.compare(data, out, models=["hybrid"], seeds=[0], log=logs.append)
    assert calls == ["recformer", ("hybrid", "['train.lr=1e-3']")], calls
    # overrides for a model the comparison does not run are refused (its run would be another row's input)
    with pytest.raises(LmrecError, match="overrides for sasrec, which is not among the compared models"):
        compare.compare(data, out, models=["hybrid"], seeds=[0], overrides={"sasrec": ["train.lr=1e-3"]})


def test_a_redo_killed_midway_is_never_read_back_and_a_named_text_source_is_no_input(tmp_path, monkeypatch):
    """A run redone under other overrides loses its done mark before it starts: killed midway, going back to
    the old overrides trains it again rather than reading back a directory the redo half rewrote. A hybrid
    whose preset names its text (model.text_from) does not take the comparison's RecFormer: RecFormer
    trained again leaves it as it is."""
    from lmrec import compare

    calls = []

    def fake(name):
        def run(data, out, seed, overrides, log, config=None):
            calls.append(name)
            if "train.lr=9" in overrides:
                raise KeyboardInterrupt  # killed midway
            (out / "model").mkdir(parents=True, exist_ok=True)
            (out / "model" / "items.parquet").write_text(str(overrides))
            (out / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": 0.5}}))
            return {"ndcg@10": 0.1}
        return run

    monkeypatch.setitem(compare.RUNNERS, "recformer", fake("recformer"))
    monkeypatch.setitem(compare.RUNNERS, "hybrid", fake("hybrid"))
    data = synthetic_dataset(tmp_path / "data", users=20, items=10)
    out = tmp_path / "cmp"
    compare.compare(data, out, models=["recformer"], seeds=[0], log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        compare.compare(data, out, models=["recformer"], seeds=[0], log=lambda m: None,
                        overrides={"recformer": ["train.lr=9"]})
    assert not (out / "recformer" / "seed-0" / "compare_run.json").exists()
    calls.clear()
    compare.compare(data, out, models=["recformer"], seeds=[0], log=lambda m: None)
    assert calls == ["recformer"]  # trained again, not read back
    preset = tmp_path / "text.yaml"
    preset.write_text(f"model:\n  text_from: {tmp_path / 'elsewhere'}\n")
    kw = {"models": ["recformer", "hybrid"], "seeds": [0], "presets": {"hybrid": str(preset)}, "log": lambda m: None}
    compare.compare(data, out, **kw)
    calls.clear()
    compare.compare(data, out, **kw, overrides={"recformer": ["train.lr=1e-3"]})
    assert calls == ["recformer"]  # the hybrid's text is not the comparison's RecFormer: read back


def test_the_hybrid_starts_from_a_trained_sasrec_and_refuses_what_does_not_fit(tmp_path):
    """model.init_from: the hybrid takes every weight of a trained SASRec (same sizes, same catalog) and only
    its text projection is new; a wrong directory or other sizes stop before the run with one message."""
    from safetensors.torch import load_file

    from lmrec.config import IdRunConfig, load_config
    from lmrec.errors import LmrecError
    from lmrec.idrec.train import train_baseline

    base = ["train.batch_size=16", "model.hidden_size=32", "model.dropout=0.1"]
    data, text = _walks_with_positions(tmp_path / "loo", "loo")
    sas = load_config(None, [f"output_dir={tmp_path / 's'}", "train.epochs=3", "train.lr=3e-3", *base],
                      schema=IdRunConfig)
    train_baseline(sas, data, log=lambda s: None)
    said = []
    cfg = load_config(None, [f"output_dir={tmp_path / 'h'}", "model.arch=hybrid",
                             f"model.init_from={tmp_path / 's' / 'model'}", "train.epochs=1", "train.lr=1e-12",
                             *base], schema=IdRunConfig)
    train_baseline(cfg, data, log=said.append, text_vectors=text)
    assert any("initialised from" in s and "new: text_proj.bias, text_proj.weight" in s for s in said), said
    before, after = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("s", "h"))
    assert set(after) - set(before) == {"text_proj.weight", "text_proj.bias", "text_vectors", "known"}
    for k, v in before.items():  # an lr of 1e-12: the hybrid still holds the SASRec weights it started from
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)
    warm = load_config(None, [f"output_dir={tmp_path / 'w'}", "model.arch=hybrid", "train.epochs=4", "train.lr=3e-3",
                              f"model.init_from={tmp_path / 's' / 'model'}", *base], schema=IdRunConfig)
    m = train_baseline(warm, data, log=lambda s: None, text_vectors=text).metrics  # and it learns on from there
    assert m["test"]["ndcg@10"] > 3 * m["baselines"]["popularity"]["ndcg@10"], m["test"]
    for wrong, msg in ((tmp_path / "nothing", "not a trained ID model"), (tmp_path / "s" / "model", "sizes differ")):
        bad = load_config(None, [f"output_dir={tmp_path / 'x'}", "model.arch=hybrid", f"model.init_from={wrong}",
                                 "model.hidden_size=16", "train.epochs=1"], schema=IdRunConfig)
        with pytest.raises(LmrecError, match=msg):
            train_baseline(bad, data, log=lambda s: None, text_vectors=text)
        assert not (tmp_path / "x").exists()

"""Semantic IDs from any item vectors (issue 23 point 1): an ID baseline's, a RecFormer's, or both fused; items
an ID model never trained on get vectors predicted from their text."""

import json

import numpy as np
import pytest

from lmrec.pipeline import fuse_vectors
from tests.conftest import run_cli, walk_interactions


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fused_vectors_weigh_each_source_and_predict_the_missing_rows_from_the_text_side():
    rng = np.random.default_rng(0)
    text = _unit(rng.normal(size=(200, 8)))
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    collab = text @ rotation  # unit rows, linear in the text side: the regression can recover them exactly
    known = np.ones(200, dtype=bool)
    known[:20] = False  # 20 items the ID model never trained on: their rows hold untrained noise
    noisy = collab.copy()
    noisy[:20] = _unit(rng.normal(size=(20, 8)))
    fused, filled = fuse_vectors([(text, np.ones(200, bool)), (noisy, known)], [0.25, 0.75], ridge=1e-9)
    assert filled == 20 and fused.shape == (200, 16)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fused[:, :8], 0.5 * text, atol=1e-6)  # √0.25
    np.testing.assert_allclose(fused[20:, 8:], np.sqrt(0.75) * collab[20:], atol=1e-6)  # learned rows kept
    # the missing rows are the regression's prediction, here exact (the map is linear): not the noise
    np.testing.assert_allclose(fused[:20, 8:], np.sqrt(0.75) * collab[:20], atol=1e-4)


def test_missing_rows_without_a_text_side_are_an_error():
    from lmrec.errors import LmrecError

    v = _unit(np.random.default_rng(0).normal(size=(10, 4)))
    known = np.arange(10) > 2
    with pytest.raises(LmrecError, match="no learned vector"):
        fuse_vectors([(v, known)], [1.0])


def test_sid_build_from_an_id_baseline_on_a_cold_split(tmp_path):
    """`lmrec sid build --from` a trained SASRec: the source is recorded, every item has unique codes, and the
    cold items (never in a training sequence) get codes predicted from their text (MiniLM)."""
    from lmrec.config import IdRunConfig, load_config
    from lmrec.data.dataset import PreparedDataset
    from lmrec.data.prepare import PrepareOptions, prepare
    from lmrec.data.readers import RawData
    from lmrec.generative.sid import SemanticIds
    from lmrec.idrec.train import train_baseline

    u, i, t = walk_interactions()
    text = {f"i{k}": [("title", f"thing {k}"), ("kind", "red" if k % 2 else "blue")] for k in range(40)}
    data = prepare(RawData(u, i, t, text, "walks"), tmp_path / "data", PrepareOptions(split="cold", cold_ratio=0.2))
    ds = PreparedDataset(data)
    trained = set(np.concatenate(ds.train).tolist())
    cold = ds.num_items - len(trained)
    assert cold > 0
    cfg = load_config(None, [f"output_dir={tmp_path / 'sas'}", "train.epochs=2", "model.hidden_size=16"],
                      schema=IdRunConfig)
    model = train_baseline(cfg, data, log=lambda m: None).model_dir
    res = run_cli("sid", "build", "--data", data, "--out", tmp_path / "sids", "--from", model, "--levels", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{cold} items have no learned vector" in res.stdout + res.stderr
    sids = SemanticIds.load(tmp_path / "sids")
    assert sids.config.encoder.startswith(f"sasrec:{model}") and "predicted from their text" in sids.config.encoder
    assert len({tuple(c) for c in sids.codes.tolist()}) == ds.num_items
    assert json.loads(res.stdout[res.stdout.index("{"): res.stdout.rindex("}") + 1])["items"] == ds.num_items
    bad = run_cli("sid", "build", "--data", data, "--out", tmp_path / "x", "--from", tmp_path / "nothing")
    assert bad.returncode == 2 and "not a saved model" in bad.stderr and not (tmp_path / "x").exists()


def test_the_sid_source_is_chosen_on_validation_and_a_wrong_choice_stops_before_training(tmp_path):
    from lmrec.errors import LmrecError
    from lmrec.pipeline import choose_sid_source

    trained = {"recformer": (tmp_path / "r", {"ndcg@10": 0.053}), "sasrec": (tmp_path / "s", {"ndcg@10": 0.065})}
    said = []
    assert choose_sid_source("auto", trained, log=said.append) == [tmp_path / "s"]
    assert "sasrec" in said[0] and "0.0530" in said[0]
    assert choose_sid_source("fused", trained) == [tmp_path / "r", tmp_path / "s"]
    assert choose_sid_source("recformer", trained) == [tmp_path / "r"]
    with pytest.raises(LmrecError, match="not trained"):
        choose_sid_source("sasrec", {"recformer": trained["recformer"]})
    res = run_cli("quickstart", "--output-dir", tmp_path / "qs", "--sid-source", "best")
    assert res.returncode == 2 and "--sid-source best" in res.stderr and not (tmp_path / "qs").exists()


def test_the_runs_seed_reaches_the_generative_models_initialisation(tmp_path):
    """expand_model(seed=…): the embedded default's weights and the codebook rows' projection are drawn from the
    run's seed — two seeds give two models, one seed the same model."""
    from safetensors.torch import load_file

    from lmrec.generative.api import expand_model
    from lmrec.generative.sid import build_sids
    from tests.training.test_distributed import synthetic_dataset

    data = synthetic_dataset(tmp_path / "data", users=20, items=20)
    emb = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    from lmrec.data.dataset import PreparedDataset

    sids, books = build_sids(PreparedDataset(data).item_ids, emb, levels=2, codes=4)
    sids.save(tmp_path / "sids", books)
    weights = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        expand_model(None, tmp_path / "sids", tmp_path / name, data=data, seed=seed, log=lambda m: None)
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert weights["a"][key].equal(weights["b"][key]) and not weights["a"][key].equal(weights["c"][key])

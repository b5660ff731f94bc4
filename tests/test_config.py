from pathlib import Path

import pytest

from lmrec.config import PRESETS, load_config
from lmrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted(PRESETS.glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name.startswith("gen"):  # a generative recipe
        from lmrec.config import GenRunConfig

        cfg = load_config(path, schema=GenRunConfig)
        if path.name == "generative-30min.yaml":  # the CPU budget's recipe: every position, selection on valid
            assert cfg.data.format == "sequence" and cfg.train.eval_every < cfg.train.epochs
        else:
            assert cfg.train.lr_schedule == "cosine" and tuple(cfg.train.adam_betas) == (0.9, 0.95)
        return
    cfg = load_config(path)  # raises ConfigError on an unknown key or a wrong type
    assert cfg.train.item_grad in ("none", "batch", "all") and cfg.model.max_token_num > 0


def test_quickstart_yaml_matches_the_defaults():
    shipped = load_config(ROOT / "configs" / "quickstart.yaml").model_dump()
    defaults = load_config(None).model_dump()
    shipped.pop("output_dir"), defaults.pop("output_dir")
    assert shipped == defaults


def test_precedence_and_unknown_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n  batch_size: 3\n")
    cfg = load_config(f, ["train.lr=0.5", "model.backbone=/x"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.model.backbone) == (0.5, 3, "/x")
    with pytest.raises(ConfigError, match=r"model\.nope: unknown key"):
        load_config(f, ["model.nope=1"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=many"])
    assert load_config("recformer").model.pooler_type == "cls"
    # a typo gets the keys it is close to; a misspelt preset the preset and the list of them
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key \(did you mean lr\?\)"):
        load_config(None, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean train\?\)"):
        load_config(None, ["trian.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean the preset recformer\?\); the packaged presets: .*-30min"):
        load_config("recformr")


@pytest.mark.parametrize("overrides, message", [
    (["eval.metric=ndcg@5"], r"eval: metric 'ndcg@5' is not computed with ks=\[10, 20, 50\]"),
    (["eval.ks=[5]"], r"metric 'ndcg@10' is not computed with ks=\[5\]"),
    (["eval.metric=auc"], "expected one of recall@10"),
    (["eval.ks=[0, 10]"], r"eval\.ks\.0: Input should be greater than or equal to 1"),
    (["eval.ks=[]"], r"eval\.ks: List should have at least 1 item"),
    (["train.lr=0"], r"train\.lr: Input should be greater than 0"),
    (["train.stage1_epochs=-1"], r"train\.stage1_epochs: Input should be greater than or equal to 0"),
    (["train.batch_size=0"], r"train\.batch_size: Input should be greater than or equal to 1"),
    (["train.warmup_ratio=1.5"], r"train\.warmup_ratio: Input should be less than 1"),
    (["model.temperature=0"], r"model\.temperature: Input should be greater than 0"),
])
def test_meaningless_values_are_rejected_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_early_stopping_metric_follows_the_cutoffs():
    assert load_config(None, ["eval.ks=[5]", "eval.metric=recall@5"]).eval.metric == "recall@5"
    assert load_config(None, ["eval.ks=[5]", "eval.metric=mrr"]).eval.metric == "mrr"


def test_generative_stage_is_a_literal_choice():
    from lmrec.config import GenRunConfig

    assert load_config(None, ["train.stage=1"], schema=GenRunConfig).train.stage == "1"  # YAML's int 1 too
    assert load_config(None, ["train.stage=sft"], schema=GenRunConfig).train.stage == "sft"
    with pytest.raises(ConfigError, match=r"train\.stage: Input should be '1', '2' or 'sft'"):
        load_config(None, ["train.stage=3"], schema=GenRunConfig)
    with pytest.raises(ConfigError, match="train.lora applies to stage 2 / sft"):
        load_config(None, ["train.stage=1", "train.lora=true"], schema=GenRunConfig)
    with pytest.raises(ConfigError, match=r"eval: metric 'ndcg@10' is not computed"):
        load_config(None, ["eval.ks=[20]"], schema=GenRunConfig)


def test_model_settings_beside_a_saved_recommender_init_are_errors(tmp_path):
    import json

    saved = tmp_path / "rec"
    saved.mkdir()
    (saved / "items.parquet").write_bytes(b"")  # a saved recommender (only its files' presence matters here)
    (saved / "config.json").write_text(json.dumps({"model_type": "recformer", "pooler_type": "mean",
                                                   "max_token_num": 64, "max_attr_length": 16, "max_attr_num": 3,
                                                   "attention_window": [64, 64]}))
    # the same values as the saved model (the quickstart config with --init) are fine
    assert load_config(ROOT / "configs" / "quickstart.yaml", [f"model.init={saved}"]).model.init == str(saved)
    with pytest.raises(ConfigError) as e:
        load_config("recformer", [f"model.init={saved}"])  # CLS pooling, 1,024 tokens: ignored silently before
    msg = str(e.value)
    assert "model.pooler_type='cls' (the saved model has 'mean')" in msg
    assert "model.max_token_num=1024 (the saved model has 64)" in msg and "max_attr_num" not in msg
    with pytest.raises(ConfigError, match=r"model\.default_layers=4"):
        load_config(None, [f"model.init={saved}", "model.default_layers=4"])
    # a RecFormer checkpoint without a catalog (backbone init, pretraining) takes model.* settings
    (saved / "items.parquet").unlink()
    assert load_config("recformer", [f"model.init={saved}"]).model.pooler_type == "cls"


def test_shipped_data_config_loads():
    from lmrec.data.data_config import load_data_config

    cfg = load_data_config(ROOT / "configs" / "data-mix.json")
    assert [s.name for s in cfg.sources] == ["rec", "general_text"] and cfg.sources[1].weight == 0.3


@pytest.mark.parametrize("name,source,think", [("stg1.json", "rec_align", False), ("sft.json", "rec", True)])
def test_the_stage_data_configs_the_docs_name_load(name, source, think):
    from lmrec.data.data_config import load_data_config

    cfg = load_data_config(ROOT / "configs" / name)
    assert [s.name for s in cfg.sources] == [source] and cfg.add_think_pattern is think
    # the docs' recipe writes what each config reads (stage 1: the samples with alignment)
    assert f"--out {cfg.sources[0].path.removesuffix('/train')}" in (ROOT / "docs" / "scale.md").read_text()

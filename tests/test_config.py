from pathlib import Path

import pytest

from lmrec.config import PRESETS, load_config
from lmrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted(PRESETS.glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
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

"""The embedded default backbone is built from the run's model.default_* settings."""

import json

from lmrec.data.dataset import PreparedDataset
from tests.conftest import walk_interactions


def test_the_default_backbone_takes_its_sizes_and_dropout_from_the_config(tmp_path):
    from accelerate import Accelerator

    from lmrec.config import load_config
    from lmrec.data.prepare import PrepareOptions, prepare
    from lmrec.data.readers import RawData
    from lmrec.recformer.build import build_recommender

    u, i, t = walk_interactions(users=20, items=12)
    text = {f"i{k}": [("title", f"thing {k}")] for k in range(12)}
    data = prepare(RawData(u, i, t, text, "walks"), tmp_path / "data", PrepareOptions())
    cfg = load_config(None, ["model.default_hidden_size=16", "model.default_layers=1", "model.default_heads=2",
                             "model.default_vocab_size=300", "model.default_dropout=0.3", "model.max_token_num=40"])
    build_recommender(cfg, PreparedDataset(data), tmp_path / "run", Accelerator(cpu=True), log=lambda m: None)
    got = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    assert (got["hidden_size"], got["num_hidden_layers"], got["num_attention_heads"]) == (16, 1, 2)
    assert got["hidden_dropout_prob"] == got["attention_probs_dropout_prob"] == 0.3
    assert got["max_position_embeddings"] == 40 + got["pad_token_id"] + 1

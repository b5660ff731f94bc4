"""The generative family learns, in seconds, on a generated shop (not real data) whose users walk through
the items of one category in catalogue order: `gen train` stage 2 on padded batches of a prepared dataset,
and stage sft on a packed stream of the samples `gen samples` writes, each from the untrained expanded model,
rank the next item by constrained beam search well above popularity and the random expectation. A model
that does not train (learning rate near 0, no gradients) stays at the baselines' level and fails."""

import json

import numpy as np
import pytest

from tests.test_chinese_e2e import generated_chinese_shop

# one history item in a terse prompt: the shortest input from which the next item follows
PROMPT = ["data.max_history=1", "data.prompt='{history}'", "data.targets_per_user=5"]
EVAL = ["eval.beams=10", "eval.ks=[10]"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The prepared shop, its semantic IDs and the embedded default LM expanded for them."""
    from lmrec.api import prepare
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative.api import expand_model
    from lmrec.generative.sid import SemanticIds, SidConfig

    root = generated_chinese_shop(tmp_path_factory.mktemp("learn_shop"), n_users=60, n_items=30)
    data = prepare(root / "inter.csv", root / "data", items=root / "items.csv",
                   text=["title=title", "brand=brand", "category=category"], log=lambda m: None)
    ds = PreparedDataset(data)
    # semantic IDs as an encoder that reads the category gives them: the category, then the item's number
    # within it (k-means could not be relied on to find the six categories among thirty items)
    categories = sorted({dict(t)["category"] for t in ds.item_text})
    cat = np.array([categories.index(dict(t)["category"]) for t in ds.item_text])
    number = np.array([int(i.removeprefix("i")) // len(categories) for i in ds.item_ids])
    codes = np.stack([cat, number], 1)
    assert len({tuple(c) for c in codes.tolist()}) == ds.num_items  # unique
    config = SidConfig(levels=1, codes=len(categories), extra_level=int(number.max()) + 1,
                       encoder="category, number within it", seed=0)
    SemanticIds(list(ds.item_ids), codes, config, {"items": ds.num_items, "collision_rate_after": 0.0}).save(
        root / "sids", [np.eye(len(categories), dtype=np.float32)])
    expand_model(None, root / "sids", root / "lm", data=data, init="codebook", log=lambda m: None)
    return root


def ndcg(metrics: dict) -> tuple[float, float, float]:
    b = metrics["baselines"]
    return metrics["test"]["ndcg@10"], b["popularity"]["ndcg@10"], b["random"]["ndcg@10"]


def test_stage2_on_padded_batches_learns_the_next_item(shop, tmp_path):
    from lmrec.api import train_generative

    run = train_generative(shop / "data", shop / "sids", shop / "lm", output_dir=tmp_path / "run", stage="2",
                           log=lambda m: None, overrides=[*PROMPT, *EVAL, "train.epochs=6", "train.eval_every=6",
                                                          "train.batch_size=8"])
    got, pop, rnd = ndcg(run.metrics)
    assert got >= 2 * max(pop, rnd), (got, pop, rnd)


def test_every_position_sequence_training_learns_the_next_item(shop, tmp_path):
    """data.format=sequence: each user's items as one causal sequence of IDs, every position a target; the
    model is prompted the same way (saved in prompt_config.json) and ranks the next item well."""
    from lmrec.api import train_generative
    from lmrec.generative.prompts import PromptFormat

    run = train_generative(shop / "data", shop / "sids", shop / "lm", output_dir=tmp_path / "run", stage="2",
                           log=lambda m: None, overrides=["data.format=sequence", "data.max_history=4", *EVAL,
                                                          "train.epochs=6", "train.eval_every=6",
                                                          "train.batch_size=8"])
    assert PromptFormat.load(run.model_dir).kind == "sequence"
    got, pop, rnd = ndcg(run.metrics)
    assert got >= 2 * max(pop, rnd), (got, pop, rnd)


def test_sft_on_a_packed_stream_of_written_samples_learns_the_next_item(shop, tmp_path):
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.api import write_chat_samples
    from lmrec.generative.train import train_generative

    counts = write_chat_samples(shop / "data", shop / "sids", tmp_path / "samples", PROMPT)  # `gen samples`
    mix = {"sources": [{"path": str(tmp_path / "samples" / "train"), "name": "rec"}], "max_length": 256,
           "num_epochs": 6, "num_workers": 0, "local_shuffle_buffer_size": 64, "pack_buffer_size": 16}
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    # a constant rate: how many packs the stream makes is known only once it has been read
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "train.stage=sft", *PROMPT, *EVAL,
                             "train.batch_size=1", "train.lr_schedule=constant", "train.warmup_ratio=0"],
                      schema=GenRunConfig)
    metrics = train_generative(cfg, model_dir=shop / "lm", data=shop / "data", sids_dir=shop / "sids",
                               data_config=tmp_path / "mix.json", log=lambda m: None).metrics
    assert metrics["stream"]["samples"] == {"rec": 6 * counts["train"]}
    assert metrics["steps"] * 4 <= 6 * counts["train"]  # packed: several samples in each step's one pack
    got, pop, rnd = ndcg(metrics)
    assert got >= 2 * max(pop, rnd), (got, pop, rnd)

"""RecFormer learns, in seconds, on generated data (not real data): finetuning the embedded default backbone
ranks the next item of the walk data set well above popularity and the random expectation, and pretraining
on one domain ranks the items of another domain, never seen in pretraining, by their text alone (zero-shot)
well above both. Each number the model must beat is the evaluator's own baseline on the same split; a model
that does not train (learning rate near 0, no gradients) stays at the baselines' level and fails."""

import json

import numpy as np
import pytest

from lmrec.data.dataset import PreparedDataset
from lmrec.data.prepare import prepare
from lmrec.data.readers import RawData
from tests.training.test_distributed import synthetic_dataset

TINY = ["model.default_layers=1", "model.default_heads=2", "model.default_vocab_size=2000", "model.pooler_type=mean"]
CATEGORIES = ["phone", "shoe", "coat", "lamp", "book", "tea"]
# few title words, so that any two titles share some: word overlap alone (an untrained encoder) says little
NOISE = ["alpha", "bravo", "cedar", "delta"]


pytestmark = pytest.mark.usefixtures("one_thread")


def ndcg(metrics: dict) -> tuple[float, float, float]:
    """NDCG@10 of the model, of popularity and of a random ranking."""
    b = metrics["baselines"]
    return metrics["test"]["ndcg@10"], b["popularity"]["ndcg@10"], b["random"]["ndcg@10"]


def category_walk(path, users: int, items: int, seed: int, prefix: str):
    """A generated domain: each user draws 6–11 items of one category; an item's text is a title of five
    random words and its category, so that only the category tells what a user takes next: pretraining
    must learn to read it."""
    rng = np.random.default_rng(seed)
    text = {f"{prefix}{n}": [("title", " ".join([prefix, *rng.choice(NOISE, 5)])),
                             ("category", CATEGORIES[n % len(CATEGORIES)])] for n in range(items)}
    u, i, t = [], [], []
    for user in range(users):
        same = [n for n in range(items) if n % len(CATEGORIES) == user % len(CATEGORIES)]
        for step in range(int(rng.integers(6, 12))):
            u.append(f"u{user}"), i.append(f"{prefix}{rng.choice(same)}"), t.append(float(step))
    return prepare(RawData(u, i, t, text, "synthetic"), path)


def test_finetuning_learns_the_walk(tmp_path):
    import lmrec

    data = synthetic_dataset(tmp_path / "data", users=120, items=30)
    run = lmrec.finetune(data, output_dir=tmp_path / "run", log=lambda m: None, overrides=[
        *TINY, "model.default_hidden_size=64", "model.max_token_num=64", "train.item_grad=batch",
        "train.stage1_epochs=6", "train.stage2_epochs=0", "train.batch_size=16"])
    got, pop, rnd = ndcg(run.metrics)
    assert got >= 2 * pop and got >= 1.5 * rnd, (got, pop, rnd)


def test_pretraining_ranks_items_it_never_saw_by_their_text(tmp_path):
    from lmrec.config import PretrainRunConfig, load_config
    from lmrec.recformer.pretrain import pretrain

    a = category_walk(tmp_path / "a", users=120, items=48, seed=0, prefix="a")
    b = category_walk(tmp_path / "b", users=60, items=40, seed=1, prefix="b")
    da, db = PreparedDataset(a), PreparedDataset(b)
    assert not set(da.item_ids) & set(db.item_ids)
    assert not {str(x) for x in da.item_text} & {str(x) for x in db.item_text}  # b's items are new
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"data.paths={json.dumps([str(a)])}", f"data.valid={b}",
                             *TINY, "model.default_hidden_size=32", "model.max_token_num=32", "train.epochs=5",
                             "train.pairs_per_user=2", "train.batch_size=16"], schema=PretrainRunConfig)
    metrics = pretrain(cfg, log=lambda m: None).metrics
    assert metrics["zero_shot"]["dataset"] == str(b)
    got, pop, rnd = ndcg(metrics)  # the zero-shot ranking of b's catalogue, next to b's own popularity
    assert got >= 3 * max(pop, rnd), (got, pop, rnd)

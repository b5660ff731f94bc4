"""The served models, built once for the serving tests (tiny, random-init: the service's contract, not quality)."""

from __future__ import annotations

import pytest
import torch

from tests.serve.test_serve import synthetic_dataset


@pytest.fixture(scope="package")
def recformer_model(tmp_path_factory, tiny_backbone):
    """A RecFormer recommender directory (tiny random-init model: serving correctness needs no training)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.recformer.backbones import build_recformer
    from lmrec.recformer.recommender import Recommender

    root = tmp_path_factory.mktemp("serve")
    data = synthetic_dataset(root / "data", users=40, items=30)
    ds = PreparedDataset(data)
    model, tok, _ = build_recformer(tiny_backbone, max_token_num=64, max_item_embeddings=11)
    torch.manual_seed(0)
    with torch.no_grad():  # a random function with spread-out item vectors: at the init scale (std 0.02)
        for p in model.parameters():  # every item scores within 1e-4 of the others and near-ties flip order
            if p.dim() > 1:
                p.normal_(0, 0.3)
    rec = Recommender(model, tok, ds.item_ids, ds.item_text)
    rec.encode_items(show_progress=False)
    return rec.save_pretrained(root / "model"), data


@pytest.fixture(autouse=True)
def _no_api_key_from_the_environment(monkeypatch):
    """A developer's own $LMREC_API_KEY must not change what these tests see (they set keys explicitly)."""
    monkeypatch.delenv("LMREC_API_KEY", raising=False)

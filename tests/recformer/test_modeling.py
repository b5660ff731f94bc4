"""RecFormer modeling: a naive re-computation written here, both attention implementations, the loss,
save/load round trips and the Auto classes."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from lmrec.errors import ConfigError
from lmrec.recformer import RecformerConfig, RecformerForSeqRec, RecformerModel


def tiny_config(**kw):
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=70, max_token_num=64, max_item_embeddings=8, attention_window=4,
                pad_token_id=0, position_offset=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return RecformerConfig(**base)


def batch(B=3, L=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0  # padding
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    glob = torch.zeros(B, L, dtype=torch.long)
    glob[:, 0] = 1
    glob[0, 7] = 1  # a second global token in one row
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=glob,
                token_type_ids=torch.randint(0, 4, (B, L), generator=g),
                item_position_ids=torch.randint(0, 8, (B, L), generator=g),
                position_ids=torch.arange(L).expand(B, L))


def naive_forward(model: RecformerModel, b) -> torch.Tensor:
    """Embedding sums + per-token loops over the Longformer attention pattern (written independently)."""
    c, e = model.config, model.embeddings
    h = (e.word_embeddings.weight[b["input_ids"]] + e.position_embeddings.weight[b["position_ids"] + c.position_offset]
         + e.token_type_embeddings.weight[b["token_type_ids"]]
         + e.item_position_embeddings.weight[b["item_position_ids"]])
    h = F.layer_norm(h, (c.hidden_size,), e.LayerNorm.weight, e.LayerNorm.bias, c.layer_norm_eps)
    B, L, H = h.shape
    n, d = c.num_attention_heads, H // c.num_attention_heads
    valid, glob = b["attention_mask"].bool(), b["global_attention_mask"].bool() & b["attention_mask"].bool()
    for li, layer in enumerate(model.encoder.layer):
        sa, half = layer.attention.self, c.attention_window[li] // 2
        out = torch.zeros_like(h)
        for bi in range(B):
            for i in range(L):
                if glob[bi, i]:
                    q, k, v = sa.query_global(h[bi, i]), sa.key_global(h[bi]), sa.value_global(h[bi])
                    allowed = valid[bi]
                else:
                    q, k, v = sa.query(h[bi, i]), sa.key(h[bi]), sa.value(h[bi])
                    allowed = torch.tensor([(abs(i - j) <= half or glob[bi, j]) and valid[bi, j] for j in range(L)])
                    if not allowed.any():
                        continue
                for hd in range(n):
                    s = slice(hd * d, (hd + 1) * d)
                    scores = (k[:, s] @ q[s]) / math.sqrt(d)
                    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
                    out[bi, i, s] = p @ v[:, s]
        a = layer.attention.output
        h1 = F.layer_norm(a.dense(out) + h, (H,), a.LayerNorm.weight, a.LayerNorm.bias, c.layer_norm_eps)
        o = layer.output
        inter = F.gelu(layer.intermediate.dense(h1))
        h = F.layer_norm(o.dense(inter) + h1, (H,), o.LayerNorm.weight, o.LayerNorm.bias, c.layer_norm_eps)
    return h


@pytest.mark.parametrize("impl", ["longformer", "sdpa", "blocked", "auto"])
def test_forward_matches_naive_recomputation(impl):
    torch.manual_seed(0)
    model = RecformerModel(tiny_config(attention_impl=impl)).eval()
    b = batch()
    with torch.no_grad():
        got = model(**b).last_hidden_state
        ref = naive_forward(model, b)
    valid = b["attention_mask"].bool()
    assert got.shape == (3, 13, 16)
    assert (got - ref)[valid].abs().max() < 1e-5
    assert torch.equal(model(**b).pooler_output, got[:, 0])


@pytest.mark.parametrize("impl", ["sdpa", "blocked"])
def test_equals_hf_longformer_with_training_shapes(impl):
    torch.manual_seed(1)
    hf = RecformerModel(tiny_config(attention_impl="longformer", attention_window=[4, 6])).eval()
    sd = RecformerModel(tiny_config(attention_impl=impl, attention_window=[4, 6])).eval()
    sd.load_state_dict(hf.state_dict())
    b = batch(L=29, seed=3)
    with torch.no_grad():
        diff = (hf(**b).last_hidden_state - sd(**b).last_hidden_state)[b["attention_mask"].bool()]
    assert diff.abs().max() < 1e-5


def test_seqrec_loss_is_full_softmax_over_cosine():
    torch.manual_seed(0)
    model = RecformerForSeqRec(tiny_config()).eval()
    table = torch.randn(11, 16)
    model.set_item_embeddings(table)
    b = batch()
    labels = torch.tensor([3, 0, 10])
    out = model(**b, labels=labels)
    user = model.longformer(**b).pooler_output
    logits = F.normalize(user, dim=-1) @ F.normalize(table, dim=-1).T / 0.05
    assert out.logits.shape == (3, 11)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert torch.allclose(out.loss, F.cross_entropy(logits, labels), atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.longformer.encoder.parameters())


def test_save_load_round_trip_and_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = RecformerForSeqRec(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    again = RecformerForSeqRec.from_pretrained(tmp_path).eval()
    b = batch()
    assert torch.equal(model.encode(**b), again.encode(**b))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RecformerConfig)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, RecformerModel)
    assert torch.equal(base(**b).pooler_output, model.encode(**b))


def test_config_checks():
    assert tiny_config(attention_window=6).attention_window == [6, 6]  # follows the layer count
    with pytest.raises(ConfigError, match="even"):
        tiny_config(attention_window=5)
    with pytest.raises(ConfigError, match="2 layers"):
        tiny_config(attention_window=[4, 4, 4])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        tiny_config(max_token_num=100)


def test_item_side_gradient_modes():
    torch.manual_seed(0)
    model = RecformerForSeqRec(tiny_config()).eval()
    b = batch()
    items = batch(B=5, L=12, seed=7)  # 5 "items", each a short sequence
    chunks = [{k: v[[3, 1]] for k, v in items.items()}, {k: v[[0, 4, 2]] for k, v in items.items()}]
    order = torch.tensor([3, 1, 0, 4, 2])
    labels = torch.tensor([4, 2, 4])
    out = model(**b, labels=labels, item_inputs=chunks, item_order=order)
    table = model.encode(**items)  # (5, H) in table order
    user = model.encode(**b)
    ref = F.normalize(user, dim=-1) @ F.normalize(table, dim=-1).T / 0.05
    assert torch.allclose(out.logits, ref, atol=1e-5)
    out.loss.backward()
    assert model.longformer.embeddings.word_embeddings.weight.grad[items["input_ids"]].abs().sum() > 0
    # in-batch term: a repeated target is not a negative for the other users with the same target
    model.zero_grad()
    model.set_item_embeddings(table.detach())
    tgt = {k: v[labels] for k, v in items.items()}
    out = model(**b, labels=labels, target_inputs=tgt)
    fresh = F.normalize(model.encode(**tgt), dim=-1)
    ib = F.normalize(user, dim=-1) @ fresh.T / 0.05
    ib[0, 2] = ib[2, 0] = float("-inf")
    expected = F.cross_entropy(ref, labels) + F.cross_entropy(ib, torch.arange(3))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_candidates_restrict_the_softmax():
    torch.manual_seed(0)
    model = RecformerForSeqRec(tiny_config()).eval()
    model.set_item_embeddings(torch.randn(9, 16))
    b = batch()
    full = model(**b).logits
    cand = torch.tensor([1, 4, 5, 8])
    out = model(**b, candidates=cand, labels=torch.tensor([0, 3, 1]))  # labels are positions in cand
    assert torch.allclose(out.logits, full[:, cand])
    assert torch.allclose(out.loss, F.cross_entropy(full[:, cand], torch.tensor([0, 3, 1])), atol=1e-6)

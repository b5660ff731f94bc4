"""The chunked LM-head loss equals the plain one: loss, hidden-state and head gradients (tied and untied
heads, frozen heads, token normalisation), on a vocabulary larger than a chunk."""

import pytest
import torch

from lmrec.training.losses import chunked_lm_loss, plain_lm_loss


def case(seed=0, b=2, length=37, h=16, v=301):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[torch.rand(b, length, generator=g) < 0.4] = -100  # unsupervised positions
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_the_plain_loss(chunk):
    hidden, weight, labels = case()
    ha, wa = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, nll = chunked_lm_loss(ha, wa, labels, chunk_tokens=chunk)
    ref = plain_lm_loss(hb, wb, labels)
    (loss * 3.0).backward()
    (ref * 3.0).backward()
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert torch.allclose(ha.grad, hb.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(wa.grad, wb.grad, rtol=1e-9, atol=1e-12)
    n = (labels[:, 1:] != -100).sum()
    assert nll.shape == (2, 36) and abs(nll.sum().item() / n.item() - ref.item()) < 1e-9


def test_tied_head_gradient_flows_to_the_embedding_once():
    hidden, weight, labels = case(1)
    emb = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False)
    emb2 = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False)
    ids = labels.clamp(min=0)
    loss, _ = chunked_lm_loss(emb(ids) + hidden, emb.weight, labels, chunk_tokens=5)
    ref = plain_lm_loss(emb2(ids) + hidden, emb2.weight, labels)
    loss.backward()
    ref.backward()
    assert torch.allclose(emb.weight.grad, emb2.weight.grad, rtol=1e-9, atol=1e-12)


def test_a_frozen_head_and_token_normalisation():
    hidden, weight, labels = case(2)
    ha, hb = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss, _ = chunked_lm_loss(ha, weight, labels, chunk_tokens=9, num_items=50.0)  # weight needs no grad
    ref = plain_lm_loss(hb, weight, labels, num_items=50.0)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10 and torch.allclose(ha.grad, hb.grad, rtol=1e-9, atol=1e-12)
    assert weight.grad is None


def test_float32_within_tolerance():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in case(3, length=200, v=5000))
    ha, wa = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = chunked_lm_loss(ha, wa, labels, chunk_tokens=64)
    ref = plain_lm_loss(hb, wb, labels)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (ha.grad - hb.grad).abs().max() <= 1e-5 * hb.grad.abs().max()
    assert (wa.grad - wb.grad).abs().max() <= 1e-5 * wb.grad.abs().max()

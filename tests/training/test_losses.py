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


def test_bf16_autocast_runs_the_products_in_bf16_with_fp32_sums_and_fp32_gradients():
    """Under bf16 autocast with fp32 master weights, the chunked loss computes as the model's own head would
    (bf16 products, fp32 softmax): it matches the plain loss under the same autocast, differs from the exact
    fp32 loss by bf16's rounding only, and hands fp32 gradients to the fp32 parameters."""
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in case(4, length=300, h=64, v=3000))
    exact = plain_lm_loss(hidden, weight, labels)
    ha, wa = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_lm_loss(ha, wa, labels, chunk_tokens=32)
        ref = plain_lm_loss(hb, wb, labels)
    loss.backward()
    ref.backward()
    assert ha.grad.dtype == torch.float32 and wa.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 2e-3 * abs(ref.item())
    assert 0 < abs(loss.item() - exact.item()) <= 1e-2 * abs(exact.item())  # bf16 products, not fp32 ones
    for got, want in ((ha.grad, hb.grad), (wa.grad, wb.grad)):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_bf16_parameters_get_bf16_gradients():
    """FSDP's bf16 compute copies: the gradients come back in the parameters' dtype, close to fp32's."""
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in case(5, length=120, h=32, v=900))
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = chunked_lm_loss(hb, wb, labels, chunk_tokens=16)
    ref = plain_lm_loss(hf, wf, labels)
    loss.backward()
    ref.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())
    assert (wb.grad.float() - wf.grad).abs().max() <= 3e-2 * wf.grad.abs().max()


def test_the_loss_reads_one_value_back_from_the_device_per_call():
    """A value read back (``bool(t)``, ``.item()``, ``.tolist()``, ``nonzero``) waits for the device: the chunked
    loss does it once per call (the count of supervised positions), never per chunk."""
    from torch.overrides import TorchFunctionMode

    reads = {"__bool__": 0, "item": 0, "tolist": 0, "nonzero": 0}

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in reads:
                reads[name] += 1
            return func(*args, **(kwargs or {}))

    hidden, weight, labels = case(6, length=200)
    with Reads():
        loss, _ = chunked_lm_loss(hidden.requires_grad_(), weight.requires_grad_(), labels, chunk_tokens=8)
    loss.backward()
    assert reads == {"__bool__": 0, "item": 0, "tolist": 0, "nonzero": 1}, reads

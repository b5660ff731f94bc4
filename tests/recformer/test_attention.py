"""The attention implementations behind ``attention_impl`` against HF's own Longformer kernels: outputs,
input gradients and weight gradients, with padding, several global tokens and the windows the backbones
use (64: RecFormer; 512: the Chinese Longformer), plus ``auto``'s choice and the band copy's backward."""

import logging

import pytest
import torch
import torch.nn.functional as F

from lmrec.recformer.attention import (
    LongformerLayers,
    Pattern,
    _Bands,
    block_size,
    dense_max_tokens,
    self_attention,
)
from lmrec.recformer.configuration_recformer import RecformerConfig


def layers_for(window, impl, layers=2, hidden=32, heads=4, seed=0):
    cfg = RecformerConfig(vocab_size=10, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=2 * hidden, attention_window=window, attention_impl=impl,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = LongformerLayers(cfg)
    for p in model.parameters():  # larger than the default init, so that attention is far from uniform
        torch.nn.init.normal_(p, std=0.2)
    return model


def inputs(B, L, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, hidden, generator=g)
    mask = torch.zeros(B, L)
    mask[:, 0] = 1  # the first token is global in every row
    mask[0, L // 3] = 1  # a second global token in one row only
    mask[0, L - 1] = 1  # a global token at the very end
    mask[1, L - L // 4 :] = -1  # padding
    mask[2, 5:] = -1  # a row much shorter than the window
    return x, mask


def run(model, x, mask, pad=0):
    """Outputs and the gradients of a fixed random projection of the valid outputs; ``pad`` positions of
    padding are appended first (HF's kernels need a multiple of the window), outside the projection."""
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(x.shape, generator=g) * (mask >= 0)[..., None]
    x = F.pad(x, (0, 0, 0, pad)).requires_grad_(True)
    out = model(x, F.pad(mask, (0, pad), value=-1))
    (out * F.pad(weights, (0, 0, 0, pad))).sum().backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    L = mask.shape[1]
    return out.detach()[:, :L], x.grad[:, :L], grads


@pytest.mark.parametrize("impl", ["sdpa", "blocked", "auto"])
@pytest.mark.parametrize("window,L", [(64, 200), (64, 333), (512, 700)])
def test_outputs_and_gradients_match_hf_longformer(impl, window, L):
    hf = layers_for(window, "longformer")
    ours = layers_for(window, impl)
    ours.load_state_dict(hf.state_dict())
    x, mask = inputs(3, L, 32)
    out_hf, gx_hf, gw_hf = run(hf, x, mask, pad=(-L) % window)
    out, gx, gw = run(ours, x, mask)
    valid = mask >= 0
    assert (out - out_hf)[valid].abs().max() < 1e-5
    assert (gx - gx_hf).abs().max() < 1e-5
    for name, grad in gw.items():
        assert (grad - gw_hf[name]).abs().max() < 1e-5 * max(1.0, gw_hf[name].abs().max()), name


def test_mixed_windows_and_no_global_token():
    hf, ours = layers_for([8, 64], "longformer"), layers_for([8, 64], "blocked")
    ours.load_state_dict(hf.state_dict())
    x, mask = inputs(3, 192, 32)
    mask[mask > 0] = 0  # no global token anywhere: every row is local only
    out_hf, gx_hf, _ = run(hf, x, mask)
    out, gx, _ = run(ours, x, mask)
    assert (out - out_hf)[mask >= 0].abs().max() < 1e-5
    assert (gx - gx_hf).abs().max() < 1e-5


def test_dropout_in_training_keeps_the_expected_output():
    """With attention dropout the blocked kernel is random but unbiased: averaged over many draws it
    approaches the output without dropout."""
    model = layers_for(16, "blocked", layers=1)
    model.config.attention_probs_dropout_prob = 0.0
    x, mask = inputs(3, 40, 32)
    sa = model.layer[0].attention.self
    with torch.no_grad():
        exact = self_attention(sa, x, Pattern(mask), "blocked", training=False)
        sa.dropout = 0.3
        torch.manual_seed(0)
        draws = torch.stack([self_attention(sa, x, Pattern(mask), "blocked", training=True) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    valid = mask >= 0
    err = (draws.mean(0) - exact)[valid].abs().mean()
    assert err < 0.1 * exact[valid].abs().mean()


def test_band_copy_backward_is_the_adjoint_of_its_forward():
    x = torch.randn(2, 23, 3, 4, dtype=torch.float64, requires_grad=True)
    for w, b in [(4, 4), (4, 8), (6, 4), (2, 4)]:
        for gpos in (torch.tensor([0, 9]), torch.tensor([], dtype=torch.long)):
            assert torch.autograd.gradcheck(lambda t, w=w, b=b, g=gpos: _Bands.apply(t, g, w, b), (x,))


def test_auto_picks_dense_for_short_inputs_and_blocked_for_long_ones_and_says_so(caplog):
    model = layers_for(64, "auto", layers=1)
    assert model.choose(dense_max_tokens(64), 64) == "sdpa"
    with caplog.at_level(logging.INFO, logger="lmrec.attention"):
        assert model.choose(dense_max_tokens(64) + 1, 64) == "blocked"
        model.choose(4096, 64)  # logged once per (implementation, window)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "blocked" in said[0] and "window 64" in said[0]
    assert dense_max_tokens(512) > dense_max_tokens(64)


def test_block_sizes_divide_twice_the_half_window():
    for w in (1, 2, 3, 16, 32, 50, 64, 200, 256, 257, 512):
        b = block_size(w)
        assert (2 * w) % b == 0 and b >= min(32, w)


@pytest.mark.parametrize("impl", ["sdpa", "blocked"])
def test_bf16_autocast_is_as_close_to_fp32_as_hf_in_bf16(impl):
    """Mixed-precision training (train.mixed_precision=bf16) runs the attention under autocast."""
    hf, ours = layers_for(64, "longformer"), layers_for(64, impl)
    ours.load_state_dict(hf.state_dict())
    x, mask = inputs(3, 300, 32)
    pad = (-300) % 64
    exact_out, exact_gx, _ = run(hf, x, mask, pad=pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_out, hf_gx, _ = run(hf, x, mask, pad=pad)
        out, gx, _ = run(ours, x, mask)
    valid = mask >= 0
    assert (out.float() - exact_out)[valid].abs().max() <= 1.5 * (hf_out.float() - exact_out)[valid].abs().max()
    assert (gx.float() - exact_gx).abs().max() <= 1.5 * (hf_gx.float() - exact_gx).abs().max()


@pytest.mark.parametrize("window,L", [(64, 200), (512, 700)])
@torch.no_grad()
def test_flex_outputs_match_hf_longformer(window, L):
    """``flex`` (flex_attention with a sliding-window + global block mask; its fused kernel on CUDA): forward
    here (this torch has no CPU backward for it); forward and backward on a GPU in tests/gpu."""
    hf, ours = layers_for(window, "longformer").eval(), layers_for(window, "flex").eval()
    ours.load_state_dict(hf.state_dict())
    x, mask = inputs(3, L, 32)
    out_hf = hf(F.pad(x, (0, 0, 0, (-L) % window)), F.pad(mask, (0, (-L) % window), value=-1))[:, :L]
    out = ours(x, mask)
    assert (out - out_hf)[mask >= 0].abs().max() < 1e-5


def test_flex_refuses_attention_dropout():
    model = layers_for(64, "flex").train()
    model.config.attention_probs_dropout_prob = 0.1
    for layer in model.layer:
        layer.attention.self.dropout = 0.1
    x, mask = inputs(3, 100, 32)
    with pytest.raises(ValueError, match="no attention dropout"):
        model(x, mask)

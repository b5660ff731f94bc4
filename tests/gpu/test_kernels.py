"""The CUDA kernels against their references: torch's varlen FlashAttention against the per-segment reference
(forward and backward, grouped-query heads), packed logits against the per-sample forward on every backend
with several packs per batch, the chunked and Liger losses against the plain loss, the Longformer kernels
against HF's, and the chunk loop without host synchronisation."""

import importlib.util

import pytest
import torch

from lmrec.training import attention
from tests.training.test_attention_backends import packs, tiny_qwen3


def _segments(lengths, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return cu, max(lengths)


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_kernel_equals_the_reference_forward_and_backward(cuda, kv_heads):
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = [37, 300, 1, 129, 64]
    n = sum(lengths)
    q = torch.randn(n, 8, 64, generator=g).to(cuda, torch.bfloat16).requires_grad_()
    k = torch.randn(n, kv_heads, 64, generator=g).to(cuda, torch.bfloat16).requires_grad_()
    v = torch.randn(n, kv_heads, 64, generator=g).to(cuda, torch.bfloat16).requires_grad_()
    cu, longest = _segments(lengths, cuda)
    out = attention._varlen_kernel(q, k, v, cu, cu, longest, longest, 0.125, (-1, 0))
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention._varlen_reference(qr, kr, vr, cu.cpu(), 0.125, (-1, 0))
    w = torch.randn(out.shape, generator=g).to(cuda)
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    assert (out.float() - ref).abs().max() < 2e-2
    for a, b in ((q, qr), (k, kr), (v, vr)):
        assert (a.grad.float() - b.grad).abs().max() < 5e-2 * max(1.0, b.grad.abs().max().item())


@pytest.mark.parametrize("backend", ["varlen", "sdpa", "eager", "flex_attention"])
@torch.no_grad()
def test_packed_logits_equal_the_per_sample_forward_on_cuda(cuda, backend):
    model = tiny_qwen3().to(cuda)
    name = attention.resolve(backend, cuda, packed=True, mixed_precision="bf16")
    attention.apply(model, name)
    rows, batch = packs()
    keys = ("input_ids", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    inputs = {k: batch[k].to(cuda) if torch.is_tensor(batch[k]) else batch[k] for k in keys}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(**inputs).logits.float()
        attention.apply(model, "sdpa")
        for r, samples in enumerate(rows):
            start = 0
            for s in samples:
                alone = model(input_ids=torch.tensor([s.input_ids], device=cuda)).logits[0].float()
                diff = (packed[r, start: start + len(s.input_ids)] - alone).abs().max().item()
                assert diff < 5e-2 * alone.abs().max().item(), f"{backend}: row {r} at {start}: {diff}"
                start += len(s.input_ids)


def _loss_case(cuda, tokens=4096, hidden=1024, vocab=32768):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).to(cuda)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(cuda)
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    y[torch.rand(1, tokens, generator=g) < 0.3] = -100
    return h, w, y.to(cuda)


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_fused_losses_equal_the_plain_loss_under_bf16(cuda, impl):
    from lmrec.training.losses import chunked_lm_loss, plain_lm_loss

    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    h, w, y = _loss_case(cuda)
    ha, wa, hb, wb = (t.clone().requires_grad_() for t in (h, w, h, w))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if impl == "chunked":
            loss = chunked_lm_loss(ha, wa, y, chunk_tokens=1024)[0]
        else:
            from lmrec.training.losses import liger_lm_loss

            loss = liger_lm_loss(ha, wa, y)
        ref = plain_lm_loss(hb, wb, y)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 5e-3 * abs(ref.item())
    for a, b in ((ha.grad, hb.grad), (wa.grad, wb.grad)):
        assert (a.float() - b.float()).abs().max() <= 3e-2 * b.abs().max()


def test_the_chunk_loop_never_waits_for_the_device(cuda):
    from lmrec.training.losses import _ChunkedLinearCrossEntropy

    h, w, y = _loss_case(cuda, tokens=2048, vocab=8192)
    y = y.clamp(min=0)[0]
    h, w = h[0].requires_grad_(), w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = _ChunkedLinearCrossEntropy.apply(h, w, y, 256)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(total).item()


def _longformer(window, impl, cuda, dtype=torch.float32):
    from tests.recformer.test_attention import layers_for

    return layers_for(window, impl, hidden=64, heads=4).to(cuda, dtype)


@pytest.mark.parametrize("impl", ["blocked", "sdpa", "flex"])
def test_longformer_kernels_match_hf_on_cuda(cuda, impl):
    """fp32: within 1e-4 of HF's kernels, forward and backward (flex: forward and input gradients only where
    its backward is compiled); bf16: as close to HF's fp32 as HF's own bf16 kernels are (1.5×)."""
    from tests.recformer.test_attention import inputs

    L, window = 1024, 256
    hf, ours = _longformer(window, "longformer", cuda), _longformer(window, impl, cuda)
    ours.load_state_dict(hf.state_dict())
    x, mask = (t.to(cuda) for t in inputs(3, L, 64))
    g = torch.Generator(device="cpu").manual_seed(1)
    proj = (torch.randn(x.shape, generator=g).to(cuda) * (mask >= 0)[..., None])

    def run(model, dtype):
        xx = x.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(xx, mask)
        (out.float() * proj).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out.float().detach(), xx.grad.float(), grads

    out_hf, gx_hf, gw_hf = run(hf, torch.float32)
    out, gx, gw = run(ours, torch.float32)
    valid = mask >= 0
    assert (out - out_hf)[valid].abs().max() < 1e-4
    assert (gx - gx_hf).abs().max() < 1e-4 * max(1.0, gx_hf.abs().max().item())
    for name, grad in gw.items():
        assert (grad - gw_hf[name]).abs().max() < 1e-4 * max(1.0, gw_hf[name].abs().max().item()), name
    hf_bf16, _, _ = run(hf, torch.bfloat16)
    ours_bf16, _, _ = run(ours, torch.bfloat16)
    hf_err = (hf_bf16 - out_hf)[valid].abs().max().item()
    assert (ours_bf16 - out_hf)[valid].abs().max().item() <= 1.5 * hf_err + 1e-3


def test_beam_search_on_cuda_equals_cpu(tmp_path, cuda):
    import numpy as np

    from lmrec.generative.beam import SidTrie, constrained_beam_search
    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.samples import pad_batch
    from lmrec.generative.sid import build_sids
    from lmrec.generative.vocab import expand_vocab, load_lm

    rng = np.random.default_rng(0)
    sids, books = build_sids([f"i{i}" for i in range(300)], rng.normal(size=(300, 16)).astype(np.float32),
                             levels=3, codes=8)
    build_default_lm(["hello world", "a red shoe"] * 20, tmp_path / "lm", hidden_size=64, layers=2, heads=4,
                     kv_heads=2, head_dim=16, vocab_size=300)
    meta = expand_vocab(tmp_path / "lm", sids, tmp_path / "lm2", books=books, init="codebook", log=lambda m: None)
    model, tok = load_lm(tmp_path / "lm2")
    model.eval()
    trie = SidTrie(sids.codes, meta["level_token_ids"])
    prompts = [{"input_ids": rng.integers(10, 250, size=int(rng.integers(3, 12))).tolist()} for _ in range(16)]
    batch = pad_batch(prompts, tok.pad_token_id, left=True)
    items_cpu, scores_cpu = constrained_beam_search(model, trie, batch, beams=20)
    items_gpu, scores_gpu = constrained_beam_search(model.to(cuda), trie, batch, beams=20)
    assert (scores_gpu.cpu() - scores_cpu).abs().max() < 1e-3
    same = (items_gpu.cpu() == items_cpu).float().mean().item()
    assert same > 0.95, same  # near-ties may swap between devices; the scores above agree

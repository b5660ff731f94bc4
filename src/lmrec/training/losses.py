"""The LM-head cross-entropy in chunks of positions, never materialising the logits of a whole pack.

A 32k-token pack over Qwen3's vocabulary with the itemic tokens (176,384 rows) has 5.8 G logits: 23 GiB in
fp32, before the softmax's copy. ``chunked_lm_loss`` computes, chunk by chunk, the logits of
``chunk_tokens`` supervised positions (the others never reach the head), their log-sum-exp and the loss,
and — in the same pass, as Liger's fused linear cross-entropy does — the gradients of the hidden states
and of the head, which it keeps for the backward pass: peak memory is one chunk's logits plus the two
gradients, whatever the length. Written here (not a dependency) because it must run on the CPU and under
any accelerator, with frozen heads (LoRA), tied or untied, and the token normalisation of packed streams;
on a GPU, Liger's kernel may replace it (same numbers, checked by the tests' reference computation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, ignore_index: int):
        # hidden (N, H), weight (V, H), labels (N,) → (sum of the token losses, per-token losses (N,))
        n = hidden.shape[0]
        ctx.weight_dtype = weight.dtype  # its gradient is accumulated in fp32, returned in its own dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 (bf16 training: fp32 softmax)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        nll = torch.zeros(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            h, y = hidden[s: s + chunk], labels[s: s + chunk]
            valid = y != ignore_index
            if not valid.any():
                continue
            logits = (h @ weight.T).to(acc)  # (C, V): the only vocabulary-sized tensor, one chunk at a time
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            top = logits.max(dim=-1, keepdim=True).values
            logits.sub_(top).exp_()  # in place: a second (C, V) tensor would double the peak
            z = logits.sum(dim=-1, keepdim=True)
            nll[s: s + chunk] = torch.where(valid, (top + z.log())[:, 0] - target, 0.0)
            if need_h or need_w:
                logits.div_(z)  # now the softmax; d(lse - target)/d logits = softmax - one-hot
                logits[torch.arange(len(y), device=y.device)[valid], y[valid]] -= 1.0
                logits[~valid] = 0.0
                if need_h:
                    grad_h[s: s + chunk] = (logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += logits.T @ h.to(acc)
            del logits  # before the next chunk's logits exist: one chunk alive at a time
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.mark_non_differentiable(nll)
        return nll.sum(), nll

    @staticmethod
    def backward(ctx, grad_sum, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_sum.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_sum).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 4096,
                    num_items: float | torch.Tensor | None = None, ignore_index: int = -100
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss from the last hidden states ``(B, L, H)`` and the head's ``weight`` ``(V, H)``: position
    ``t`` predicts ``labels[t + 1]``. Returns (loss, per-token losses ``(B, L - 1)``, detached); the loss is
    the sum over supervised tokens / ``num_items`` (default: their count), as HF's causal-LM loss."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    # Only supervised positions reach the head: a next-item prompt supervises ≈ 5 of its ≈ 230 tokens, so
    # the vocabulary-sized work shrinks by as much (the others' loss is 0 and their gradient flows nowhere).
    keep = (y != ignore_index).nonzero()[:, 0]
    total, part = _ChunkedLinearCrossEntropy.apply(h[keep], weight, y[keep], chunk_tokens, ignore_index)
    nll = torch.zeros(y.shape, dtype=part.dtype, device=part.device).index_copy_(0, keep, part)
    denom = num_items if num_items is not None else keep.numel() or 1
    return total / denom, nll.view(hidden.shape[0], -1)


def plain_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  num_items: float | torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The reference: the whole pack's logits at once (what the chunked loss must equal)."""
    logits = (hidden[:, :-1] @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    y = labels[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=ignore_index, reduction="sum")
    return total / (num_items if num_items is not None else (y != ignore_index).sum().clamp(min=1))

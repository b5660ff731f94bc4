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


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the head's products run in: autocast's (bf16 training with fp32 master weights) where it is
    on for this device, else the tensor's own."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Precision, chosen to match the model's own head under the same settings: the logits and the two
    gradient products run in the compute dtype (bf16 under autocast, as the model's ``lm_head`` would; fp32
    otherwise, TF32 where the run allows it); the log-sum-exp, the softmax and the head gradient's sum over
    chunks are fp32 (a bf16 sum over chunks would drop the small contributions of later chunks).

    Memory: one chunk's ``(C, V)`` fp32 logits at a time, the hidden-state gradient ``(N, H)`` and the head
    gradient ``(V, H)`` in fp32, both formed here in the forward pass and handed to autograd in the backward
    one (the head gradient becomes the weight's ``.grad``: a gradient the step needs anyway, allocated at the
    loss instead of during the backward pass). No host synchronisation inside: every position given is
    supervised (``chunked_lm_loss`` selects them)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        # hidden (N, H), weight (V, H), labels (N,) all supervised → (sum of the token losses, per-token losses (N,))
        n, dt = hidden.shape[0], compute_dtype(hidden)
        acc = torch.promote_types(dt, torch.float32)  # fp32 at least (fp64 stays fp64)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(hidden.shape, dtype=dt, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        nll = torch.empty(n, dtype=acc, device=hidden.device)
        w = weight.to(dt)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes above, not autocast's per-op choice
            for s in range(0, n, chunk):
                h, y = hidden[s: s + chunk].to(dt), labels[s: s + chunk]
                logits = (h @ w.T).to(acc)  # (C, V): the only vocabulary-sized tensor, one chunk at a time
                target = logits.gather(1, y[:, None])[:, 0]
                top = logits.max(dim=-1, keepdim=True).values
                logits.sub_(top).exp_()  # in place: a second (C, V) tensor would double the peak
                z = logits.sum(dim=-1, keepdim=True)
                nll[s: s + chunk] = (top + z.log())[:, 0] - target
                if need_h or need_w:
                    logits.div_(z)  # now the softmax; d(lse - target)/d logits = softmax - one-hot
                    logits.scatter_add_(1, y[:, None], torch.full_like(target[:, None], -1.0))
                    probs = logits.to(dt)
                    if need_h:
                        grad_h[s: s + chunk] = probs @ w
                    if need_w:
                        grad_w += (probs.T @ h).to(acc)
                del logits  # before the next chunk's logits exist: one chunk alive at a time
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.mark_non_differentiable(nll)
        return nll.sum(), nll

    @staticmethod
    def backward(ctx, grad_sum, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_sum).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_sum).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 4096,
                    num_items: float | torch.Tensor | None = None, ignore_index: int = -100
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss from the last hidden states ``(B, L, H)`` and the head's ``weight`` ``(V, H)``: position
    ``t`` predicts ``labels[t + 1]``. Returns (loss, per-token losses ``(B, L - 1)``, detached); the loss is
    the sum over supervised tokens / ``num_items`` (default: their count), as HF's causal-LM loss."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    # Only supervised positions reach the head: a next-item prompt supervises a few of its tokens, so the
    # vocabulary-sized work shrinks by as much (the others' loss is 0 and their gradient flows nowhere). Their
    # count sizes the chunk loop: the one host synchronisation of the loss (nonzero), once per call.
    keep = (y != ignore_index).nonzero()[:, 0]
    total, part = _ChunkedLinearCrossEntropy.apply(h[keep], weight, y[keep], chunk_tokens)
    nll = torch.zeros(y.shape, dtype=part.dtype, device=part.device).index_copy_(0, keep, part)
    denom = num_items if num_items is not None else keep.numel() or 1
    return total / denom, nll.view(hidden.shape[0], -1)


@torch.no_grad()
def token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
                 ) -> torch.Tensor:
    """Every position's loss ``(B, L - 1)`` (0 where unsupervised), without gradients: for logged metrics.
    A head sharded by FSDP is gathered for it (every rank computes its metrics at the same step)."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    return chunked_lm_loss(hidden, weight, labels, chunk_tokens=chunk_tokens)[1]


def plain_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  num_items: float | torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The reference: the whole pack's logits at once (what the chunked loss must equal)."""
    logits = (hidden[:, :-1] @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    y = labels[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=ignore_index, reduction="sum")
    return total / (num_items if num_items is not None else (y != ignore_index).sum().clamp(min=1))


def liger_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  num_items: float | torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The same loss through Liger's fused linear cross-entropy (Triton; CUDA)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    total = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, h, y)
    return total / (num_items if num_items is not None else (y != ignore_index).sum().clamp(min=1))


class LossLinear(torch.nn.Linear):
    """An untied LM head that can also return the loss: ``head(hidden)`` gives logits as ``nn.Linear`` does;
    ``head(hidden, labels=..., ...)`` gives (loss, per-token losses or None) without the full logits. Computing
    the loss inside the head's own forward is what lets FSDP shard the head as a group of its own: the head's
    weight is gathered by its forward hooks and its gradient reduced by them."""

    def forward(self, input, labels=None, chunk_tokens: int = 4096, num_items=None, impl: str = "chunked"):
        if labels is None:
            return super().forward(input)
        if impl == "liger":
            return liger_lm_loss(input, self.weight, labels, num_items=num_items), None
        return chunked_lm_loss(input, self.weight, labels, chunk_tokens=chunk_tokens, num_items=num_items)

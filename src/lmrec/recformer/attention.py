"""Longformer attention (sliding window + global tokens) behind one seam, ``config.attention_impl``:

* ``"sdpa"`` — dense: one ``scaled_dot_product_attention`` over the whole sequence with a boolean mask.
  Fastest on short inputs (items, histories up to ~1k tokens); memory grows as L² per head.
* ``"blocked"`` — linear in memory: queries in blocks of ``b`` attend, through SDPA, to their key band
  (``b + 2w`` keys, ``w`` = half the window) plus the global keys; the global rows (global tokens attending to
  every token) are computed apart. Memory grows as L·(b + 2w + G); the only waste is the band's corners.
* ``"longformer"`` — HF's own band kernels (``LongformerSelfAttention``), kept as the reference.
* ``"auto"`` (default) — per call and per layer, ``sdpa`` up to :func:`dense_max_tokens` tokens for the
  layer's window, else ``blocked`` (from ``bench/bench_attention.py``; HF's kernels are slower than one of
  the two at every length measured). The choice is logged once per (implementation, window).

Every implementation computes exactly what HF's ``LongformerSelfAttention`` does: a local query attends to
the keys within ``w`` positions and to every global key, both through the *local* projections, in one
softmax (a global key inside the band counts once); a global query attends to every token through the
``*_global`` projections. Parameter names are HF's (``encoder.layer.{i}.attention.self.query_global`` ...),
so Longformer checkpoints load as they are. Parity: ``tests/recformer/test_attention.py``.

Why by hand: neither torch nor transformers ships a sliding-window + global attention that is both linear
in memory and differentiable on CPU (``flex_attention`` has no CPU backward in this torch; HF's kernels pad
every sequence to the window and build (L, 2w+1) diagonals through several copies).
"""

from __future__ import annotations

import logging
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.longformer.modeling_longformer import LongformerEncoder

from lmrec.config import AttentionImpl

ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)
logger = logging.getLogger("lmrec.attention")


def dense_max_tokens(window: int) -> int:
    """``auto``: the longest input (tokens) for which dense SDPA runs instead of the blocked kernel, for a
    layer with ``attention_window = window``. Dense costs ~L² per head, blocked ~L·(block + window) with
    more overhead per element. Crossovers measured (forward + backward of the attention, hidden 256, 4 heads,
    batch 1 and 8, 2 CPU cores): ~256 tokens for windows 64 and 128, ~512 for 256, ~800 for 512."""
    return max(256, 3 * window // 2)


def block_size(one_sided: int) -> int:
    """Queries per block for a band of ``one_sided`` keys on each side: a divisor of ``2·one_sided`` (the band
    is then whole blocks), wide enough for SDPA to be efficient, narrow enough that the band's unused corners
    (b² of b·(b + 2w) scores) stay small: the largest such divisor up to 128, or ``one_sided`` itself."""
    two = 2 * one_sided
    best = max(b for b in range(1, min(128, two) + 1) if two % b == 0)
    return best if best >= min(32, one_sided) else one_sided


class LongformerLayers(nn.Module):
    """HF's Longformer layer stack (``self.layer``: HF's modules and parameter names); the attention inside
    each layer is computed by the implementation ``config.attention_impl`` names.

    ``forward(hidden_states (B, L, H), attention_mask (B, L))`` with -1 = padding, 0 = local attention,
    +1 = global attention. ``"longformer"`` needs L to be a multiple of every window (the model pads)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = LongformerEncoder(config).layer
        self._logged: set[tuple[str, int]] = set()

    def choose(self, length: int, window: int) -> str:
        impl = self.config.attention_impl
        if impl == "auto":
            impl = "sdpa" if length <= dense_max_tokens(window) else "blocked"
            if (impl, window) not in self._logged:
                self._logged.add((impl, window))
                logger.info(f"attention_impl auto: {impl} for {length}-token inputs (window {window}; dense "
                            f"SDPA up to {dense_max_tokens(window)} tokens, blocked above)")
        return impl

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.attention_impl == "longformer":
            return self._hf(hidden_states, attention_mask)
        pattern = Pattern(attention_mask)
        L = hidden_states.shape[1]
        for layer in self.layer:
            sa = layer.attention.self
            impl = self.choose(L, 2 * sa.one_sided_attn_window_size)
            ctx = self_attention(sa, hidden_states, pattern, impl, self.training)
            attn_out = layer.attention.output(ctx, hidden_states)
            hidden_states = layer.ff_chunk(attn_out)
        return hidden_states

    def _hf(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        is_index_masked = attention_mask < 0
        is_index_global_attn = attention_mask > 0
        is_global_attn = bool(is_index_global_attn.any())
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask=attention_mask, is_index_masked=is_index_masked,
                                  is_index_global_attn=is_index_global_attn, is_global_attn=is_global_attn)[0]
        return hidden_states


def _heads(x: torch.Tensor, sa) -> torch.Tensor:
    return x.view(*x.shape[:2], sa.num_heads, sa.head_dim)  # (B, L, n, d)


class Pattern:
    """Who attends to whom, from the (B, L) mask (-1 padding, 0 local, +1 global); the masks each
    implementation needs are built on first use and shared by the layers with the same window."""

    def __init__(self, attention_mask: torch.Tensor):
        self.valid = attention_mask >= 0  # (B, L)
        self.glob = attention_mask > 0
        self.gpos = self.glob.any(0).nonzero().squeeze(-1)  # positions that are global somewhere in the batch
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    def block_mask(self, w: int, device: torch.device):
        """flex_attention's block mask of the local rows (the same pattern as ``dense_mask``), over the length
        padded to a multiple of ``FLEX_BLOCK`` (fewer shapes to compile)."""
        if ("flex", w) not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            B, L = self.valid.shape
            n = -(-L // FLEX_BLOCK) * FLEX_BLOCK
            valid, glob = (F.pad(x, (0, n - L), value=False) for x in (self.valid, self.glob))

            def local(b, h, q, k):
                return (((q - k).abs() <= w) | glob[b, k]) & valid[b, k] | ((q == k) & ~valid[b, q])

            self._masks["flex", w] = create_block_mask(local, B, None, n, n, device=device,
                                                       _compile=device.type == "cuda")
        return self._masks["flex", w]

    def mask(self, impl: str, w: int) -> torch.Tensor:
        if (impl, w) not in self._masks:
            self._masks[impl, w] = (dense_mask(self.valid, self.glob, w) if impl == "sdpa"
                                    else band_mask(self.valid, self.glob, self.gpos, w))
        return self._masks[impl, w]


def self_attention(sa, h: torch.Tensor, pattern: Pattern, impl: str, training: bool) -> torch.Tensor:
    """What HF's ``LongformerSelfAttention`` (``sa``, whose parameters it uses) computes, by ``impl``
    (``"sdpa"`` or ``"blocked"``): hidden states (B, L, H) → attention context (B, L, H)."""
    w = sa.one_sided_attn_window_size
    p = sa.dropout if training else 0.0  # HF stores the probability as a float
    # one GEMM for the three local projections (fewer, larger matrix products: ~15% faster on CPU)
    qkv = F.linear(h, torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
                   torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))  # (B, L, 3H)
    q, k, v = (_heads(x, sa) for x in qkv.chunk(3, -1))  # (B, L, n, d) views
    if impl == "sdpa":
        ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=pattern.mask(impl, w), dropout_p=p).transpose(1, 2)
    elif impl == "blocked":
        ctx = blocked_local_attention(q, k, v, pattern.mask(impl, w), pattern.gpos, w, p)
    elif impl == "flex":
        if p:
            raise ValueError("attention_impl flex has no attention dropout: use it with attention dropout 0, or "
                             "blocked / sdpa")
        ctx = flex_local_attention(q, k, v, pattern.block_mask(w, q.device))
    else:
        raise ValueError(f"self_attention computes 'sdpa', 'blocked' or 'flex', not {impl!r}")
    if len(pattern.gpos):
        ctx = _with_global_rows(ctx, sa, h, pattern, p)
    return ctx.flatten(2)


def hf_self_attention(sa, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """HF's own ``LongformerSelfAttention`` on the same inputs (L a multiple of the window): the reference."""
    glob = attention_mask > 0
    return sa(h, attention_mask=attention_mask, is_index_masked=attention_mask < 0, is_index_global_attn=glob,
              is_global_attn=bool(glob.any()))[0]


def dense_mask(valid: torch.Tensor, glob: torch.Tensor, w: int) -> torch.Tensor:
    """(B, 1, L, L) keys each query may see: within ``w`` positions, or global; never padding. Padding rows
    see themselves (their output is ignored; a row with nothing to see would be NaN and spread through the
    backward)."""
    L = valid.shape[1]
    pos = torch.arange(L, device=valid.device)
    near = (pos[:, None] - pos[None, :]).abs() <= w
    allowed = (near[None] | glob[:, None, :]) & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=valid.device) & ~valid[:, :, None]
    return allowed[:, None]


def band_mask(valid: torch.Tensor, glob: torch.Tensor, gpos: torch.Tensor, w: int) -> torch.Tensor:
    """(B·nb, 1, b, G + b + 2w) the blocked layout's mask: per block of ``b`` queries, first the G global
    keys (those global in this row), then the band of keys [start - w, start + b + w)."""
    B, L = valid.shape
    b = block_size(w)
    nb = -(-L // b)
    right = nb * b - L + w
    local_ok = F.pad(valid & ~glob, (w, right), value=False).unfold(1, b + 2 * w, b)  # (B, nb, b + 2w)
    r = torch.arange(b, device=valid.device)[:, None]  # query offset in its block
    c = torch.arange(b + 2 * w, device=valid.device)[None]  # key offset in the band; c = r + w is the query
    mask = (c >= r) & (c <= r + 2 * w) & local_ok[:, :, None, :]  # (B, nb, b, b + 2w)
    pad_row = ~F.pad(valid, (0, nb * b - L), value=False).view(B, nb, b, 1)
    mask |= (c == r + w) & pad_row
    if len(gpos):
        g = glob[:, gpos][:, None, None, :].expand(B, nb, b, len(gpos))
        mask = torch.cat([g, mask], -1)
    return mask.flatten(0, 1)[:, None]


FLEX_BLOCK = 128  # flex_attention's block size: lengths are padded to a multiple of it
_flex = None


def flex_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """The local rows with ``flex_attention`` (compiled on CUDA: its fused kernel skips the masked blocks, so
    the work is L·(2w + the global keys' blocks)): (B, L, n, d) → (B, L, n, d). No attention dropout."""
    global _flex
    from torch.nn.attention.flex_attention import flex_attention

    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    L = q.shape[1]
    n = block_mask.seq_lengths[0]
    qp, kp, vp = (F.pad(x, (0, 0, 0, 0, 0, n - L)).transpose(1, 2) for x in (q, k, v))  # (B, n_heads, n, d)
    return _flex(qp, kp, vp, block_mask=block_mask).transpose(1, 2)[:, :L]


def blocked_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            gpos: torch.Tensor, w: int, p: float) -> torch.Tensor:
    """The local rows in blocks of ``b`` queries: (B, L, n, d) queries, keys, values → context (B, L, n, d).
    Each block attends, through SDPA, to the global keys and its band of ``b + 2w`` keys (``band_mask``)."""
    B, L, n, d = q.shape
    b = block_size(w)
    nb = -(-L // b)
    tail = nb * b - L
    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).view(B, nb, b, n, d).transpose(2, 3).flatten(0, 1)  # (B·nb, n, b, d)
    kb, vb = (_Bands.apply(x, gpos, w, b) for x in (k, v))  # (B·nb, n, G + b + 2w, d)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=p)  # (B·nb, n, b, d)
    return out.view(B, nb, n, b, d).transpose(2, 3).reshape(B, nb * b, n, d)[:, :L]


class _Bands(torch.autograd.Function):
    """(B, L, n, d) → (B·nb, n, G + b + 2w, d): for each block of ``b`` positions, the G global positions,
    then the band [start − w, start + b + w) (zeros beyond the ends), as ``2w/b + 1`` whole blocks.

    By hand because autograd through ``unfold`` + ``cat`` spent more time zero-filling and copying than
    the attention itself took; here backward is one zero fill and ``2w/b + 1`` strided additions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gpos: torch.Tensor, w: int, b: int) -> torch.Tensor:
        B, L, n, d = x.shape
        nb, S, G = -(-L // b), 2 * w // b + 1, len(gpos)
        padded = x.new_zeros(B, (nb + S - 1) * b, n, d)  # w zeros on the left, the rest on the right
        padded[:, w : w + L] = x
        blocks = padded.view(B, nb + S - 1, b, n, d)
        out = x.new_empty(B, nb, n, G + S * b, d)
        if G:
            out[:, :, :, :G] = x[:, gpos].transpose(1, 2)[:, None]
        for s in range(S):
            out[:, :, :, G + s * b : G + (s + 1) * b] = blocks[:, s : s + nb].transpose(2, 3)
        ctx.save_for_backward(gpos)
        ctx.dims = B, L, n, d, nb, S, w, b
        return out.flatten(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gpos,) = ctx.saved_tensors
        B, L, n, d, nb, S, w, b = ctx.dims
        G = len(gpos)
        grad = grad.view(B, nb, n, G + S * b, d)
        blocks = grad.new_zeros(B, nb + S - 1, b, n, d)
        for s in range(S):
            blocks[:, s : s + nb] += grad[:, :, :, G + s * b : G + (s + 1) * b].transpose(2, 3)
        gx = blocks.view(B, -1, n, d)[:, w : w + L]
        if G:
            gx.index_add_(1, gpos, grad[:, :, :, :G].sum(1).transpose(1, 2))
        return gx, None, None, None


def _with_global_rows(ctx: torch.Tensor, sa, h: torch.Tensor, pattern: Pattern, p: float) -> torch.Tensor:
    """Replace the rows of global tokens by global attention: their ``query_global`` against every valid
    token's ``key_global`` / ``value_global``. (B, L, n, d)

    Computed without projecting all L tokens through ``key_global`` and ``value_global`` (2·L·H² multiply-adds,
    as HF does): per head, q·(W_k h + b_k) = (W_kᵀ q)·h + q·b_k, whose last term is the same for every key
    (it cancels in the softmax); and Σ_j p_j (W_v h_j + b_v) =
    W_v (Σ_j p_j h_j) + b_v Σ_j p_j, Σ_j p_j taken from a column of ones next to h (it is not 1 under
    dropout). Cost G·L·H per head instead of L·H² — same function, summed in another order."""
    B, L, H = h.shape
    n, d = sa.num_heads, sa.head_dim
    gpos = pattern.gpos
    gq = _heads(sa.query_global(h[:, gpos]), sa).transpose(1, 2)  # (B, n, G, d)
    q_in = torch.einsum("bngd,ndh->bngh", gq, sa.key_global.weight.view(n, d, H))  # (B, n, G, H)
    # q·b_k is the same for every key: it cancels in the softmax, but is added so that b_k stays in the graph
    # (with a gradient of zero, as in HF's) — DDP fails on parameters that get no gradient
    q_bias = (gq * sa.key_global.bias.view(1, n, 1, d)).sum(-1).flatten(1, 2)[..., None]  # (B, n·G, 1)
    scores = (q_in.flatten(1, 2) @ h.transpose(1, 2) + q_bias) * d ** -0.5  # (B, n·G, L)
    scores = scores.masked_fill(~pattern.valid[:, None, :], float("-inf"))
    probs = F.dropout(torch.softmax(scores, -1, dtype=torch.float32).to(h.dtype), p, training=p > 0)
    mixed = (probs @ torch.cat([h, h.new_ones(B, L, 1)], -1)).view(B, n, -1, H + 1)  # (B, n, G, H + 1)
    g_ctx = torch.einsum("bngh,ndh->bngd", mixed[..., :H], sa.value_global.weight.view(n, d, H))
    g_ctx = g_ctx + mixed[..., H:] * sa.value_global.bias.view(1, n, 1, d)
    sel = pattern.glob[:, gpos][:, :, None, None]  # (B, G, 1, 1)
    ctx = ctx.clone()
    ctx[:, gpos] = torch.where(sel, g_ctx.transpose(1, 2).to(ctx.dtype), ctx[:, gpos])  # bf16 under autocast
    return ctx

"""Attention backends for causal language models trained on packed sequences, and the isolation they need.

A pack concatenates several samples in one row; every sample must attend to itself only. transformers
derives that block-diagonal mask from restarting ``position_ids`` on its ``sdpa``, ``eager`` and
``flex_attention`` paths, but its ``flash_attention_2/3`` path does so only for a batch of one row, so a
packed batch of several rows needs the segment boundaries given explicitly (``cu_seq_lens_q/k``,
``max_length_q/k``: the keyword arguments transformers passes to every attention function). This module

- chooses the backend on purpose (``train.attn_implementation``: ``auto`` takes ``varlen`` for packed
  training on CUDA in bf16/fp16 and ``sdpa`` elsewhere), and refuses a packed run on a backend that is not
  known to isolate samples;
- registers ``varlen``: torch's own FlashAttention over variable-length sequences
  (``torch.nn.attention.varlen.varlen_attn`` with ``scale`` and ``window_size``, torch ≥ 2.11; no flash-attn
  wheel to build, nothing downloaded at load time), fed the packer's segment boundaries. It computes each
  sample's own causal block only, where ``sdpa`` with the block-diagonal mask computes the whole ``L × L``
  square and stores the mask;
- adds the segment boundaries to a batch (``with_segments``), computed on the host by the collator, so the
  model's step never waits for the device to find them.

On a CPU (these tests' machine) ``varlen`` runs an exact per-segment reference instead of the CUDA kernel:
same inputs, same segments, so the flattening, the grouped-query heads and the boundaries are tested here;
the kernel itself is compared with it in ``tests/gpu``.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

from lmrec.errors import ConfigError, LmrecError

VARLEN = "lmrec_varlen"  # the name registered with transformers' AttentionInterface
CHOICES = ("auto", "varlen", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Backends that keep packed samples apart given restarting position_ids (sdpa/eager/flex: transformers' own
# mask) or the segment boundaries (flash_attention_2/3 and varlen: cu_seq_lens_q/k).
ISOLATING = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", VARLEN}
SEGMENTED = {"flash_attention_2", "flash_attention_3", VARLEN}  # need cu_seq_lens in every batch

log = logging.getLogger("lmrec.attention")


def resolve(choice: str, device: torch.device, *, packed: bool, mixed_precision: str) -> str:
    """The attention implementation a run uses (a transformers ``attn_implementation`` name)."""
    if choice not in CHOICES:
        raise ConfigError(f"train.attn_implementation must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "auto":
        half = mixed_precision in ("bf16", "fp16")
        return VARLEN if packed and device.type == "cuda" and half and varlen_available() else "sdpa"
    if choice == "varlen":
        if device.type == "cuda" and mixed_precision not in ("bf16", "fp16"):
            raise ConfigError("train.attn_implementation=varlen runs FlashAttention, which computes in bf16/fp16: "
                              "set train.mixed_precision=bf16 (or auto on a GPU)")
        if device.type == "cuda" and not varlen_available():
            raise ConfigError("train.attn_implementation=varlen needs torch >= 2.11 (torch.nn.attention.varlen's "
                              "varlen_attn with scale and window_size); this torch is " + torch.__version__)
        return VARLEN
    return choice


def check_isolates(name: str, packed: bool) -> None:
    """A packed run on a backend that could let samples attend across pack boundaries stops here."""
    if packed and name not in ISOLATING:
        raise ConfigError(f"attention implementation {name!r} is not known to keep packed samples apart; use one of "
                          f"{', '.join(c for c in CHOICES if c != 'auto')}")


def apply(model: torch.nn.Module, name: str) -> None:
    """Set ``model``'s attention implementation (registering ``varlen`` first), with a clear error when the
    backend is not installed (flash_attention_2 needs the flash-attn package)."""
    if name == VARLEN:
        register_varlen()
    target = getattr(model, "set_attn_implementation", None)
    if target is None:  # a peft wrapper: the transformers model inside
        target = model.get_base_model().set_attn_implementation
    try:
        target(name)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"attention implementation {name!r} cannot be used here: {str(e).splitlines()[0]}") from None


def segmented(name: str) -> bool:
    """Whether batches for this backend must carry their segment boundaries (``with_segments``)."""
    return name in SEGMENTED


def current(model: torch.nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def varlen_available() -> bool:
    """torch's varlen_attn with the arguments the kernel call passes (torch 2.10's takes no ``scale``)."""
    try:
        return {"scale", "window_size"} <= _varlen_params()
    except ImportError:
        return False


def register_varlen() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


# --------------------------------------------------------------------------------------------- segments
def with_segments(batch: dict) -> dict:
    """Add the segment boundaries of a ``(B, L)`` batch flattened to ``B·L`` tokens: ``cu_seq_lens_q/k``
    (int32, ``(S + 1,)``) and ``max_length_q/k`` (ints). A segment starts where ``position_ids`` restart at 0
    (a packed batch: every sample, and the padding at the end of a row) or, without ``position_ids``, at
    every row and at the first padding column of a right-padded row (``attention_mask``)."""
    ids = batch["input_ids"]
    B, L = ids.shape
    if "position_ids" in batch:
        starts = batch["position_ids"].reshape(-1) == 0
    else:
        mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
        starts = torch.zeros(B, L, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = mask[:, 1:] != mask[:, :-1]  # real → padding (right padding) or padding → real (left)
        starts = starts.reshape(-1)
    cu = torch.cat([starts.nonzero()[:, 0], torch.tensor([B * L])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {**batch, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


# --------------------------------------------------------------------------------------------- varlen
def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                     max_length_k=None, **kwargs):
    """transformers' attention-function contract: ``query (B, Hq, L, D)``, ``key``/``value`` ``(B, Hkv, L,
    D)`` → ``((B, L, Hq, D), None)``. Causal within each segment of the flattened batch."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise LmrecError("varlen attention needs the batch's segment boundaries (cu_seq_lens_q/k, max_length_q/k): "
                         "the training collators add them (lmrec.training.attention.with_segments); for generation "
                         "use sdpa")
    if dropout:
        raise LmrecError("varlen attention has no attention dropout; set the model's attention_dropout to 0")
    B, Hq, L, D = query.shape
    q = query.transpose(1, 2).reshape(B * L, Hq, D)
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], D)
    cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (left, right): causal, optionally banded
    if q.is_cuda:
        out = _varlen_kernel(q, k, v, cu_seq_lens_q.to(q.device), cu_k.to(q.device), int(max_length_q),
                             int(max_length_k or max_length_q), scaling, window)
    else:
        out = _varlen_reference(q, k, v, cu_seq_lens_q, scaling, window)
    return out.view(B, L, Hq, D), None


def _varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    from torch.nn.attention.varlen import varlen_attn

    kw = {"scale": scale, "window_size": window}  # both there wherever varlen_available() (torch >= 2.11)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _varlen_params():
            kw["enable_gqa"] = True
        else:  # this torch's kernel has no grouped-query option: one key/value head per query head
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, **kw)


def _varlen_params() -> set[str]:
    from torch.nn.attention.varlen import varlen_attn

    return set(inspect.signature(varlen_attn).parameters)


def _varlen_reference(q, k, v, cu, scale, window):
    """The same computation segment by segment with SDPA: the CPU stand-in for the CUDA kernel."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        n = e - s
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if window[0] >= 0:
            allowed &= ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window[0] - 1)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1)
    return out
